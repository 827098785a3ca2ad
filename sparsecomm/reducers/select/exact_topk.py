"""Exact top-k with one tie rule, found in about two passes over the vector.

The rule, which every path here obeys: inside each range ``[a, b)`` with its count ``k``, the
``min(k, b - a)`` positions of largest ``|x|``; among equal ``|x|`` the lower position first;
NaN ranks above +Inf (torch.topk's order). Positions come back sorted. (torch.topk alone
leaves the choice among equal values unspecified, and its CPU and CUDA kernels differ.)

- :func:`reference`: the rule in plain torch, a method's ``selection="torch"``: per range,
  torch.topk for the k-th largest ``|x|``, then every position above it and the first ones
  equal to it.
- :class:`TopKSearch`: the same positions without torch.topk over the ranges, a method's
  ``selection="fused"``:

  1. a bound at or below each range's k-th largest ``|x|`` from a sample of ``x`` (positions
     drawn once, seeded, the same on every rank; a range no longer than the sample is read
     whole, and its bound is its exact k-th largest); on CPU one C call for all ranges;
  2. the fused pass of :mod:`.fused` over the whole vector: ``x = g + m`` written,
     finiteness checked, the positions with ``|x|`` at or above their range's bound compacted
     (a C loop on CPU, Triton on CUDA);
  3. the rule applied to those candidates (about 3k of them; on CPU one C call for all
     ranges, a quickselect per range, in place);
  4. where fewer than k passed (the sample put the bound too high: rare), that range alone is
     read again from ``x`` with a lower bound from the sample, in the end zero.

  A vector that is not all finite is left to :func:`reference` (the handshake then refuses or
  skips the step; the selection is still the rule's).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ...validate import choice
from .fused import SELECTIONS, Selected, resolve
from .primitives import sample_distinct

__all__ = ["top_of", "rest_of", "top_into", "reference", "TopKSearch", "TopKSelection", "sample_size"]

HITS = 4  # sampled values expected above a range's k-th largest |x|
SAMPLE_MIN, SAMPLE_MAX = 1024, 65536


def top_of(a: torch.Tensor, k: int, finite: bool = False) -> torch.Tensor:
    """Sorted int64 positions of the ``min(k, len)`` largest of the magnitudes ``a`` (1-D,
    no negative values) by the rule: equal values, lower position first; NaN above all.
    ``finite``: the caller knows there is no NaN (spares a pass)."""
    n = a.numel()
    if k >= n:
        return torch.arange(n, device=a.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=a.device)
    if 8 * k > n:  # a selection of the (n - k + 1)-th smallest; NaN counts as the largest
        kth = torch.kthvalue(a, n - k + 1).values
    else:  # the k + 1 largest, NaN first: no tie across the k-th, and torch.topk's k are the rule's
        top = torch.topk(a, k + 1, sorted=True)
        kth, after = top.values[k - 1], top.values[k]
        if bool((kth > after) | (torch.isnan(kth) & ~torch.isnan(after))):
            return torch.sort(top.indices[:k]).values
    keep = torch.gt(a, kth)
    if not finite:
        nan = torch.isnan(a)
        if bool(torch.isnan(kth)):
            return torch.nonzero(nan).view(-1)[:k]
        keep.logical_or_(nan)
    need = k - int(keep.sum())
    if need > 0:
        keep[torch.nonzero(a == kth).view(-1)[:need]] = True
    return torch.nonzero(keep).view(-1)


PIECE = 1 << 18
"""Positions found at a time by :func:`rest_of` and :func:`top_into` (a piece of the range:
their int64 temporaries stay this small however long the range)."""


def rest_of(a: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted int64 positions that :func:`top_of` ``(a, k)`` leaves out: the ``n - k`` smallest
    magnitudes by the rule read backwards (equal values: the higher position leaves first; NaN
    last). Found from the ``n - k + 1`` smallest, so a ``k`` near ``n`` costs temporaries of
    ``n - k`` positions and a mask of ``n`` bytes, never a vector of the kept positions."""
    n = a.numel()
    m = n - k
    if m <= 0:
        return torch.empty(0, dtype=torch.int64, device=a.device)
    if k <= 0:
        return torch.arange(n, device=a.device)
    low = torch.topk(a, m + 1, largest=False, sorted=True)  # NaN sorts last
    last, after = low.values[m - 1], low.values[m]
    if bool(torch.isnan(last)):  # more than k NaN: the rule keeps the first k of them
        keep = torch.zeros(n, dtype=torch.bool, device=a.device)
        keep[top_of(a, k)] = True
        return torch.nonzero(keep.logical_not_()).view(-1)
    if bool((last < after) | torch.isnan(after)):  # no tie across the boundary
        return torch.sort(low.indices[:m]).values
    below = torch.nonzero(torch.lt(a, last)).view(-1)
    need, end, ties = m - below.numel(), n, []
    while need > 0:  # the last `need` positions equal to the boundary value, a piece at a time from the end
        start = max(0, end - PIECE)
        equal = torch.nonzero(a[start:end] == last).view(-1)
        taken = equal[max(0, equal.numel() - need):]
        ties.append(taken.add_(start))
        need, end = need - taken.numel(), start
    return torch.sort(torch.cat([below, *ties])).values


