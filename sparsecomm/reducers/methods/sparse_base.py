"""Shared by methods where every worker selects anywhere in the vector."""
from __future__ import annotations

from typing import Any

import torch

from ...validate import choice
from ..base import ReduceCall, Reducer
from ..comm.exchange import Owners, dense_allreduce_mean, routed_gather_sum, sparse_gather_sum, union_allreduce
from ..comm.wire import WireFormat, floor_bits, gather_pairs, union_pairs

EXCHANGES = ("gather", "union")


class SparseReducer(Reducer):
    """A sparsifier whose selection travels by sparse gather-sum (``exchange="gather"``: each
    worker's own pairs are summed, each worker zeroes its residual at its own positions) or by
    union all-reduce (``exchange="union"``: every worker sends its values at the union of all
    selected positions and zeroes its residual there). A method may also send a step's
    selection as a dense vector (:meth:`_send_dense`, one all-reduce) where that is cheaper.

    ``values`` and ``indices`` choose the wire format of the pairs (:mod:`..wire`):
    values in full precision, fp16 or bf16; positions as int32, a bitmap, delta-coded
    (Elias-Fano) or the smallest of them for the step."""

    exchanges: tuple[str, ...] = EXCHANGES  # the values ``exchange`` may take

    def __init__(self, *, exchange: str = "gather", values: str = "full", indices: str = "int32",
                 **common: Any) -> None:
        self.exchange = choice("exchange", exchange, self.exchanges)
        self.wire = WireFormat(values, indices)
        super().__init__(**common)

    def options(self) -> dict[str, Any]:
        return {"exchange": self.exchange, **self.wire.options()}

    def _send(self, call: ReduceCall, idx: torch.Tensor, counts: list[int], values: torch.Tensor | None = None,
              exchange: str | None = None) -> torch.Tensor:
        """Exchange the positions ``idx`` selected by this worker; return the flat average.
        ``values``: ``x[idx]`` when the selection already has it (the fused pass).
        ``exchange``: ``"gather"`` or ``"union"`` (default: the reducer's own). With owners
        (:meth:`~..base.Reducer.route_to`): the gather-sum in the default wire format goes by
        :meth:`_send_routed`; the union exchange, in any wire format, still all-gathers the
        positions (everyone knows the union, which its residual zeroes) and sends the values to
        their owners only (:func:`~..comm.exchange.routed_sum_at`); a gather-sum in another
        wire format is not routed (its encoded positions would have to be split by owner)."""
        exchange = exchange or self.exchange
        kept = None
        if self.owners is not None and exchange == "gather" and self.wire.default:
            return self._send_routed(call, idx, counts, values)
        with call.phase("comm"):
            if self.wire.default:
                if exchange == "gather":
                    avg, union = sparse_gather_sum(self.comm, call.x, idx, counts, call.output(), values)
                else:
                    avg, union = union_allreduce(self.comm, call.x, idx, counts, call.output(), owners=self.owners)
                sent = idx if exchange == "gather" else union
            elif exchange == "gather":
                avg, union, sent, kept = gather_pairs(self.comm, call.x, idx, counts, call.output(), self.wire)
            else:
                avg, union, kept = union_pairs(self.comm, call.x, idx, counts, call.output(), self.wire,
                                               owners=self.owners)
                sent = union
        call.commit_sparse(sent, kept)
        call.counted(selected=idx.numel(), received=union.numel())
        if exchange == "union":
            union_stats(call, self.owners, union)
        self._wire_floor(call, idx.numel(), sent.numel())
        return avg

    def _send_routed(self, call: ReduceCall, idx: torch.Tensor, counts: list[int],
                     values: torch.Tensor | None) -> torch.Tensor:
        """:meth:`_send`'s gather-sum with each pair sent to the worker that owns its position
        (:meth:`~..base.Reducer.route_to`, :func:`~..comm.exchange.routed_gather_sum`): the
        average is filled at this rank's owned coordinates only. The residual is as unrouted
        (this worker zeroes what it sent). See :func:`routed_stats` for the counts."""
        with call.phase("comm"):
            avg, union, routed = routed_gather_sum(self.comm, call.x, idx, counts, call.output(), self.owners,
                                                   values)
        call.commit_sparse(idx)
        routed_stats(call, self.owners, idx.numel(), union, routed)
        self._wire_floor(call, idx.numel(), idx.numel())
        return avg

    def _send_dense(self, call: ReduceCall, selection: torch.Tensor, selected: int) -> torch.Tensor:
        """Exchange this worker's selection as a dense vector: ``selection`` (the call's
        :meth:`~..base.ReduceCall.output`) holds ``x`` at the ``selected`` positions and 0
        elsewhere. ``x`` minus it (exactly x where nothing was selected, 0 where something was,
        as :meth:`_send`'s gather-sum leaves it) becomes the residual in place; ``selection`` is
        all-reduced in place and divided by P, and returned as the average.

        ``received`` (hence ``density``): the positions where the average is not 0, or
        ``selected`` if more. The union of everyone's selections would take another exchange;
        this lower bound of it is exact with one worker, and otherwise wherever no position
        some worker selected averages to exactly 0. ``wire_floor_bytes`` is the pairs' floor,
        as for the gather-sum."""
        with call.phase("select"):
            if call.error_feedback:
                call.x.sub_(selection)
        call.commit_subtracted()
        with call.phase("comm"):
            avg = dense_allreduce_mean(self.comm, selection)
        received = selected
        if self.comm.size > 1:
            with call.phase("select"):
                received = max(selected, int(torch.count_nonzero(avg)))
        call.counted(selected=selected, received=received)
        self._wire_floor(call, selected, selected)
        return avg

    def _wire_floor(self, call: ReduceCall, selected: int, sent: int) -> None:
        call.stats["wire_floor_bytes"] = floor_bits(call.d, selected, sent, self.wire.value_bits(call.x.dtype)) / 8


