"""The few lines a run ends with: what it reached and what it cost, from its summary."""
from __future__ import annotations

import math
from typing import Any

from ..units import duration, seconds, si
from .meter import PART_NAMES

__all__ = ["report"]


def report(summary: dict[str, Any], where: str) -> str:
    """``summary.json`` for a person: the headline metric (final and best), the density
    achieved against the target, the bytes one worker sent, and the time split of a step (in
    bucket scope its parts overlap, and the line says so; its warnings are logged when the
    summary is written)."""
    steps, total = summary["steps"], summary.get("total_steps")
    state = "done" if summary.get("complete") else "stopped before the end"
    head = (f"{state}: {summary['run']} at step {steps:,}" + (f" of {total:,}" if total else "")
            + f" after {duration(summary['wall_time'])}, in {where}")
    lines = [head, f"  {summary['metric']:<10} {_metric(summary)}"]
    lines.append(f"  {'density':<10} {summary['mean_density']:.4g} ({_target(summary)}); "
                 f"{si(summary['bytes_sent_per_step'], 'B')} sent per worker per step, "
                 f"{si(summary['total_bytes_sent'], 'B')} in all")
    split = summary.get("time_split")
    if split:
        parts = ", ".join(f"{PART_NAMES[k]} {seconds(v)}" for k, v in split.items())
        total = seconds(sum(split.values()))
        if summary.get("scope") == "bucket":  # the reduce ran beside backward: the parts overlap
            lines.append(f"  {'per step':<10} parts adding to {total}, select and communicate beside backward "
                         f"(bucket scope): {parts}")
        else:
            lines.append(f"  {'per step':<10} {total}: {parts}")
    return "\n".join(lines)


def _target(summary: dict[str, Any]) -> str:
    """What the achieved density is to be read against: dense, the density setting, the target
    the method chose itself (Accordion, DGC's warm-up), or none (a method without a density:
    the casts, the quantisers, PowerSGD)."""
    name, setting = summary["reducer"], summary["target_density"]
    mean, unused = summary.get("mean_target_density"), summary.get("uses_density") is False
    if name == "exact":
        return "dense"
    if mean is not None and not math.isclose(mean, 1.0 if unused else setting, rel_tol=1e-6):
        return (f"target {mean:.4g} on average, chosen by {name}; "
                + (f"the density setting {setting:g} was not used" if unused else f"density setting {setting:g}"))
    if unused:
        return f"{name} does not use the density setting {setting:g}"
    return f"target {setting:g}"


def _metric(summary: dict[str, Any]) -> str:
    metric, best = summary["metric"], summary.get("best")
    finals = [(split, values[metric]) for split, values in summary.get("final", {}).items() if metric in values]
    if not finals:
        return "not evaluated"
    text = "final " + ", ".join(f"{value:.4g} ({split})" for split, value in finals)
    if best is not None:
        text += f"; best {best['value']:.4g} at epoch {round(best['epoch'], 3):g}"
    return text