def top_into(a: torch.Tensor, k: int, out: torch.Tensor) -> torch.Tensor:
    """Write the ``min(k, n)`` positions of :func:`top_of` ``(a, k)`` into ``out`` (any integer
    dtype, at least that long) and return that part of it. Where ``k > n / 2`` they are the
    complement of :func:`rest_of`, written a piece at a time: no int64 vector of ``k``."""
    n = a.numel()
    k = max(0, min(k, n))
    if 2 * k <= n:
        return out[:k].copy_(top_of(a, k))
    keep = torch.ones(n, dtype=torch.bool, device=a.device)
    keep[rest_of(a, k)] = False
    at = 0
    for start in range(0, n, PIECE):
        found = torch.nonzero(keep[start:start + PIECE]).view(-1)
        out[at:at + found.numel()].copy_(found.add_(start))
        at += found.numel()
    return out[:k]


def _ordered(ranges: Sequence[tuple[int, int]], ks: Sequence[int]) -> list[tuple[int, int, int]]:
    """(a, b, k) by ascending start, ranges with nothing to select left out; raises on overlap."""
    rows = sorted((a, b, min(k, b - a)) for (a, b), k in zip(ranges, ks) if k > 0 and b > a)
    for (_, b0, _), (a1, _, _) in zip(rows, rows[1:]):
        if a1 < b0:
            raise ValueError(f"top-k ranges overlap at position {a1}")
    return rows


def reference(x: torch.Tensor, ranges: Sequence[tuple[int, int]], ks: Sequence[int], index_dtype: torch.dtype,
              scratch: torch.Tensor | None = None) -> torch.Tensor:
    """The rule in plain torch: sorted positions of the ``ks[i]`` largest ``|x|`` inside each
    of the disjoint ``ranges[i]`` (``scratch``: a float buffer as long as x, for ``|x|``)."""
    parts = []
    for a, b, k in _ordered(ranges, ks):
        mag = torch.abs(x[a:b], out=scratch[:b - a]) if scratch is not None else x[a:b].abs()
        parts.append(top_of(mag, k).add_(a))
    if not parts:
        return torch.empty(0, dtype=index_dtype, device=x.device)
    return torch.cat(parts).to(index_dtype)


def sample_size(sizes: Sequence[int], ks: Sequence[int]) -> int:
    """Positions sampled per range: about ``HITS`` of them expected above the k-th largest at the
    ranges' overall density, rounded up to a power of two (methods whose counts move from step
    to step then keep their samples), within [1024, 65536]."""
    n, k = sum(sizes), sum(ks)
    if k <= 0:
        return SAMPLE_MIN
    return min(SAMPLE_MAX, max(SAMPLE_MIN, 1 << math.ceil(math.log2(HITS * n / k))))


