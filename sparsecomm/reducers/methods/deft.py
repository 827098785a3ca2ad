"""DEFT: layer-wise top-k with the layers bin-packed onto the workers, each selecting alone."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ..base import ReduceCall
from ..comm.exchange import gather_counts, union_allreduce
from ..layout import Layout
from ..registry import register
from ..select.primitives import allocate_k, target_count
from .sparse_base import union_stats
from .topk_selecting import TopKSelecting

__all__ = ["Deft", "split_units", "pack_units", "COMMON"]

COMMON = -1  # the bin of a unit that everyone sends densely


def split_units(sizes: Sequence[int], workers: int) -> list[tuple[int, int]]:
    """The units as flat ranges ``[a, b)``: one per tensor, except that a tensor larger than
    d / P is cut into P near-equal pieces (the first ``n mod P`` pieces one longer). Empty
    tensors and empty pieces (a tensor shorter than P) are no units."""
    d = sum(sizes)
    units, at = [], 0
    for n in sizes:
        if n * workers > d:  # n > d / P, in exact integer arithmetic
            base, extra = divmod(n, workers)
            pieces = [base + 1] * extra + [base] * (workers - extra)
        else:
            pieces = [n]
        for p in pieces:
            if p > 0:
                units.append((at, at + p))
            at += p
    return units


def pack_units(sizes: Sequence[int], ks: Sequence[int], workers: int) -> list[int]:
    """The leader's assignment: unit -> bin in ``range(workers)``, or :data:`COMMON` for a unit
    whose k equals its size (sent densely by everyone, costs no bin anything). The others go,
    largest cost first (ties: lower unit first), to the bin with the least cost so far (ties:
    lower bin), where a unit's cost is ``numel * log2(k)`` (``numel`` when k <= 1), the
    authors' model of a top-k's work. Bins may stay empty."""
    cost = [n * math.log2(k) if k > 1 else float(n) for n, k in zip(sizes, ks)]
    order = sorted(range(len(sizes)), key=lambda u: -cost[u])
    load = [0.0] * workers
    assignment = [COMMON] * len(sizes)
    for u in order:
        if ks[u] == sizes[u]:
            continue
        b = min(range(workers), key=lambda i: load[i])  # first of the least loaded
        assignment[u] = b
        load[b] += cost[u]
    return assignment


@register
class Deft(TopKSelecting):
    """DEFT (Yoon & Oh, ICPP 2023): layer-wise top-k without redundant selection work.

    Units are the tensors, except that a tensor larger than d / P is cut into P near-equal
    pieces (:func:`split_units`, fixed at the first step). Every step:

    1. each worker computes the L2 norm of its compensated vector x on every unit (one fused
       call, in float32 (float64 for float64 gradients), one device-to-host copy for all
       norms) and shares k = max(1, floor(c d)) among the units in proportion to them
       (:func:`allocate_k`; each unit at least 1, at most its size);
    2. the leader, worker t mod P, bin-packs the units onto P bins from its own allocation
       (:func:`pack_units`: greedy, largest ``numel log2 k`` first, to the emptiest bin); units
       whose k equals their size are *common*: everyone sends them densely;
    3. the leader broadcasts the assignment (one int32 per unit: its bin, or -1 for common);
    4. worker r takes bin (t + r) mod P and runs top-k on each of its units with its own k for
       that unit (a bin may be empty: more workers than units to share, or all common);
    5. union all-reduce: the counts and then the indices are all-gathered (padded to the
       largest count with zeros, counted as sent); the bins are disjoint, so the union is
       everyone's selections and the common units without overlap, taken in ascending order
       (one sort of about k positions, or a mask pass when the union is large) so that the
       gathers and scatters run in memory order; every worker all-reduces its own x there
       and zeroes its residual there.

    Where the sources leave room: the norms are those of the compensated x = g + m (the
    authors' code takes them of the vector it compresses); ties in norm or cost go to the lower
    unit, ties in load to the lower bin; k is max(1, floor(c d)) (their code: int(c d)); the
    second pass of their allocation (leftover k handed out again) is kept; common units travel
    once (their code appends them twice to the index list, and with one worker drops them);
    empty tensors form no unit. Per step there are five collectives: the handshake, the
    broadcast (4 bytes a unit, sent by the leader), the 8-byte count all-gather, the index
    all-gather and the value all-reduce.

    ``stats``: ``density`` = union / d; ``local_density`` = (this worker's top-k count + the
    common coordinates) / d, i.e. what it selected itself; ``common_density``; ``units``;
    ``leader``; ``load_imbalance`` = max count * P / sum of counts - 1 over the index
    all-gather (its padding waste).

    Routed (:meth:`~..base.Reducer.route_to`, FSDP2): step 5's indices are all-gathered as
    before, its values go to their owners only (:func:`~..comm.exchange.routed_sum_at`), summed
    there in rank order: bit for bit the all-reduce's mean at this worker's owned positions
    with 2 workers, within float rounding with more, 0 elsewhere; the residual, norms and
    assignment are as unrouted.

    Options: ``selection`` (:class:`~.topk_selecting.TopKSelecting`; the norms read x first,
    so the fused path reads x, only over this worker's units); the paper has no tunable
    constants besides c.
    """

    name = "deft"
    per_tensor = False  # k shared among the tensors by their norms, tensors bin-packed onto workers
    summary = "layer-wise top-k, layers bin-packed onto rotating workers by cost, union all-reduce"

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        self._units: list[tuple[int, int]] = []

    def _configure(self, layout: Layout) -> None:
        super()._configure(layout)
        self._units = split_units(layout.sizes, self.comm.size)

    @property
    def units(self) -> list[tuple[int, int]]:
        """The units as flat ranges (set at the first reduce)."""
        return list(self._units)

    def _run(self, call: ReduceCall) -> torch.Tensor:
        x, d, P, comm = call.x, call.d, self.comm.size, self.comm
        units, index_dtype = self._units, call.layout.index_dtype
        sizes = [b - a for a, b in units]
        leader = call.index % P
        with call.phase("select"):
            norms_dev = _unit_norms(x, units)
        call.handshake()  # raises on every rank before any norm is used when x is not finite
        with call.phase("select"):
            norms = norms_dev.tolist()
            if not all(map(math.isfinite, norms)):  # x is finite, the float32 sum overflowed
                norms = _unit_norms(x, units, torch.float64).tolist()
            ks = allocate_k(norms, sizes, target_count(self.density, d))
            assignment = pack_units(sizes, ks, P) if self.rank == leader else None
        with call.phase("comm"):
            table = torch.tensor(assignment if assignment is not None else [0] * len(units),
                                 dtype=torch.int32, device=x.device)
            comm.broadcast_(table, leader)
            if assignment is None:
                assignment = table.tolist()
        mine = (call.index + self.rank) % P
        own = [u for u, b in enumerate(assignment) if b == mine]
        idx, _ = self.topk(call, [units[u] for u in own], [ks[u] for u in own])
        with call.phase("select"):
            common = [units[u] for u, b in enumerate(assignment) if b == COMMON]
            n_common = sum(b - a for a, b in common)
        with call.phase("comm"):
            counts = gather_counts(comm, idx.numel(), x.device)
            everyone = [torch.arange(a, b, dtype=index_dtype, device=x.device) for a, b in common]
            avg, union = union_allreduce(comm, x, idx, counts, call.output(), extra=everyone, owners=self.owners)
        call.commit_sparse(union)
        total = sum(counts)
        call.counted(selected=idx.numel() + n_common, received=union.numel())
        union_stats(call, self.owners, union)
        call.stats.update(common_density=call.fraction(n_common), units=len(units), leader=leader,
                          load_imbalance=max(counts) * P / total - 1.0 if total else 0.0)
        return avg


def _unit_norms(x: torch.Tensor, units: Sequence[tuple[int, int]],
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """L2 norm of x on every unit, as one tensor of ``dtype`` (float64 for float64 x) on x's
    device, in one fused call."""
    if x.dtype == torch.float64:
        dtype = torch.float64
    if not units:
        return torch.empty(0, dtype=dtype, device=x.device)
    return torch.stack(torch._foreach_norm([x[a:b] for a, b in units], 2, dtype=dtype))
