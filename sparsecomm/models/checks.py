"""Argument checks shared by the model constructors."""
from __future__ import annotations

import math
import operator
from typing import Any


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int if it is an integer >= 1 (bools refused), else ``ValueError``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def dropout_rate(name: str, value: Any) -> float:
    """``value`` as a float if it is a number in [0, 1), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 1) or math.isnan(value):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)