def _sample_rank(k: int, n: int, s: int) -> int:
    """Which largest of s sampled |x| (out of n) to take as the bound: the expected count above
    the k-th largest, k s / n, plus three of its standard deviations and two."""
    mu = k * s / n
    return min(s, math.ceil(mu + 3 * math.sqrt(mu)) + 2)


@dataclass
class _Batch:
    """The C backend's arguments for every range of one fused pass, fixed per plan (one C call
    each for the bounds, the pass and the rule, whatever the number of ranges)."""

    read: list[int]  # the tiles read, ascending
    bounds: torch.Tensor  # (tiles, 2) int64: [a, b)
    offsets: torch.Tensor  # per tile: where its sample starts in positions; -1: read whole
    lengths: torch.Tensor  # per tile: its sample's length
    positions: torch.Tensor  # the sampled positions of the tiles not read whole, tile after tile
    ranks: torch.Tensor  # per tile: which largest sampled |x| is the bound; 0: selects nothing
    ks: torch.Tensor  # per tile: its count (0: selects nothing)
    caps: torch.Tensor  # per tile: room for its candidates
    slots: torch.Tensor  # per tile: where its room starts
    room: int  # all tiles' room
    longest: int  # the longest sample or room: the scratch the C calls need


@dataclass
class _Plan:
    """What :class:`TopKSearch` fixes at its first call for a vector of ``n`` values: the
    ranges tiling it (``k`` 0 on those with nothing to select), the sample."""

    n: int
    tiles: list[tuple[int, int, int]]  # (a, b, k), covering [0, n)
    chosen: list[int]  # the tiles with k > 0: rows of the sample
    s: int  # positions sampled per range (a range no longer than s: all of it)
    padding: torch.Tensor  # (rows, s) True past a row's last sampled position
    sampled: torch.Tensor  # the sampled positions, row after row
    ranks: list[int]  # per row: which largest sampled |x| is the bound
    whole: list[bool]  # per row: the range was sampled whole (its bound is exact)
    caps: list[int]  # per row: room for its candidates at its first bound
    rows: list[torch.Tensor | None]  # per row: its sampled positions (None: read whole)
    batches: dict[bool, _Batch]  # the C backend's, for reading every tile (True) or the chosen ones


