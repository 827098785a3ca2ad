"""One figure of a comparison to the end of a schedule: the headline metric against epoch
(left) and against the bytes one worker sent (right, log axis), one line per run, labelled
by method and achieved density.

    python bench/accuracy_figure.py RUN_DIR... --out docs/figures/cifar10-resnet20-short.png
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, NullFormatter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsecomm.tools.runs import find_runs, load_run, task_headline  # noqa: E402


def label(run) -> str:
    if run.method == "exact":
        return "dense (exact)"
    density = run.density
    return f"{run.method} c={run.target_density:g}" + ("" if density is None else f" (achieved {density:.2g})")


def draw(paths: list[Path], out: Path, title: str | None) -> Path:
    runs = [load_run(p) for p in find_runs(paths)]
    if not runs:
        raise SystemExit(f"error: no run directory among {', '.join(map(str, paths))}")
    head = task_headline(runs)
    if head is None:
        raise SystemExit("error: the runs have no evaluation lines yet")
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    by_epoch, by_bytes = fig.subplots(1, 2, sharey=True)
    for run in runs:
        name = label(run)
        for ax, x in ((by_epoch, "epoch"), (by_bytes, "bytes_sent")):
            points = run.series(head.metric, head.split, x)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", ms=2.5, label=name)
    by_epoch.set_xlabel("epoch")
    by_epoch.set_ylabel(f"{head.split} {head.metric}")
    by_bytes.set_xlabel("bytes sent per worker, cumulative (SI prefixes)")
    by_bytes.set_xscale("log")
    by_bytes.xaxis.set_major_formatter(EngFormatter(unit="B"))
    by_bytes.xaxis.set_minor_formatter(NullFormatter())
    for ax in (by_epoch, by_bytes):
        ax.grid(alpha=0.3)
    by_epoch.legend(fontsize=7, loc="lower right")
    fig.suptitle(title or f"{runs[0].task}, {runs[0].model}: {head.split} {head.metric}", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/accuracy_figure.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories, or folders holding them")
    p.add_argument("--out", type=Path, required=True, help="the PNG file to write")
    p.add_argument("--title", help="the figure's title (default: task, model and metric)")
    args = p.parse_args(argv)
    print(draw(args.runs, args.out, args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
