"""Numbers for people: SI prefixes for sizes and rates (no heavy imports: the trainer uses it)."""

from __future__ import annotations

__all__ = ["si"]

_SI = ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k"))


def si(value: float, unit: str) -> str:
    """``value`` with an SI prefix and ``unit``, three significant digits (4.8 MB, 589 kB)."""
    for scale, prefix in _SI:
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"