class TopKSearch:
    """The fast path of the rule (module docstring) for fixed ``ranges`` and counts ``ks``;
    called as the search of :meth:`~sparsecomm.reducers.base.ReduceCall.select_in_pass`:
    ``search(g, m, x, index_dtype) -> (x, Selected)``, with :func:`~.fused.compensate_select`'s
    ``g, m, x`` contract. ``backend``: ``"c"`` or ``"triton"`` (default: by device).
    ``last``: the previous call's ``{"candidates": ..., "repassed": ...}`` (the fraction of the
    vector read again because too few passed).

    On the C backend the bounds of all ranges, the pass and the rule over all candidates are
    one C call each (:meth:`_batch`), so many ranges (one per layer) cost no Python per range;
    only a range where too few passed, or more than its room, goes through the per-range loop.
    On Triton the bounds come from one batched torch selection over the sample, and the
    kernels and the rule run per range."""

    def __init__(self, ranges: Sequence[tuple[int, int]], ks: Sequence[int], seed: int = 0,
                 backend: str | None = None, samples: dict | None = None) -> None:
        self.rows = _ordered(ranges, ks)
        self.seed = seed
        self.backend = backend
        self.samples = {} if samples is None else samples  # (a, b, s) -> sampled positions, kept across searches
        self._plan: _Plan | None = None
        self.last: dict[str, float] = {}

    def _plan_for(self, n: int, device: torch.device) -> _Plan:
        plan = self._plan
        if plan is not None and plan.n == n and plan.sampled.device == device:
            return plan
        if self.rows and self.rows[-1][1] > n:
            raise ValueError(f"top-k range ends at {self.rows[-1][1]}, past the vector's {n} values")
        tiles, at = [], 0
        for a, b, k in self.rows:
            if a > at:
                tiles.append((at, a, 0))
            tiles.append((a, b, k))
            at = b
        if at < n or not tiles:
            tiles.append((at, n, 0))
        s = sample_size([b - a for a, b, _ in self.rows], [k for _, _, k in self.rows])
        chosen = [i for i, (_, _, k) in enumerate(tiles) if k > 0]
        positions = torch.zeros(len(chosen), s, dtype=torch.int64)  # padding at position 0
        padding = torch.zeros(len(chosen), s, dtype=torch.bool)
        ranks, whole, rows = [], [], []
        for row, i in enumerate(chosen):
            a, b, k = tiles[i]
            size = b - a
            if size <= s:
                positions[row, :size] = torch.arange(a, b)
                padding[row, size:] = True
                ranks.append(k)
                whole.append(True)
                rows.append(None)
            else:
                key = (a, b, s)
                if key not in self.samples:
                    gen = torch.Generator().manual_seed(self.seed + a)
                    self.samples[key] = sample_distinct(size, s, gen).add_(a)
                positions[row] = self.samples[key]
                ranks.append(_sample_rank(k, size, s))
                whole.append(False)
                rows.append(self.samples[key])
        self._plan = plan = _Plan(n, tiles, chosen, s, padding.to(device), positions[~padding].to(device),
                                  ranks, whole, [], rows, {})
        plan.caps = [self._capacity(plan, row) for row in range(len(chosen))]
        return plan

    @staticmethod
    def _batch(plan: _Plan, every: bool) -> _Batch:
        """The C calls' arguments for a pass over every tile (``every``) or the chosen ones."""
        batch = plan.batches.get(every)
        if batch is not None:
            return batch
        read = list(range(len(plan.tiles))) if every else plan.chosen
        row_of = {i: row for row, i in enumerate(plan.chosen)}
        offsets, lengths, ranks, ks, caps, parts, at, longest = [], [], [], [], [], [], 0, 1
        for i in read:
            row = row_of.get(i)
            sample = None if row is None else plan.rows[row]
            a, b, k = plan.tiles[i]
            offsets.append(at if sample is not None else -1)
            lengths.append(0 if sample is None else sample.numel())
            ranks.append(0 if row is None else plan.ranks[row])
            ks.append(k)
            caps.append(0 if row is None else plan.caps[row])
            if sample is not None:
                parts.append(sample)
                at += sample.numel()
            reads = 0 if row is None else b - a if sample is None else sample.numel()  # for the bound
            longest = max(longest, caps[-1], reads)
        slots = [0]
        for c in caps:
            slots.append(slots[-1] + c)

        def longs(v: list[int]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.int64)

        batch = plan.batches[every] = _Batch(
            read, longs([[a, b] for a, b, _ in (plan.tiles[i] for i in read)]).view(-1, 2), longs(offsets),
            longs(lengths), torch.cat(parts) if parts else longs([0]), longs(ranks), longs(ks), longs(caps),
            longs(slots[:-1]), slots[-1], longest)
        return batch

    def __call__(self, g: torch.Tensor, m: torch.Tensor | None, x: torch.Tensor | None,
                 index_dtype: torch.dtype) -> tuple[torch.Tensor, Selected]:
        n = g.numel()
        xs = g if x is None else x
        plan = self._plan_for(n, g.device)
        backend = self.backend or ("triton" if g.device.type == "cuda" else "c")
        every = not (m is None and x is None)  # only the tiles that select when nothing is written
        if backend == "c":
            return self._search_c(plan, g, m, x, xs, index_dtype, every)
        # 1. the bounds, from the sample (|g + m| there is |x| there, bit for bit)
        sampled = _sample_matrix(plan, g, m)
        order = torch.topk(sampled, max(plan.ranks), dim=1).values if plan.chosen else sampled
        ranks = torch.tensor(plan.ranks, device=g.device).sub_(1).view(-1, 1)
        bounds = order.gather(1, ranks).view(-1).tolist() if plan.chosen else []
        thresholds, caps = [math.nan] * len(plan.tiles), [0] * len(plan.tiles)
        for row, i in enumerate(plan.chosen):
            thresholds[i], caps[i] = bounds[row], plan.caps[row]
        # 2. the fused pass over every tile (only over those that select when nothing is written)
        read = range(len(plan.tiles)) if every else plan.chosen
        got, finite = _pass(backend, g, m, x, [plan.tiles[i] for i in read], [thresholds[i] for i in read],
                            [caps[i] for i in read], index_dtype)
        if not finite:
            return xs, self._reference(xs, index_dtype)
        return self._finish(plan, backend, g, m, xs, dict(zip(read, got)), thresholds, sampled, index_dtype)

    def _search_c(self, plan: _Plan, g: torch.Tensor, m: torch.Tensor | None, x: torch.Tensor | None,
                  xs: torch.Tensor, index_dtype: torch.dtype, every: bool) -> tuple[torch.Tensor, Selected]:
        """Steps 1 to 3 as three C calls over all ranges; the per-range loop only where a range
        must be read again."""
        from . import fused_cpu
        batch = self._batch(plan, every)
        scratch = torch.empty(batch.longest, dtype=g.dtype)
        thresholds = torch.empty(len(batch.read), dtype=g.dtype)
        fused_cpu.sample_bounds(g, m, batch.bounds, batch.offsets, batch.lengths, batch.positions, batch.ranks,
                                thresholds, scratch)
        idx = torch.empty(batch.room + 1, dtype=index_dtype)
        val = torch.empty(batch.room + 1, dtype=g.dtype)
        counts, finite = fused_cpu.compensate_select_ranges(g, m, x, batch.bounds, thresholds, idx, val,
                                                            batch.slots, batch.caps)
        if not finite:
            return xs, self._reference(xs, index_dtype)
        if bool(((counts < batch.ks) | (counts > batch.caps)).any()):  # rare: some range is read again
            found = {i: (idx[slot:slot + min(c, cap)], val[slot:slot + min(c, cap)], c) for i, c, cap, slot in
                     zip(batch.read, counts.tolist(), batch.caps.tolist(), batch.slots.tolist())}
            full = [math.nan] * len(plan.tiles)
            for i, t in zip(batch.read, thresholds.tolist()):
                full[i] = t
            return self._finish(plan, "c", g, m, xs, found, full, None, index_dtype)
        kept = fused_cpu.keep_top_ranges(idx, val, batch.slots, counts, batch.ks, scratch)
        self.last = {"candidates": int(counts.sum()), "repassed": 0.0}
        if 2 * kept < idx.numel():  # the buffers hold room for about 3k: not kept through the exchange
            return xs, Selected(idx[:kept].clone(), val[:kept].clone(), finite)
        return xs, Selected(idx[:kept], val[:kept], finite)

    def _reference(self, xs: torch.Tensor, index_dtype: torch.dtype) -> Selected:
        """A vector not all finite: the rule by :func:`reference`."""
        idx = reference(xs, [(a, b) for a, b, _ in self.rows], [k for _, _, k in self.rows], index_dtype)
        return Selected(idx, xs[idx], False)

    def _finish(self, plan: _Plan, backend: str, g: torch.Tensor, m: torch.Tensor | None, xs: torch.Tensor,
                found: dict, thresholds: list[float], sampled: torch.Tensor | None, index_dtype: torch.dtype
                ) -> tuple[torch.Tensor, Selected]:
        """Steps 4 and 3 range by range, from the pass's candidates ``found`` (tile -> (positions,
        values, count)) at ``thresholds`` (per tile). ``sampled``: the sample's |x| per row
        (None: drawn here if a range needs a lower bound)."""
        n = g.numel()
        # 4. the ranges where too few passed (or more than their buffer held), read again from x
        repassed, rank_now = 0, dict(enumerate(plan.ranks))
        while True:
            again = []
            for row, i in enumerate(plan.chosen):
                a, b, k = plan.tiles[i]
                idx, val, count = found[i]
                if count < k:
                    if sampled is None:
                        sampled = _sample_matrix(plan, xs, None)
                    rank_now[row], thresholds[i] = self._lower(plan, sampled, row, rank_now[row])
                    again.append((i, self._capacity(plan, row, rank_now[row])))
                elif count > idx.numel():
                    again.append((i, count))
            if not again:
                break
            redo, _ = _pass(backend, xs, None, None, [plan.tiles[i] for i, _ in again],
                            [thresholds[i] for i, _ in again], [c for _, c in again], index_dtype)
            for (i, _), got in zip(again, redo):
                found[i] = got
                repassed += plan.tiles[i][1] - plan.tiles[i][0]
        # 3. the rule over the candidates
        parts_i, parts_v, candidates = [], [], 0
        most = max((found[i][2] for i in plan.chosen), default=0)
        scratch = torch.empty(most, dtype=g.dtype) if backend == "c" else None
        for i in plan.chosen:
            k = plan.tiles[i][2]
            idx, val, count = found[i]
            candidates += count
            if count > k and scratch is not None:  # the C loop's buffers: the rule in place
                from . import fused_cpu
                fused_cpu.keep_top(idx, val, k, scratch)
                idx, val = idx[:k], val[:k]
            elif count > k:
                keep = top_of(val.abs(), k, finite=True)
                idx, val = idx[keep], val[keep]
            parts_i.append(idx)
            parts_v.append(val)
        self.last = {"candidates": candidates, "repassed": repassed / n if n else 0.0}
        if not parts_i:
            return xs, Selected(torch.empty(0, dtype=index_dtype, device=g.device),
                                torch.empty(0, dtype=g.dtype, device=g.device), True)
        return xs, Selected(torch.cat(parts_i), torch.cat(parts_v), True)

    @staticmethod
    def _capacity(plan: _Plan, row: int, rank: int | None = None) -> int:
        """Room for a range's candidates: k plus room for ties when its bound is exact, else the
        expected count above the sample's ``rank``-th largest, (b - a) rank / s, plus five of
        its relative deviations 1 / sqrt(rank), plus 64 (more costs a second read of the range)."""
        a, b, k = plan.tiles[plan.chosen[row]]
        if plan.whole[row] and rank is None:
            return min(b - a, k + 16)
        s = plan.s
        rank = plan.ranks[row] if rank is None else rank
        return min(b - a, math.ceil((b - a) * rank / s * (1 + 5 / math.sqrt(rank))) + 64)

    @staticmethod
    def _lower(plan: _Plan, sampled: torch.Tensor, row: int, rank: int) -> tuple[int, float]:
        """(rank, bound) for a range where too few passed: a deeper rank of its sample
        (4 rank + 16), then zero (everything passes) once the sample is used up."""
        s = plan.s
        if plan.whole[row] or rank >= s:
            return s, 0.0
        deeper = min(s, 4 * rank + 16)
        return deeper, float(torch.topk(sampled[row], deeper).values[-1])


