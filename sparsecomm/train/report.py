"""The few lines a run ends with: what it reached and what it cost, from its summary."""
from __future__ import annotations

from typing import Any

from ..units import duration, seconds, si
from .meter import PART_NAMES

__all__ = ["report"]


def report(summary: dict[str, Any], where: str) -> str:
    """``summary.json`` for a person: the headline metric (final and best), the density
    achieved against the target, the bytes one worker sent, and the time split of a step (its
    warnings are logged when the summary is written)."""
    steps, total = summary["steps"], summary.get("total_steps")
    state = "done" if summary.get("complete") else "stopped before the end"
    head = (f"{state}: {summary['run']} at step {steps:,}" + (f" of {total:,}" if total else "")
            + f" after {duration(summary['wall_time'])}, in {where}")
    lines = [head, f"  {summary['metric']:<10} {_metric(summary)}"]
    dense = summary["reducer"] == "exact"
    target = "dense" if dense else f"target {summary['target_density']:g}"
    lines.append(f"  {'density':<10} {summary['mean_density']:.4g} ({target}); "
                 f"{si(summary['bytes_sent_per_step'], 'B')} sent per worker per step, "
                 f"{si(summary['total_bytes_sent'], 'B')} in all")
    split = summary.get("time_split")
    if split:
        parts = ", ".join(f"{PART_NAMES[k]} {seconds(v)}" for k, v in split.items())
        lines.append(f"  {'per step':<10} {seconds(sum(split.values()))}: {parts}")
    return "\n".join(lines)


def _metric(summary: dict[str, Any]) -> str:
    metric, best = summary["metric"], summary.get("best")
    finals = [(split, values[metric]) for split, values in summary.get("final", {}).items() if metric in values]
    if not finals:
        return "not evaluated"
    text = "final " + ", ".join(f"{value:.4g} ({split})" for split, value in finals)
    if best is not None:
        text += f"; best {best['value']:.4g} at epoch {round(best['epoch'], 3):g}"
    return text

