"""Selection: which coordinates of the compensated vector a worker sends.

Plain-torch pieces, each returning sorted or unsorted positions into the flat vector as a
1-D integer tensor of the layout's index dtype. No piece reads a value back to the host
except through the size of its result (``nonzero`` must learn how many coordinates passed).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["target_count", "initial_threshold", "topk", "topk_per_segment", "threshold_select",
           "sample_distinct", "slovin_sample_size"]


def target_count(density: float, n: int) -> int:
    """k = max(1, floor(c * n)), never more than n (0 for an empty vector)."""
    if n <= 0:
        return 0
    return min(n, max(1, math.floor(density * n * (1 + 1e-12))))


def initial_threshold(k: int) -> float:
    """Sahu et al.'s rule of thumb for a hard threshold matching top-k: 1 / (2 sqrt(k))."""
    return 1.0 / (2.0 * math.sqrt(max(1, k)))


def topk(x: torch.Tensor, k: int, index_dtype: torch.dtype) -> torch.Tensor:
    """Positions of the k largest |x| (unsorted)."""
    if k <= 0:
        return torch.empty(0, dtype=index_dtype, device=x.device)
    return torch.topk(x.abs(), k, sorted=False).indices.to(index_dtype)


def topk_per_segment(x: torch.Tensor, segments: Sequence[tuple[int, int]], ks: Sequence[int],
                     index_dtype: torch.dtype) -> torch.Tensor:
    """Layer-wise top-k: the ``ks[i]`` largest |x| inside each segment ``[a, b)``."""
    parts = [torch.topk(x[a:b].abs(), k, sorted=False).indices.add_(a)
             for (a, b), k in zip(segments, ks) if k > 0]
    if not parts:
        return torch.empty(0, dtype=index_dtype, device=x.device)
    return torch.cat(parts).to(index_dtype)


def threshold_select(x: torch.Tensor, threshold: float, index_dtype: torch.dtype,
                     start: int = 0, end: int | None = None, block: int = 0) -> torch.Tensor:
    """Sorted positions p in ``[start, end)`` with ``|x[p]| >= threshold`` (NaN never passes).

    With ``block > 1`` the range is first cut into blocks of that many elements; a block is
    searched only if its maximum or minimum passes. The result is the same as the direct
    search; at low densities it reads the vector about twice instead of about five times.
    """
    end = x.numel() if end is None else end
    if end <= start:
        return torch.empty(0, dtype=index_dtype, device=x.device)
    if block <= 1:
        return _direct(x[start:end], threshold).add_(start).to(index_dtype)
    nb = (end - start) // block
    main = x[start:start + nb * block].view(nb, block)
    # A block is searched unless all of it lies strictly inside (-threshold, threshold); a
    # NaN makes its block's extremes NaN, so that block is searched too.
    cold = (main.amax(dim=1) < threshold) & (main.amin(dim=1) > -threshold)
    hot = torch.nonzero(cold.logical_not_()).view(-1)
    rows = main[hot]
    hit = torch.nonzero(rows.abs() >= threshold)
    found = hot[hit[:, 0]].mul_(block).add_(hit[:, 1]).add_(start)
    tail = _direct(x[start + nb * block:end], threshold).add_(start + nb * block)
    return torch.cat([found, tail]).to(index_dtype)


def _direct(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return torch.nonzero(x.abs() >= threshold).view(-1)


def sample_distinct(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct positions drawn uniformly from range(n) (a uniform random k-subset), sorted.

    Draws with replacement until k distinct values have appeared and keeps the first k
    distinct ones; by symmetry that set is uniform over all k-subsets. Cost O(k log k),
    unlike a permutation of all n positions.
    """
    if not 0 <= k <= n:
        raise ValueError(f"cannot draw {k} distinct positions out of {n}")
    if k == 0:
        return torch.empty(0, dtype=torch.int64)
    if 2 * k > n:  # dense regime: a permutation is cheap relative to k
        return torch.sort(torch.randperm(n, generator=generator)[:k]).values
    draws = torch.empty(0, dtype=torch.int64)
    while True:
        extra = k - _distinct_count(draws) + 16 + (2 * k * k) // n
        draws = torch.cat([draws, torch.randint(0, n, (extra,), generator=generator)])
        if _distinct_count(draws) >= k:
            break
    values, order = torch.sort(draws, stable=True)
    first = torch.ones_like(values, dtype=torch.bool)
    first[1:] = values[1:] != values[:-1]
    first_positions = torch.sort(order[first]).values[:k]
    return torch.sort(draws[first_positions]).values


def _distinct_count(t: torch.Tensor) -> int:
    return int(torch.unique(t).numel()) if t.numel() else 0


def slovin_sample_size(n: int, e: float = 0.05) -> int:
    """Slovin's formula n / (1 + n e^2): about 400 for large n at e = 0.05."""
    return int(n / (1.0 + n * e * e))


def threshold_select_segments(x: torch.Tensor, thresholds: Sequence[float], segments: Sequence[tuple[int, int]],
                              index_dtype: torch.dtype, block: int = 0) -> torch.Tensor:
    """Per-segment thresholds: positions in segment i with ``|x| >= thresholds[i]``, sorted."""
    parts = [threshold_select(x, t, index_dtype, a, b, block) for t, (a, b) in zip(thresholds, segments)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=index_dtype, device=x.device)


def search_block(density: float) -> int:
    """Block length for :func:`threshold_select` at an expected density: long blocks while
    few of them hold a passing coordinate, the direct search when most would."""
    if density > 1.0 / 256:
        return 0
    return 128