def _sample_matrix(plan: _Plan, g: torch.Tensor, m: torch.Tensor | None) -> torch.Tensor:
    """The sample's ``|m + g|`` (m None: ``|g|``), one row per range that selects, -1 past a
    row's last sampled position (below every ``|x|``)."""
    values = torch.index_select(g, 0, plan.sampled)  # index_select: 40x faster than g[2-D positions]
    if m is not None:
        values = torch.add(torch.index_select(m, 0, plan.sampled), values)
    sampled = torch.full(plan.padding.shape, -1.0, dtype=g.dtype, device=g.device)
    sampled.masked_scatter_(plan.padding.logical_not(), values.abs_())
    return sampled


def _pass(backend: str, g: torch.Tensor, m: torch.Tensor | None, x: torch.Tensor | None,
          tiles: list[tuple[int, int, int]], thresholds: list[float], caps: list[int],
          index_dtype: torch.dtype) -> tuple[list[tuple[torch.Tensor, torch.Tensor, int]], bool]:
    """One fused pass over ``tiles`` (``x`` written over each when given): per tile its
    candidates' sorted positions and values (at most its cap of them) and how many passed."""
    slots = [0]
    for c in caps:
        slots.append(slots[-1] + c)
    idx = torch.empty(slots[-1] + 1, dtype=index_dtype, device=g.device)
    val = torch.empty(slots[-1] + 1, dtype=g.dtype, device=g.device)
    if not tiles:
        return [], True
    if backend == "triton":
        from . import fused_triton
        states = []
        for (a, b, _), thr, cap, slot in zip(tiles, thresholds, caps, slots):
            states.append(fused_triton.compensate_select(
                g[a:b], None if m is None else m[a:b], None if x is None else x[a:b],
                None if math.isnan(thr) else thr, 0, b - a, idx[slot:slot + cap + 1], val[slot:slot + cap + 1], cap))
        state = torch.stack(states).tolist()  # the one host synchronisation
        counts, finite = [c for c, _ in state], all(bad == 0 for _, bad in state)
        out = []
        for (a, _, _), count, cap, slot in zip(tiles, counts, caps, slots):
            held = min(count, cap)
            ti, order = torch.sort(idx[slot:slot + held])  # blocks claim their slots in any order
            out.append((ti.add_(a), val[slot:slot + held][order], count))
        return out, finite
    from . import fused_cpu
    bounds = torch.tensor([[a, b] for a, b, _ in tiles], dtype=torch.int64).view(-1, 2)
    counts_t, finite = fused_cpu.compensate_select_ranges(
        g, m, x, bounds, torch.tensor(thresholds, dtype=torch.float64), idx, val,
        torch.tensor(slots[:-1], dtype=torch.int64), torch.tensor(caps, dtype=torch.int64))
    counts = counts_t.tolist()
    return [(idx[slot:slot + min(c, cap)], val[slot:slot + min(c, cap)], c)
            for c, cap, slot in zip(counts, caps, slots)], finite