def routed_stats(call: ReduceCall, owners: Owners, selected: int, union: torch.Tensor, routed: bool,
                 dense: torch.Tensor | None = None) -> None:
    """The counts of a step whose pairs went by :func:`~..comm.exchange.routed_gather_sum`
    (``dense``: positions averaged densely beside them, every one of which gets a value, e.g.
    DGC's 1-d tensors). ``routed``: the pairs went by all-to-all (False: by the all-gather,
    no dearer at these counts). ``received`` (``density``): the union of everyone's positions
    where this rank saw it whole (not routed); routed, a rank sees only its own part of it, and
    ``received`` is the lower bound max(selected, the part's union) (exact with one worker), as
    for accordion's dense step. ``shard_density``: coordinates of this rank's owned part that
    got a value, divided by that part's size (exact either way)."""
    me = call.comm.rank
    in_shard = owned_count(owners, me, union)
    received = union.numel() if not routed else max(selected, in_shard)
    extra = 0 if dense is None else dense.numel()
    if extra:
        in_shard += owned_count(owners, me, dense)
    call.counted(selected=selected + extra, received=received + extra)
    shard_stats(call, owners, routed, in_shard)


def owned_count(owners: Owners, worker: int, positions: torch.Tensor) -> int:
    """How many of ``positions`` ``worker`` owns."""
    return int((owners.of(positions) == worker).sum()) if positions.numel() else 0


def shard_stats(call: ReduceCall, owners: Owners, routed: bool, in_shard: int) -> None:
    """``routed`` and ``shard_density`` (``in_shard`` coordinates of this rank's owned part got
    a value, divided by that part's size; 0 for an empty part) of a step under :meth:`route_to
    <..base.Reducer.route_to>`."""
    size = owners.numel(call.comm.rank)
    call.stats.update(routed=routed, shard_density=in_shard / size if size else 0.0)


def union_stats(call: ReduceCall, owners: Owners | None, union: torch.Tensor) -> None:
    """``routed`` and ``shard_density`` of a step whose values went to the union of everyone's
    positions (:func:`~..comm.exchange.union_allreduce`, :func:`~..comm.exchange.allreduce_at`),
    where :meth:`route_to <..base.Reducer.route_to>` set owners: routed with several workers
    (one: the plain all-reduce). Every rank still learns the whole union, so the method's
    ``received`` (``density``) stays exact; nothing here when no owners are set."""
    if owners is not None:
        shard_stats(call, owners, call.comm.size > 1, owned_count(owners, call.comm.rank, union))
