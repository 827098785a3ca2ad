"""Control: how a threshold moves from step to step, and where it starts.

Controllers are plain Python state machines on host floats. Every rank feeds them the
same numbers (taken from collectives), so every rank holds the same threshold.

Two controllers per family: ``"paper"`` uses the published constants everywhere; ``"fast"``
keeps them inside a band around the target and moves faster outside it (the classes say how).
:func:`pooled_threshold` is the warm start: step 0's threshold from every worker's exact top-k
over its own selection domain.
"""
from __future__ import annotations

import math
from typing import Sequence

__all__ = ["CONTROLLERS", "clamp_threshold", "proportional_factor",
           "MultiplicativeScaling", "SageScaling", "pooled_threshold"]

# A threshold stays strictly positive and finite: at 0 every coordinate (zeros included)
# would pass, at infinity none ever could again.
_MIN_THRESHOLD = 1e-30
_MAX_THRESHOLD = 1e30

CONTROLLERS = ("fast", "paper")
# The fast controllers' constants, measured with bench/warm_start.py (docs/benchmarks.md). Near
# the cut-off, density moves by up to ~10x per e-fold of the threshold (and far more through
# residuals piled up under it), so proportional gains above ~0.2 overshoot and ring.
FAST_GAIN = 0.1
FAST_MAX_FACTOR = 2.0
FAST_ACCELERATION = 0.25
FAST_MAX_ACCELERATION = 1.5
# SAGE's fast controller acts outside this band of d_exam / c (the published gamma only outside
# 0.1-10, and beta is within a few percent of 1 at small c: no feedback inside a 100x band).
FAST_SAGE_BAND = (0.5, 2.0)


def clamp_threshold(value: float) -> float:
    if not math.isfinite(value):
        return _MAX_THRESHOLD if value > 0 else _MIN_THRESHOLD
    return min(_MAX_THRESHOLD, max(_MIN_THRESHOLD, value))


def proportional_factor(ratio: float, gain: float, max_factor: float) -> float:
    """``ratio ** gain`` limited to ``[1 / max_factor, max_factor]`` (0 gives the lower limit,
    infinity or NaN the upper)."""
    if not ratio < math.inf:
        return max_factor
    return min(max_factor, max(1.0 / max_factor, ratio ** gain if ratio > 0 else 0.0))


class MultiplicativeScaling:
    """ExDyna's online threshold scaling (Yoon & Oh, CCGrid 2024), also used by MiCRO.

    After each step, with r = (coordinates selected by all workers together) / k:
    ``lambda *= up`` if r > high, ``down`` if r <= low, and inside the band ``fine_up`` when
    r > 1, ``fine_down`` when r < 1 (unchanged at exactly 1). The authors' code multiplies by
    1.00125 everywhere inside the band (its 0.9987 branch is dead code); this follows the
    evident intent instead.

    ``fast=True`` keeps the band's steps and changes the two outside it. Above the band:
    ``max(up, min(max_factor, r ** gain))``, since too many coordinates passed and r says by
    how much. Below it, r says little: with error feedback, a threshold that comes down
    through residuals piled up under it releases them at a rate set by the step, not by the
    level, so proportional steps there burst and ring (measured). So downward steps start at
    ``down`` and grow, in log space, by ``min(max_acceleration, r ** -acceleration)`` at every
    further step below the band, up to a factor ``1 / max_factor``; any step inside or above
    the band starts them over.
    """

    def __init__(self, k: int, threshold: float, up: float = 1.005, down: float = 0.995,
                 fine_up: float = 1.00125, fine_down: float = 0.9987,
                 low: float = 0.909, high: float = 1.1, fast: bool = False) -> None:
        self.k = max(1, k)
        self.threshold = clamp_threshold(threshold)
        self.up, self.down, self.fine_up, self.fine_down = up, down, fine_up, fine_down
        self.low, self.high = low, high
        self.fast = fast
        self.gain, self.max_factor = FAST_GAIN, FAST_MAX_FACTOR
        self.acceleration, self.max_acceleration = FAST_ACCELERATION, FAST_MAX_ACCELERATION
        self.descent = 0.0  # the fast controller's current downward step, -log(factor); 0: none yet

    def factor(self, selected: int) -> float:
        """This step's multiplier for ``selected`` coordinates (it advances the fast
        controller's descent: call it once per step, as :meth:`update` does)."""
        r = selected / self.k
        if r <= self.low and self.fast:
            base = -math.log(self.down)
            if self.descent:
                speedup = self.max_acceleration if r <= 0 else min(self.max_acceleration, r ** -self.acceleration)
                self.descent = min(math.log(self.max_factor), max(base, self.descent * speedup))
            else:
                self.descent = base
            return math.exp(-self.descent)
        self.descent = 0.0
        if r > self.high:
            return max(self.up, proportional_factor(r, self.gain, self.max_factor)) if self.fast else self.up
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

    def start(self, threshold: float) -> None:
        """A warm start: select with ``threshold`` from now on."""
        self.threshold = clamp_threshold(threshold)

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "descent": self.descent}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = float(state["threshold"])
        self.descent = float(state.get("descent", 0.0))


