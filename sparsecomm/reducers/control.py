"""Control: how a threshold moves from step to step.

Controllers are plain Python state machines on host floats. Every rank feeds them the
same numbers (taken from collectives), so every rank holds the same threshold.
"""
from __future__ import annotations

import math

__all__ = ["clamp_threshold", "MultiplicativeScaling", "SageScaling"]

# A threshold stays strictly positive and finite: at 0 every coordinate (zeros included)
# would pass, at infinity none ever could again.
_MIN_THRESHOLD = 1e-30
_MAX_THRESHOLD = 1e30


def clamp_threshold(value: float) -> float:
    if not math.isfinite(value):
        return _MAX_THRESHOLD if value > 0 else _MIN_THRESHOLD
    return min(_MAX_THRESHOLD, max(_MIN_THRESHOLD, value))


class MultiplicativeScaling:
    """ExDyna's online threshold scaling (Yoon & Oh, CCGrid 2024), also used by MiCRO.

    After each step, with r = (coordinates selected by all workers together) / k:
    ``lambda *= up`` if r > high, ``down`` if r <= low, and inside the band ``fine_up`` when
    r > 1, ``fine_down`` when r < 1 (unchanged at exactly 1). The authors' code multiplies by
    1.00125 everywhere inside the band (its 0.9987 branch is dead code); this follows the
    evident intent instead.
    """

    def __init__(self, k: int, threshold: float, up: float = 1.005, down: float = 0.995,
                 fine_up: float = 1.00125, fine_down: float = 0.9987,
                 low: float = 0.909, high: float = 1.1) -> None:
        self.k = max(1, k)
        self.threshold = clamp_threshold(threshold)
        self.up, self.down, self.fine_up, self.fine_down = up, down, fine_up, fine_down
        self.low, self.high = low, high

    def factor(self, selected: int) -> float:
        r = selected / self.k
        if r > self.high:
            return self.up
        if r <= self.low:
            return self.down
        if r > 1.0:
            return self.fine_up
        if r < 1.0:
            return self.fine_down
        return 1.0

    def update(self, selected: int) -> float:
        self.threshold = clamp_threshold(self.threshold * self.factor(selected))
        return self.threshold

    def state_dict(self) -> dict:
        return {"threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = float(state["threshold"])


class SageScaling:
    """SAGE's threshold rescaling (Yoon, Jeong & Oh, J. Supercomputing 2023).

    Step 0 keeps the initial threshold and records s_0, the sampled mean |x|. At step t >= 1:
    ``alpha = s_t / s_{t-1}`` (1 when either is 0); ``d_exam`` = fraction of coordinates with
    ``|x| >= lambda * alpha``; ``beta = 2 / (1 + exp(c - d_exam))``; ``gamma`` = 0.95 if
    ``d_exam / c < 0.1``, 1.05 if ``> 10``, else 1; ``lambda *= alpha * beta * gamma``.
    """

    def __init__(self, density: float, threshold: float) -> None:
        self.density = density
        self.threshold = clamp_threshold(threshold)
        self.previous_mean: float | None = None
        self.last = {"alpha": 1.0, "beta": 1.0, "gamma": 1.0, "exam_density": float("nan")}

    @property
    def started(self) -> bool:
        return self.previous_mean is not None

    def alpha(self, sampled_mean: float) -> float:
        prev = self.previous_mean
        if not prev or not sampled_mean or not math.isfinite(sampled_mean):
            return 1.0
        return sampled_mean / prev

    def update(self, sampled_mean: float, alpha: float, exam_density: float) -> float:
        """Apply step t's statistics; returns the threshold to select with."""
        c = self.density
        beta = 2.0 / (1.0 + math.exp(c - exam_density))
        ratio = exam_density / c
        gamma = 0.95 if ratio < 0.1 else 1.05 if ratio > 10.0 else 1.0
        self.threshold = clamp_threshold(self.threshold * alpha * beta * gamma)
        self.previous_mean = sampled_mean
        self.last = {"alpha": alpha, "beta": beta, "gamma": gamma, "exam_density": exam_density}
        return self.threshold

    def start(self, sampled_mean: float) -> None:
        """Step 0: remember s_0, keep the initial threshold."""
        self.previous_mean = sampled_mean

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "previous_mean": self.previous_mean}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = float(state["threshold"])
        self.previous_mean = None if state["previous_mean"] is None else float(state["previous_mean"])
