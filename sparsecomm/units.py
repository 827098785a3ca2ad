"""Numbers for people: SI prefixes for sizes and rates, durations (no heavy imports: the trainer uses it)."""

from __future__ import annotations

__all__ = ["si", "duration", "seconds"]

_SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def si(value: float, unit: str) -> str:
    """``value`` with an SI prefix and ``unit``, three significant digits (4.8 MB, 589 kB)."""
    for scale, prefix in _SI:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def duration(seconds: float) -> str:
    """12.3 s, 4 min 10 s, 2 h 05 min, 3 d 4 h: rounded to the second, then shown to the unit
    after the largest."""
    if seconds < 60:
        return f"{seconds:.3g} s"
    s = round(seconds)
    if s >= 86400:
        return f"{s // 86400} d {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s"


def seconds(value: float) -> str:
    """A short time, three significant digits: 12.3 ms, 1.87 s, 412 s."""
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"
