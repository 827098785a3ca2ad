"""One row per run: ``python -m sparsecomm compare RUN_DIR... [--csv FILE] [--markdown]``.

Prints a table per task (aligned plain text, or GitHub Markdown with ``--markdown``) with each
run's method and options, workers, target and achieved density, final and best headline
metric, bytes per step, the mean time per step split into its parts, wall time, steps done and
whether the run is complete; ``--csv FILE`` also writes every run in one table of raw numbers
(bytes, seconds). Runs still in progress (no ``summary.json``) are read from ``metrics.jsonl``.
A folder holding runs stands for its runs.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .runs import TIME_PARTS, Run, distinct_names, find_runs, load_run, task_headline
from ..units import duration, si

__all__ = ["COLUMNS", "table", "tables_text", "tables_markdown", "main"]

log = logging.getLogger(__name__)

# Columns of the raw table (CSV), in order. Times in seconds, bytes per worker per step.
COLUMNS = ("run", "task", "model", "method", "options", "workers", "target_density", "density", "metric",
           "split", "higher_is_better", "final", "best", "bytes_sent_per_step", "bytes_wire_per_step", *TIME_PARTS,
           "wall_time", "steps", "total_steps", "status")

def _row(run: Run, head: Any, name: str) -> dict[str, Any]:
    final, best = run.final_and_best(head) if head is not None else (None, None)
    options = [f"{k}={v}" for k, v in sorted((run.reducer.get("options") or {}).items())]
    if run.method != "exact" and not run.reducer.get("error_feedback", True):
        options.insert(0, "error_feedback=off")
    return {
        "run": name, "task": run.task, "model": run.model, "method": run.method, "options": ", ".join(options),
        "workers": run.workers, "target_density": run.target_density, "density": run.density,
        "metric": None if head is None else head.metric, "split": None if head is None else head.split,
        "higher_is_better": None if head is None else head.higher_is_better,
        "final": final, "best": best,
        "bytes_sent_per_step": run.bytes_per_step("sent"), "bytes_wire_per_step": run.bytes_per_step("wire"),
        **{part: run.mean(part) for part in TIME_PARTS},
        "wall_time": run.wall_time, "steps": run.steps_done, "total_steps": run.total_steps, "status": run.status,
    }


def table(runs: list[Run]) -> pd.DataFrame:
    """The raw table: one row per run with :data:`COLUMNS`, sorted by task, method, target
    density, workers and name. Each task's headline metric comes from its runs' summaries."""
    names = dict(zip(map(id, runs), distinct_names(runs)))
    by_task: dict[str, list[Run]] = {}
    for run in runs:
        by_task.setdefault(run.task, []).append(run)
    rows = [_row(run, head, names[id(run)]) for task, group in by_task.items() for head in [task_headline(group)]
            for run in group]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    if df.empty:
        return df
    order = df.assign(_dense=df["method"] != "exact", _density=df["target_density"].fillna(math.inf))
    order = order.sort_values(["task", "_dense", "method", "_density", "workers", "run"], kind="stable")
    return df.loc[order.index].reset_index(drop=True)


# ---------------------------------------------------------------------- formatting
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True)
class _Shown:
    """A column as shown: the raw column it comes from, how a present value reads, and whether
    it is a number (right-aligned)."""

    raw: str
    show: Callable[[Any], str] = str
    number: bool = True


# Shown column name -> _Shown; the headline metric's name is added to "final" and "best".
_SHOWN = {
    "run": _Shown("run", number=False),
    "model": _Shown("model", number=False),
    "method": _Shown("method", number=False),
    "options": _Shown("options", number=False),
    "P": _Shown("workers", lambda v: f"{int(v)}"),
    "target c": _Shown("target_density", lambda v: f"{v:g}"),
    "density": _Shown("density", lambda v: f"{v:.3g}"),
    "final": _Shown("final", lambda v: f"{v:.4g}"),
    "best": _Shown("best", lambda v: f"{v:.4g}"),
    "sent/step": _Shown("bytes_sent_per_step", lambda v: si(v, "B")),
    "wire/step": _Shown("bytes_wire_per_step", lambda v: si(v, "B")),
    **{f"{part[2:]} ms": _Shown(part, lambda v: f"{1e3 * v:.3g}") for part in TIME_PARTS},
    "wall": _Shown("wall_time", duration),
    "steps": _Shown("steps", lambda v: f"{int(v):,}"),
    "status": _Shown("status", number=False),
}


def _cell(name: str, row: pd.Series) -> str:
    column = _SHOWN[name]
    if name == "target c" and row["method"] == "exact":
        return "dense"
    if name == "steps":
        total = row["total_steps"]
        return f"{int(row['steps']):,} / " + ("?" if _missing(total) else f"{int(total):,}")
    value = row[column.raw]
    return "-" if _missing(value) or value == "" else column.show(value)


def _shown(raw: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Per task: a title and the table as shown (strings, '-' where missing)."""
    out = []
    for task, group in raw.groupby("task", sort=True):
        first = group.iloc[0]
        if _missing(first["metric"]):
            title = f"{task}: no evaluation yet"
        else:
            better = "higher" if first["higher_is_better"] else "lower"
            title = f"{task}: {first['split']} {first['metric']} ({better} is better)"
        shown = pd.DataFrame({name: [_cell(name, row) for _, row in group.iterrows()] for name in _SHOWN})
        if not _missing(first["metric"]):
            shown = shown.rename(columns={"final": f"final {first['metric']}", "best": f"best {first['metric']}"})
        out.append((title, shown))
    return out