class TopKSelection:
    """A method's exact top-k by the rule, with its ``selection`` option: ``"torch"``
    (:func:`reference`), ``"fused"`` (:class:`TopKSearch`; raises where the fused pass cannot
    run) or ``"auto"`` (fused where it can run, as for the threshold methods). Either gives
    the same positions. Called as ``selection(call, ranges, ks) -> (positions, values)``
    (values: ``x`` there when the path has them, else None)."""

    def __init__(self, selection: str, seed: int = 0) -> None:
        self.selection = choice("selection", selection, SELECTIONS)
        self.seed = seed
        self.fused = False
        self._searches: dict[tuple, TopKSearch] = {}  # the last few (ranges, ks): a leader's and a follower's
        self._samples: dict = {}

    def configure(self, layout) -> None:
        """Resolve the path for the layout's device and dtypes (raises for an impossible "fused")."""
        self.fused = resolve(self.selection, layout.device, layout.dtype, layout.index_dtype)

    def describe(self) -> dict[str, str]:
        return {"selection": "fused" if self.fused else "torch"}

    def __call__(self, call, ranges: Sequence[tuple[int, int]], ks: Sequence[int]
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.fused:
            with call.phase("select"):
                return reference(call.x, ranges, ks, call.layout.index_dtype, call.scratch()), None
        key = (tuple(ranges), tuple(ks))
        search = self._searches.get(key)
        if search is None:
            if len(self._searches) >= 4:  # counts that move every step (DEFT, AGTF) keep only their samples
                self._searches.clear()
            search = self._searches[key] = TopKSearch(ranges, ks, self.seed, samples=self._samples)
        found = call.select_in_pass(search)
        return found.indices, found.values
