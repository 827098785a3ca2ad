"""Argument checks shared by model constructors and reducer options: each returns the value in
its canonical type or raises ``ValueError`` naming the argument, the rule and the bad value."""
from __future__ import annotations

import math
import operator
from typing import Any, Sequence

__all__ = ["positive_int", "nonnegative_int", "number", "boolean", "choice", "positive_ints", "dropout_rate"]


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def positive_int(name: str, value: Any, meaning: str = "") -> int:
    """An integer >= 1 (bools refused)."""
    number_ = _integer(value)
    if number_ is None or number_ < 1:
        raise ValueError(f"{name} must be a positive integer{_paren(meaning)}, got {value!r}")
    return number_


def nonnegative_int(name: str, value: Any, meaning: str = "") -> int:
    """An integer >= 0 (bools refused)."""
    number_ = _integer(value)
    if number_ is None or number_ < 0:
        raise ValueError(f"{name} must be an integer >= 0{_paren(meaning)}, got {value!r}")
    return number_


def number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False, meaning: str = "") -> float:
    """A finite real number in the given interval (bools refused)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be {_interval(low, high, low_open, high_open)}{_paren(meaning)}, "
                         f"got {value!r}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def choice(name: str, value: Any, allowed: Sequence[Any]) -> Any:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def positive_ints(name: str, values: Any, meaning: str = "") -> list[int]:
    """A list of integers >= 1."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) \
            or any(_integer(v) is None or _integer(v) < 1 for v in values):
        raise ValueError(f"{name} must be a list of positive integers{_paren(meaning)}, got {values!r}")
    return [int(v) for v in values]


def dropout_rate(name: str, value: Any) -> float:
    """A probability in [0, 1)."""
    return number(name, value, 0.0, 1.0, high_open=True)


def _paren(meaning: str) -> str:
    return f" ({meaning})" if meaning else ""


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is None and high is None:
        return "a finite number"
    if high is None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