class SageScaling:
    """SAGE's threshold rescaling (Yoon, Jeong & Oh, J. Supercomputing 2023).

    Step 0 keeps the initial threshold and records s_0, the sampled mean |x|. At step t >= 1:
    ``alpha = s_t / s_{t-1}`` (1 when either is 0); ``d_exam`` = fraction of coordinates with
    ``|x| >= lambda * alpha``; ``beta = 2 / (1 + exp(c - d_exam))``; ``gamma`` = 0.95 if
    ``d_exam / c < 0.1``, 1.05 if ``> 10``, else 1; ``lambda *= alpha * beta * gamma``.

    ``fast=True`` keeps alpha, beta and gamma = 1 inside ``0.5 <= d_exam / c <= 2`` and takes
    gamma = ``proportional_factor(d_exam / c)`` outside it. The band is narrower than the
    published 0.1-10 on purpose: beta stays within a few percent of 1 at small c, so inside
    0.1-10 nothing but the sampled alpha moves lambda, and density settles anywhere in a 100x
    band (measured: 12% of steps within 2x of target after a warm start). d_exam is counted on
    this step's vector before selecting, so this correction has no lag.
    """

    def __init__(self, density: float, threshold: float, fast: bool = False) -> None:
        self.density = density
        self.threshold = clamp_threshold(threshold)
        self.fast = fast
        self.gain, self.max_factor = FAST_GAIN, FAST_MAX_FACTOR
        self.low, self.high = FAST_SAGE_BAND
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

    def gamma(self, ratio: float) -> float:
        if self.fast and not self.low <= ratio <= self.high:
            return proportional_factor(ratio, self.gain, self.max_factor)
        return 0.95 if ratio < 0.1 else 1.05 if ratio > 10.0 else 1.0

    def update(self, sampled_mean: float, alpha: float, exam_density: float) -> float:
        """Apply step t's statistics; returns the threshold to select with."""
        c = self.density
        beta = 2.0 / (1.0 + math.exp(c - exam_density))
        gamma = self.gamma(exam_density / c)
        self.threshold = clamp_threshold(self.threshold * alpha * beta * gamma)
        self.previous_mean = sampled_mean
        self.last = {"alpha": alpha, "beta": beta, "gamma": gamma, "exam_density": exam_density}
        return self.threshold

    def start(self, sampled_mean: float, threshold: float | None = None) -> None:
        """Step 0: remember s_0; keep the initial threshold, or take ``threshold`` (a warm start)."""
        self.previous_mean = sampled_mean
        if threshold is not None:
            self.threshold = clamp_threshold(threshold)

    def state_dict(self) -> dict:
        return {"threshold": self.threshold, "previous_mean": self.previous_mean}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = float(state["threshold"])
        self.previous_mean = None if state["previous_mean"] is None else float(state["previous_mean"])


def pooled_threshold(values: Sequence[Sequence[float]], counts: Sequence[int], sizes: Sequence[int],
                     target: float) -> float | None:
    """The warm start's threshold: where the workers' selections together reach ``target``.

    Worker w searched a domain of ``sizes[w]`` coordinates and reported ``values[w][i]``, the
    ``min(counts[i], sizes[w])``-th largest |x| there (``counts`` ascending, the same for every
    worker: :func:`~sparsecomm.reducers.select.primitives.curve_counts`). Between those points a
    worker's count above lambda is interpolated linearly in log(count) against log(lambda); below
    its last point it grows as 1/lambda (up to its domain size), above its largest value it is 0.
    The result is the smallest reported value at which the summed estimate is at most
    ``target``, interpolated the same way towards the next reported value below it (where the
    sum exceeds ``target``; when there is none, that smallest value itself). Every rank
    computes it from the same table, in the same order, so every rank gets the same float.
    None when no worker reported a positive value.

    Why not the mean or median of per-worker thresholds: partitions differ (on NeuMF the
    partition holding the MLP layers has values 20-100x larger than those holding embeddings),
    and only counts add up; the pooled estimate gives the exact top-k count there, where the
    median is 3-23x off (measurements in docs/reducers.md).
    """
    curves = [[(min(int(n), size), float(v)) for n, v in zip(counts, vals)]
              for vals, size in zip(values, sizes) if size > 0]

    def estimate(points: list[tuple[int, float]], size: int, lam: float) -> float:
        j = -1
        while j + 1 < len(points) and points[j + 1][1] >= lam:
            j += 1
        if j < 0:
            return 0.0
        n_j, u_j = points[j]
        if j == len(points) - 1:
            return n_j if n_j >= size else min(float(size), n_j * (u_j / lam))
        n_k, u_k = points[j + 1]
        if u_k <= 0 or n_k <= n_j:
            return float(n_j)
        return n_j * (n_k / n_j) ** (math.log(u_j / lam) / math.log(u_j / u_k))

    live = [s for s in sizes if s > 0]

    def total(lam: float) -> float:
        out = 0.0
        for points, size in zip(curves, live):
            out += estimate(points, size, lam)
        return out

    candidates = sorted({u for points in curves for _, u in points if u > 0 and math.isfinite(u)}, reverse=True)
    if not candidates:
        return None
    lo, hi = -1, len(candidates)  # total(candidates[i]) <= target for i <= lo, > target for i >= hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if total(candidates[mid]) <= target:
            lo = mid
        else:
            hi = mid
    if lo < 0:
        return candidates[0]
    lam_a, t_a = candidates[lo], total(candidates[lo])
    if hi == len(candidates) or t_a <= 0 or t_a >= target:
        return lam_a
    lam_b, t_b = candidates[hi], total(candidates[hi])
    return lam_a * (lam_b / lam_a) ** (math.log(target / t_a) / math.log(t_b / t_a))
