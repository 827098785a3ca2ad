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
           "threshold_select_segments", "search_block", "ThresholdSearch", "sample_distinct", "slovin_sample_size",
           "allocate_k", "curve_counts", "top_curve"]


def target_count(density: float, n: int) -> int:
    """k = max(1, floor(c * n)), never more than n (0 for an empty vector)."""
    if n <= 0:
        return 0
    return min(n, max(1, math.floor(density * n * (1 + 1e-12))))


def initial_threshold(k: int) -> float:
    """Sahu et al.'s rule of thumb for a hard threshold matching top-k: 1 / (2 sqrt(k))."""
    return 1.0 / (2.0 * math.sqrt(max(1, k)))


def _abs(x: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """|x|, into ``scratch`` (a buffer at least as long as x) when given."""
    return x.abs() if scratch is None else torch.abs(x, out=scratch[:x.numel()])


def topk(x: torch.Tensor, k: int, index_dtype: torch.dtype, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Positions of the k largest |x| (unsorted)."""
    if k <= 0:
        return torch.empty(0, dtype=index_dtype, device=x.device)
    return torch.topk(_abs(x, scratch), k, sorted=False).indices.to(index_dtype)


def topk_per_segment(x: torch.Tensor, segments: Sequence[tuple[int, int]], ks: Sequence[int],
                     index_dtype: torch.dtype, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Layer-wise top-k: the ``ks[i]`` largest |x| inside each segment ``[a, b)``."""
    parts = [torch.topk(_abs(x[a:b], scratch), k, sorted=False).indices.add_(a)
             for (a, b), k in zip(segments, ks) if k > 0]
    if not parts:
        return torch.empty(0, dtype=index_dtype, device=x.device)
    return torch.cat(parts).to(index_dtype)


def threshold_select(x: torch.Tensor, threshold: float, index_dtype: torch.dtype,
                     start: int = 0, end: int | None = None, block: int = 0,
                     scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted positions p in ``[start, end)`` with ``|x[p]| >= threshold`` (NaN never passes).

    With ``block > 1`` the range is first cut into blocks of that many elements; a block is
    searched only if its maximum or minimum can pass. The result equals the direct search; at
    low densities it reads the vector about twice instead of about five times. Either way the
    host learns sizes at most twice (``nonzero``), however long the range. ``scratch`` (a float
    buffer as long as x) spares the direct search an allocation.
    """
    end = x.numel() if end is None else end
    if end <= start:
        return torch.empty(0, dtype=index_dtype, device=x.device)
    if block <= 1:
        return torch.nonzero(_abs(x[start:end], scratch) >= threshold).view(-1).add_(start).to(index_dtype)
    nb, tail = divmod(end - start, block)
    main = x[start:start + nb * block].view(nb, block)
    # A block is searched unless all of it lies strictly inside (-threshold, threshold); a
    # NaN makes its block's extremes NaN, so that block is searched too.
    cold = (main.amax(dim=1) < threshold) & (main.amin(dim=1) > -threshold)
    hot = torch.nonzero(cold.logical_not_()).view(-1)
    # index_select copies whole rows: 0.2 ms against 2.6 ms for main[hot] (11K rows of 64, one CPU thread)
    rows, row_starts = torch.index_select(main, 0, hot), hot.mul_(block).add_(start)
    if tail:  # the partial last block joins as one zero-padded row (zeros never pass)
        last = torch.zeros(1, block, dtype=x.dtype, device=x.device)
        last[0, :tail] = x[end - tail:end]
        rows = torch.cat([rows, last])
        row_starts = torch.cat([row_starts, torch.tensor([end - tail], device=x.device)])
    hit = torch.nonzero(rows.abs() >= threshold)
    return row_starts[hit[:, 0]].add_(hit[:, 1]).to(index_dtype)


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


def allocate_k(norms: Sequence[float], sizes: Sequence[int], k: int) -> list[int]:
    """Share k among units in proportion to their norms, as DEFT's authors' code does: largest
    norm first (ties: lower unit first), ``temp = int(remain_k * (norm / remain_norm))``,
    ``k_u = size if size < temp else max(1, temp)``, then ``remain_k -= k_u`` and
    ``remain_norm -= norm``. Each unit gets at least 1 and at most its size. Whatever is left of
    k at the end (units capped at their size, float rounding) is handed out again in the same
    order, up to each unit's size (the second pass of the authors' code). With all norms 0
    every unit starts from 1."""
    order = sorted(range(len(norms)), key=lambda u: -norms[u])
    ks = [0] * len(norms)
    remain_k, remain_norm = k, float(sum(norms))
    for u in order:
        size, norm = sizes[u], norms[u]
        if remain_norm > 0 and remain_k > 0:
            share = remain_k * (norm / remain_norm)
            temp = size + 1 if share >= size + 1 else int(share)  # share may be huge or inf
        else:
            temp = 0
        ks[u] = size if size < temp else max(1, temp)
        remain_k -= ks[u]
        remain_norm -= norm
    for u in order:
        if remain_k <= 0:
            break
        more = min(sizes[u] - ks[u], remain_k)
        ks[u] += more
        remain_k -= more
    return ks


def slovin_sample_size(n: int, e: float = 0.05) -> int:
    """Slovin's formula n / (1 + n e^2): about 400 for large n at e = 0.05."""
    return int(n / (1.0 + n * e * e))


def threshold_select_segments(x: torch.Tensor, thresholds: Sequence[float], segments: Sequence[tuple[int, int]],
                              index_dtype: torch.dtype) -> torch.Tensor:
    """Per-segment thresholds: sorted positions in segment i with ``|x| >= thresholds[i]``.
    One mask over the whole vector, one ``nonzero``: no host round-trip per segment."""
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    for t, (a, b) in zip(thresholds, segments):
        torch.ge(x[a:b].abs(), t, out=mask[a:b])
    return torch.nonzero(mask).view(-1).to(index_dtype)


def search_block(expected_fraction: float) -> int:
    """Block length for :func:`threshold_select` when about ``expected_fraction`` of the range
    passes: blocks pay off while few of them hold a passing coordinate. The break-even points
    were measured on 11M float32 values on one CPU thread (``bench/threshold_search.py``)."""
    if expected_fraction <= 0.0015:
        return 64
    if expected_fraction <= 0.005:
        return 32
    return 0


class ThresholdSearch:
    """:func:`threshold_select` whose block length follows the fraction of the searched range
    that passed on the previous call (a guide for speed only: results never depend on it)."""

    def __init__(self, expected_fraction: float) -> None:
        self.fraction = expected_fraction

    def __call__(self, x: torch.Tensor, threshold: float, index_dtype: torch.dtype, start: int = 0,
                 end: int | None = None, scratch: torch.Tensor | None = None) -> torch.Tensor:
        end = x.numel() if end is None else end
        found = threshold_select(x, threshold, index_dtype, start, end, search_block(self.fraction), scratch)
        if end > start:
            self.fraction = found.numel() / (end - start)
        return found


def curve_counts(top: int) -> list[int]:
    """The counts at which the warm start reads a worker's largest |x|: ``top``, halved (rounding
    up) until 1, in ascending order (``[1, 2, 3, 5, 10]`` for 10): about log2(top) + 1 points."""
    counts = [max(1, top)]
    while counts[-1] > 1:
        counts.append((counts[-1] + 1) // 2)
    return counts[::-1]


def top_curve(x: torch.Tensor, counts: Sequence[int], start: int = 0, end: int | None = None,
              scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The ``min(n, size)``-th largest |x| in ``[start, end)`` for each n of ``counts`` (a 1-D
    tensor on x's device; zeros for an empty range): one sorted top-k of ``max(counts)``."""
    end = x.numel() if end is None else end
    size = end - start
    if size <= 0 or not counts:
        return torch.zeros(len(counts), dtype=x.dtype, device=x.device)
    top = torch.topk(_abs(x[start:end], scratch), min(max(counts), size), sorted=True).values
    at = torch.tensor([min(n, size) - 1 for n in counts], device=x.device)
    return top[at]
