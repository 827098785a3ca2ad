"""MiCRO and ExDyna: threshold selection inside rotating exclusive partitions."""
from __future__ import annotations

from typing import Any

import torch

from ...validate import boolean, choice, positive_int
from ..base import ReduceCall, Reducer
from ..select.control import CONTROLLERS, MultiplicativeScaling, pooled_threshold
from ..comm.exchange import gather_counts, union_allreduce
from ..layout import Layout
from ..select.placement import BlockPartitions, EqualPartitions, Partitions
from ..registry import register
from ..select.fused import SELECTIONS, FusedSearch, resolve
from ..select.primitives import ThresholdSearch, curve_counts, initial_threshold, target_count, top_curve
from ..comm.wire import WireFormat, floor_bits, union_pairs
from .sparse_base import union_stats


class PartitionedThreshold(Reducer):
    """Worker r selects |x| >= lambda only inside partition (t + r) mod P; if nothing passes it
    sends one position anyway (start + t mod size) so every step has a well-formed exchange.
    Partitions never overlap, so the union of indices is their concatenation; every worker
    all-reduces its values there and zeroes its residual there. lambda follows
    :class:`~sparsecomm.reducers.select.control.MultiplicativeScaling` with k = max(1, floor(c d)),
    so the total count over all workers tracks k.

    ``warm_start`` (default True): step 0's lambda is not 1/(2 sqrt(k)) but where the workers'
    exact top-k curves over their own partitions say the total count is k
    (:func:`~sparsecomm.reducers.select.control.pooled_threshold`; the curves ride on the handshake,
    and that step's counts take one more small all-gather). ``controller``: ``"fast"`` (default)
    keeps the published steps inside the band 0.909 < r <= 1.1 and moves faster outside it;
    ``"paper"`` is the published rule. ``controller="paper", warm_start=False`` is the
    published method exactly.

    ``values`` and ``indices`` choose the wire format (:mod:`..wire`); a bitmap or delta code
    of positions covers the largest partition, each worker's relative to its own.

    Routed (:meth:`~..base.Reducer.route_to`, FSDP2), in every wire format: the positions are
    all-gathered as before (every worker zeroes its residual at the whole union, and the
    controller and partitions read everyone's counts), but each worker sends its values only
    to their positions' owners (:func:`~..comm.exchange.routed_sum_at`), which sum them in
    rank order: the average at a worker's owned positions is bit for bit the unrouted one with
    2 workers (and with 16-bit values at any P), within float rounding of gloo's all-reduce
    with more; 0 elsewhere. Residual, threshold and partitions are exactly as unrouted."""

    def __init__(self, *, selection: str = "auto", warm_start: bool = True, controller: str = "fast",
                 values: str = "full", indices: str = "int32", **common: Any) -> None:
        self.warm_start = boolean("warm_start", warm_start)
        self.controller = choice("controller", controller, CONTROLLERS)
        self.selection = choice("selection", selection, SELECTIONS)
        self._fused = False
        self._fused_search = FusedSearch()
        self.wire = WireFormat(values, indices)
        super().__init__(**common)
        self._partitions: Partitions | None = None
        self._control: MultiplicativeScaling | None = None
        self._search = ThresholdSearch(self.density)
        self._k = 1

    def options(self) -> dict[str, Any]:
        return {"selection": self.selection, "warm_start": self.warm_start, "controller": self.controller,
                **self.wire.options()}

    def _partitioning(self, d: int) -> Partitions:
        raise NotImplementedError

    def _configure(self, layout: Layout) -> None:
        self._k = k = target_count(self.density, layout.numel)
        self._partitions = self._partitioning(layout.numel)
        self._control = MultiplicativeScaling(k, initial_threshold(k), fast=self.controller == "fast")
        self._fused = resolve(self.selection, layout.device, layout.dtype, layout.index_dtype)

    def _fuses_compensation(self) -> bool:
        return self._fused

    def describe(self) -> dict[str, Any]:
        return {"selection": "fused" if self._fused else "torch"}

    @property
    def partitions(self) -> Partitions:
        if self._partitions is None:
            raise RuntimeError("partitions are set up at the first reduce()")
        return self._partitions

    def _run(self, call: ReduceCall) -> torch.Tensor:
        control, parts = self._control, self.partitions
        assert control is not None
        bounds = parts.bounds()
        start, end = bounds[parts.owned(call.index, self.rank)]
        if self.warm_start and call.index == 0:
            counts = curve_counts(self._k)
            with call.phase("select"):
                curve = top_curve(call.x, counts, start, end, call.scratch())
            header = call.handshake(extras=curve.unbind())
            sizes = [b - a for a, b in (bounds[parts.owned(0, r)] for r in range(self.comm.size))]
            calibrated = pooled_threshold(header.extras.tolist(), counts, sizes, self._k)
            if calibrated is not None:
                control.start(calibrated)
        threshold = control.threshold
        if self._fused:  # builds x = g + m in the same pass, unless the warm start needed it already
            idx = call.select_fused(threshold, start, end, self._fused_search).indices
        with call.phase("select"):
            x = call.x
            if not self._fused:
                idx = self._search(x, threshold, call.layout.index_dtype, start, end, call.scratch())
            if idx.numel() == 0 and end > start:
                idx = torch.tensor([start + call.index % (end - start)], dtype=idx.dtype, device=x.device)
        if call.header is None:
            per_rank = call.handshake(count=idx.numel()).counts
        else:  # the warm start's handshake came before the selection
            with call.phase("comm"):
                per_rank = gather_counts(self.comm, idx.numel(), x.device)
        kept = None
        with call.phase("comm"):
            if self.wire.default:
                avg, union = union_allreduce(self.comm, x, idx, per_rank, call.output(), disjoint=True,
                                             owners=self.owners)
            else:
                spans = [bounds[parts.owned(call.index, r)] for r in range(self.comm.size)]
                avg, union, kept = union_pairs(self.comm, x, idx, per_rank, call.output(), self.wire, spans,
                                               disjoint=True, owners=self.owners)
        call.commit_sparse(union, kept)
        call.stats["wire_floor_bytes"] = floor_bits(end - start, idx.numel(), union.numel(),
                                                    self.wire.value_bits(x.dtype)) / 8
        total = sum(per_rank)
        call.counted(selected=idx.numel(), received=total)
        union_stats(call, self.owners, union)
        call.stats.update(threshold=threshold, partition_size=call.fraction(end - start),
                          load_imbalance=max(per_rank) * self.comm.size / total - 1.0 if total else 0.0)
        control.update(total)
        parts.update(parts.by_partition(per_rank, call.index))
        return avg

    def _method_state(self) -> dict[str, Any]:
        assert self._control is not None
        return {"control": self._control.state_dict(), "partitions": self.partitions.state_dict()}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        assert self._control is not None
        self._control.load_state_dict(state["control"])
        self.partitions.load_state_dict(state["partitions"])


