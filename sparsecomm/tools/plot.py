"""Figures from run directories: ``python -m sparsecomm plot RUN_DIR... --out DIR``.

Runs are grouped by task; for each task four PNG files named after it: the headline metric
against epoch (``<task>-metric_vs_epoch.png``) and against bytes sent per worker
(``-metric_vs_bytes``), the achieved density against step (``-density_vs_step``) and the mean
time per step split into data, forward, backward, select, communicate and optimizer step
(``-time_breakdown``). A folder holding runs stands for its runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter, NullFormatter

from .runs import TIME_PARTS, Headline, NotARunError, Run, distinct_names, find_runs, load_run, task_headline
from ..train.meter import PART_NAMES

__all__ = ["FIGURES", "figures", "labels", "plot_runs", "main"]

log = logging.getLogger(__name__)

# Settings that never tell runs apart in a legend: where files go, how progress is shown, where
# the last command stopped (max_steps: the curve's length shows it), and what the method label
# already says.
_IGNORED = ("output_dir", "name", "description", "task", "max_steps", "data.dir", "data.cache_dir",
            "records.", "environment.", "reducer.name", "reducer.density", "reducer.error_feedback")
# Short legend names of common settings; any other is its last dotted part (or the whole key if
# that is ambiguous). Listed settings come first in a label, in this order.
_SHORT = {"environment.world_size": "P", "seed": "seed", "optimizer.lr": "lr", "data.batch_size": "batch",
          "data.global_batch_size": "global batch", "model": "model", "epochs": "epochs"}



def _thousands(x: float, _pos: Any = None) -> str:
    return f"{x:,.0f}"

_BYTES_LABEL = "bytes sent per worker (SI prefixes: 1 MB = 10^6 B)"
_LINESTYLES = ("-", "--", ":", "-.")
_LEGEND_INSIDE = 6  # more runs than this: the legend goes beside the axes


# ---------------------------------------------------------------------- labels
def labels(runs: list[Run]) -> list[str]:
    """Legend labels that tell the runs apart: method and density, then every setting whose
    value differs between the runs, then the directory name where two are still alike."""
    flat = [_settings(run) for run in runs]
    differing = [k for k in sorted({k for f in flat for k in f})
                 if len({repr(f.get(k)) for f, run in zip(flat, runs) if _applies(k, run)}) > 1]
    differing.sort(key=lambda k: (list(_SHORT).index(k) if k in _SHORT else len(_SHORT), k))
    short = _short_names(differing)
    out = []
    for run, settings in zip(runs, flat):
        extra = [f"{short[k]}={_value(settings[k])}" for k in differing if k in settings]
        out.append(", ".join([_method(run)] + extra))
    counts = Counter(out)
    return [f"{text} [{name}]" if counts[text] > 1 else text for text, name in zip(out, distinct_names(runs))]


def _method(run: Run) -> str:
    if run.method == "exact":
        return "exact (dense)"
    density = run.target_density
    text = run.method if density is None else f"{run.method} c={density:g}"
    return text if run.reducer.get("error_feedback", True) else f"{text} noef"


def _applies(key: str, run: Run) -> bool:
    """Whether a setting means anything for a run (the dense method has no reducer settings)."""
    return not (run.method == "exact" and key.startswith("reducer."))


def _settings(run: Run) -> dict[str, Any]:
    """The run's settings as dotted keys, less those in :data:`_IGNORED` (an empty section: none)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            flat[prefix[:-1]] = value

    walk("", {k: v for k, v in run.config.items() if k != "environment"})
    if run.workers is not None:
        flat["environment.world_size"] = run.workers
    return {k: v for k, v in flat.items() if _applies(k, run) and (
        k == "environment.world_size" or not any(k == i or (i.endswith(".") and k.startswith(i)) for i in _IGNORED))}


def _short_names(keys: list[str]) -> dict[str, str]:
    tails = Counter(k.rsplit(".", 1)[-1] for k in keys)
    return {k: _SHORT.get(k) or (k.rsplit(".", 1)[-1] if tails[k.rsplit(".", 1)[-1]] == 1 else k) for k in keys}


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_value(v) for v in value) + "]"
    return str(value)


# ---------------------------------------------------------------------- figures
# Each figure builder draws one task's runs on a new Figure, or returns None without data.
FigureBuilder = Callable[[str, list[Run], list[str], Headline | None], Figure | None]


def _figure(title: str, height: float = 4.2) -> tuple[Figure, Any]:
    fig = Figure(figsize=(6.8, height), layout="constrained")
    ax = fig.subplots()
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="major")
    return fig, ax


