"""Figures from run directories: ``python -m sparsecomm.plot RUN_DIR [RUN_DIR ...] --out DIR``.

Writes four PNG files comparing the runs: the headline metric against epoch and against
bytes sent per worker, the achieved density against step, and the mean time per step split
into data, forward, backward, select, communicate and optimizer step.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = ["load_run", "plot_runs", "main"]

TIME_PARTS = ("t_data", "t_forward", "t_backward", "t_select", "t_comm", "t_step")


def load_run(run_dir: Path) -> dict[str, Any]:
    """A run's settings, records split into training and evaluation lines, and summary."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    train, evals = [], []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        (evals if "split" in record else train).append(record)
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    return {"dir": run_dir, "config": config or {}, "train": train, "eval": evals, "summary": summary}


def label(run: dict[str, Any]) -> str:
    cfg = run["config"]
    reducer = cfg.get("reducer", {})
    name = reducer.get("name", run["dir"].name)
    if name == "exact":
        return "exact (dense)"
    return f"{name} c={reducer.get('density', 0):g}"


def headline(runs: list[dict[str, Any]]) -> tuple[str, str]:
    """(metric, split) to plot: the summary's metric, else the first numeric evaluation key."""
    for run in runs:
        s = run["summary"]
        if s.get("metric"):
            split = "valid" if any(e.get("split") == "valid" for e in run["eval"]) and s["metric"] == "perplexity" \
                else "test"
            return s["metric"], split
    for run in runs:
        for e in run["eval"]:
            for key, value in e.items():
                if key not in ("step", "epoch", "time", "bytes_sent", "split") and isinstance(value, (int, float)):
                    return key, e["split"]
    raise ValueError("no evaluation records in the given runs")


def plot_runs(run_dirs: list[Path], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    metric, split = headline(runs)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

    for x_key, x_label, name in (("epoch", "epoch", "metric_vs_epoch.png"),
                                 ("bytes_sent", "bytes sent per worker (GB)", "metric_vs_bytes.png")):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for run in runs:
            points = [(e[x_key], e[metric]) for e in run["eval"] if e.get("split") == split and metric in e]
            if points:
                xs, ys = zip(*points)
                if x_key == "bytes_sent":
                    xs = [x / 1e9 for x in xs]
                ax.plot(xs, ys, marker="o", ms=3, label=label(run))
        ax.set_xlabel(x_label)
        ax.set_ylabel(f"{split} {metric}")
        if x_key == "bytes_sent":
            ax.set_xscale("symlog", linthresh=1e-3)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, name)

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for run in runs:
        points = [(t["step"], t["density"]) for t in run["train"] if "density" in t]
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, label=label(run))
    ax.set_xlabel("step")
    ax.set_ylabel("achieved density (of the average)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save(fig, "density_vs_step.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    names = [label(run) for run in runs]
    bottom = [0.0] * len(runs)
    for part in TIME_PARTS:
        heights = []
        for run in runs:
            rows = [t[part] for t in run["train"] if part in t]
            heights.append(1e3 * sum(rows) / len(rows) if rows else 0.0)
        ax.bar(names, heights, bottom=bottom, label=part[2:])
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("mean time per step (ms)")
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    ax.legend(fontsize=8)
    save(fig, "time_breakdown.png")
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsecomm.plot", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories")
    p.add_argument("--out", type=Path, default=Path("figures"), help="folder for the PNG files (default ./figures)")
    args = p.parse_args(argv)
    try:
        for path in plot_runs(args.runs, args.out):
            print(path)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