@register
class Micro(PartitionedThreshold):
    """MiCRO (Yoon & Oh, HiPC 2023): P equal, static partitions with rotating ownership,
    threshold selection, union all-reduce."""

    name = "micro"
    per_tensor = False  # one threshold, partitions of the whole vector
    summary = "threshold selection in P equal rotating exclusive partitions"

    def _partitioning(self, d: int) -> Partitions:
        return EqualPartitions(d, self.comm.size)


@register
class ExDyna(PartitionedThreshold):
    """ExDyna (Yoon & Oh, CCGrid 2024): block-based partitions whose boundaries move towards
    balanced per-partition counts (:class:`~sparsecomm.reducers.select.placement.BlockPartitions`),
    rotating exclusive ownership, online threshold scaling, union all-reduce."""

    name = "exdyna"
    per_tensor = False  # one threshold, block partitions of the whole vector
    summary = "threshold selection in dynamically balanced rotating block partitions"

    def __init__(self, *, num_blocks: int = 1024, block_align: int = 32, warm_start: bool = True,
                 controller: str = "fast", selection: str = "auto", **common: Any) -> None:
        self.num_blocks = positive_int("num_blocks", num_blocks)
        self.block_align = positive_int("block_align", block_align)
        super().__init__(warm_start=warm_start, controller=controller, selection=selection, **common)

    def options(self) -> dict[str, Any]:
        return {"num_blocks": self.num_blocks, "block_align": self.block_align, **super().options()}

    def _partitioning(self, d: int) -> Partitions:
        return BlockPartitions(d, self.comm.size, self.num_blocks, self.block_align)