def _aligned(shown: pd.DataFrame, escape: bool = False) -> tuple[list[list[str]], list[int], list[bool]]:
    """Header and rows padded to their column's width: numbers right-aligned, text left."""
    cols = [str(c) for c in shown.columns]
    right = [_SHOWN[c.split(" ")[0] if c.split(" ")[0] in ("final", "best") else c].number for c in cols]
    rows = [cols] + [[str(v).replace("|", "\\|") if escape else str(v) for v in row]
                     for row in shown.itertuples(index=False)]
    widths = [max(3, *(len(row[i]) for row in rows)) for i in range(len(cols))]
    padded = [[v.rjust(w) if r else v.ljust(w) for v, w, r in zip(row, widths, right)] for row in rows]
    return padded, widths, right


def tables_text(raw: pd.DataFrame) -> str:
    """Aligned plain-text tables, one per task under its title."""
    parts = []
    for title, shown in _shown(raw):
        padded, _, _ = _aligned(shown)
        parts.append("\n".join([title] + ["  ".join(row).rstrip() for row in padded]))
    return "\n\n".join(parts) + "\n"


def tables_markdown(raw: pd.DataFrame) -> str:
    """GitHub Markdown tables, one per task under a heading (numbers right-aligned)."""
    parts = []
    for title, shown in _shown(raw):
        padded, widths, right = _aligned(shown, escape=True)
        rule = ["-" * (w - 1) + ":" if r else ":" + "-" * (w - 1) for w, r in zip(widths, right)]
        lines = ["| " + " | ".join(row) + " |" for row in [padded[0], rule, *padded[1:]]]
        parts.append(f"### {title}\n\n" + "\n".join(lines))
    return "\n\n".join(parts) + "\n"


def load(paths: list[Path]) -> list[Run]:
    """The runs among ``paths`` (folders holding runs expanded; anything else skipped with a warning)."""
    runs = []
    for d in find_runs(paths):
        try:
            runs.append(load_run(d))
        except OSError as exc:
            log.warning("%s: unreadable (%s); skipped", d, exc)
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsecomm compare", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories, or folders holding them")
    p.add_argument("--csv", type=Path, metavar="FILE", help="also write every run, raw numbers, to this CSV file")
    p.add_argument("--markdown", action="store_true", help="print GitHub Markdown tables instead of plain text")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s: %(message)s")
    runs = load(args.runs)
    if not runs:
        print(f"error: no run directory among {', '.join(map(str, args.runs))}", file=sys.stderr)
        return 2
    raw = table(runs)
    sys.stdout.write(tables_markdown(raw) if args.markdown else tables_text(raw))
    if args.csv is not None:
        try:
            args.csv.parent.mkdir(parents=True, exist_ok=True)
            raw.to_csv(args.csv, index=False)
        except OSError as exc:
            print(f"error: cannot write {args.csv}: {exc}", file=sys.stderr)
            return 1
        log.info("wrote %s", args.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