def _curves(fig: Figure, ax: Any, curves: list[tuple[str, list[tuple[float, float]]]], **style: Any) -> None:
    """One line per run (past ten colours, dashed, then dotted ...) and the legend: inside the
    axes for a few runs, to the right of them for more."""
    for i, (name, points) in enumerate(curves):
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=name, linestyle=_LINESTYLES[i // 10 % len(_LINESTYLES)], **style)
    if len(curves) <= _LEGEND_INSIDE:
        ax.legend(fontsize=7)
    else:
        fig.set_figwidth(fig.get_figwidth() + 2.8)
        fig.legend(fontsize=7, loc="outside right upper")


def _metric_against(x: str) -> FigureBuilder:
    def build(task: str, runs: list[Run], names: list[str], head: Headline | None) -> Figure | None:
        if head is None:
            return None
        curves = [(name, run.series(head.metric, head.split, x)) for run, name in zip(runs, names)]
        curves = [(name, points) for name, points in curves if points]
        if not curves:
            return None
        against = "epoch" if x == "epoch" else "bytes sent per worker"
        fig, ax = _figure(f"{task}: {head.split} {head.metric} against {against}")
        _curves(fig, ax, curves, marker="o", ms=3)
        better = "higher" if head.higher_is_better else "lower"
        ax.set_ylabel(f"{head.split} {head.metric} ({better} is better)")
        if x == "epoch":
            ax.set_xlabel("epoch")
        else:
            _bytes_axis(ax, [p for _, points in curves for p, _ in points])
        return fig

    return build


def _bytes_axis(ax: Any, values: list[float]) -> None:
    ax.set_xlabel(_BYTES_LABEL)
    if _spans_decades(values):
        ax.set_xscale("log")  # dense and sparse runs differ by orders of magnitude
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(EngFormatter(unit="B"))


def _spans_decades(values: list[float]) -> bool:
    """Positive values spanning at least two powers of ten: worth a log axis."""
    return bool(values) and min(values) > 0 and max(values) >= 100 * min(values)


def _density_vs_step(task: str, runs: list[Run], names: list[str], head: Headline | None) -> Figure | None:
    curves = [(name, [(r["step"], r["density"]) for r in run.train if "density" in r and "step" in r])
              for run, name in zip(runs, names)]
    curves = [(name, points) for name, points in curves if points]
    if not curves:
        return None
    fig, ax = _figure(f"{task}: achieved density against step")
    _curves(fig, ax, curves)
    ax.set_xlabel("step")
    ax.xaxis.set_major_formatter(FuncFormatter(_thousands))
    ax.set_ylabel("achieved density (of the averaged gradient)")
    if _spans_decades([y for _, points in curves for _, y in points]):
        ax.set_yscale("log")
    return fig


def _time_breakdown(task: str, runs: list[Run], names: list[str], head: Headline | None) -> Figure | None:
    bars = [(name, [run.mean(part) or 0.0 for part in TIME_PARTS]) for run, name in zip(runs, names) if run.train]
    if not bars:
        return None
    fig, ax = _figure(f"{task}: mean time per step", height=max(2.8, 1.6 + 0.45 * len(bars)))
    ys = list(range(len(bars)))
    left = [0.0] * len(bars)
    for i, part in enumerate(TIME_PARTS):
        widths = [parts[i] for _, parts in bars]
        ax.barh(ys, widths, left=left, label=PART_NAMES[part])
        left = [a + b for a, b in zip(left, widths)]
    ax.set_yticks(ys, [name for name, _ in bars], fontsize=7)
    ax.invert_yaxis()  # the first run on top
    ax.set_xlabel("mean time per step (rank 0)")
    ax.xaxis.set_major_formatter(EngFormatter(unit="s"))
    fig.legend(fontsize=7, ncols=len(TIME_PARTS), loc="outside lower center")
    return fig


FIGURES: dict[str, FigureBuilder] = {
    "metric_vs_epoch": _metric_against("epoch"),
    "metric_vs_bytes": _metric_against("bytes_sent"),
    "density_vs_step": _density_vs_step,
    "time_breakdown": _time_breakdown,
}


def figures(runs: list[Run]) -> dict[str, Figure]:
    """Every figure with data, by file name (``<task>-<figure>.png``), one set per task;
    legend labels are :func:`labels` among the task's runs that have lines."""
    by_task: dict[str, list[Run]] = {}
    for run in runs:
        if run.train or run.evals:  # a run with no lines yet has nothing to draw, nor to tell apart
            by_task.setdefault(run.task, []).append(run)
    out: dict[str, Figure] = {}
    for task, group in sorted(by_task.items()):
        head = task_headline(group)
        if head is None:
            log.warning("task %s: no evaluation lines in its %d run(s); no metric figures", task, len(group))
        names = labels(group)
        for figure, build in FIGURES.items():
            fig = build(task, group, names, head)
            if fig is not None:
                out[f"{_safe(task)}-{figure}.png"] = fig
    return out


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.+" else "_" for c in text)


def plot_runs(paths: list[Path], out: Path | None = None) -> list[Path]:
    """Read the runs among ``paths`` (warning about each that is incomplete), write their
    figures into ``out`` (default: ``figures`` in the folder that holds the runs) and return
    the files written."""
    dirs = find_runs(paths)
    if not dirs:
        raise NotARunError(f"no run directory among {', '.join(map(str, paths))}")
    if out is None:
        out = Path(os.path.commonpath([d.resolve().parent for d in dirs])) / "figures"
    runs = []
    for d in dirs:
        try:
            run = load_run(d)
        except OSError as exc:
            log.warning("%s: unreadable (%s); skipped", d, exc)
            continue
        if run.problems:
            log.warning("%s: %s; plotting what it has", d, "; ".join(run.problems))
        runs.append(run)
    drawn = figures(runs)
    if not drawn:
        raise NotARunError(f"nothing to plot: no metrics lines in the {len(runs)} run(s)")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, fig in drawn.items():
        fig.savefig(out / name, dpi=120)
        written.append(out / name)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsecomm plot", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories, or folders holding them")
    p.add_argument("--out", type=Path, help="folder for the PNG files (default: figures/ in the folder that holds "
                                           "the runs)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s: %(message)s")
    try:
        written = plot_runs(args.runs, args.out)
    except NotARunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write the figures{f' into {args.out}' if args.out else ''}: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
