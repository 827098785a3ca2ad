"""16-bit casting with error feedback: every coordinate travels as float16 or bfloat16."""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch

from ...validate import choice
from ..base import ReduceCall, Reducer
from ..comm.exchange import chunks, gather_decoded_mean
from ..registry import register

EXCHANGES = ("gather", "allreduce")


class CastReducer(Reducer):
    """Each worker sends its compensated x cast to ``wire`` (round to nearest); the residual
    keeps the rounding error x - cast(x), so nothing is lost (the conservation identity holds
    to the float rounding of the sums). Values beyond the 16-bit type's largest finite value
    are saturated to it (float16: 65504) rather than sent as Inf; with error feedback the
    excess stays in the residual.

    ``exchange="gather"`` (default): the 16-bit rows are all-gathered, widened back to the
    gradient's dtype and added in rank order on every rank, so the average is bit-identical
    everywhere and no sum is rounded to 16 bits: conservation holds to the rounding of the
    sums in the gradient's dtype. The rows are cast and travel a window at a time
    (:func:`~sparsecomm.reducers.comm.exchange.gather_in_windows`), so neither the whole 16-bit
    row (half the gradient) nor a table of all P rows (P/2 times it) is ever held. The price is in the wire estimate: an
    all-gather receives (P - 1) 2d bytes per worker where a ring all-reduce of the same values
    moves 2 (P - 1) / P 2d (equal at P = 2, twice as much at P = 4).

    Routed (``exchange="gather"`` with :meth:`~sparsecomm.reducers.base.Reducer.route_to` set,
    FSDP2): each worker sends each owner only the 16-bit values of the owner's coordinates
    (:func:`~sparsecomm.reducers.comm.exchange.routed_windows`, one all-to-all per window,
    each cast as it is sent), and each owner widens and adds them in rank order: its
    coordinates bit for bit as unrouted, the rest 0; the residual is the same (each worker
    widens its own values everywhere). ``bytes_sent`` is then the 16-bit values of the other
    ranks' coordinates, (P - 1) / P 2d summed over ranks (a rank that owns little sends more,
    and a group of codes cut by an owner boundary goes to both owners), and ``bytes_wire`` the
    values of this rank's coordinates from the P - 1 others. ``exchange="allreduce"`` is not routed: its sums are formed by the backend
    over every coordinate.

    ``exchange="allreduce"``: as PyTorch's ``fp16_compress_hook``: each worker casts x / P,
    the 16-bit values are all-reduced (summed in 16 bits by the backend; gloo and NCCL give
    every rank the same bits) and widened. The ring's wire cost, but every partial sum is
    rounded to 16 bits and that error reaches no residual (each residual keeps only its own
    cast's error, x - P cast(x / P)), so the identity holds only to 16-bit rounding
    (``conserves`` is False).

    ``bytes_sent`` is 2d either way, half of ``exact``'s float32. Gradients that already have
    the 16-bit type travel unchanged (residual 0 with ``gather``). ``density`` is not used;
    ``payload_ratio`` = 2 / (bytes per gradient element)."""

    uses_density = False
    wire: ClassVar[torch.dtype] = torch.float16

    def __init__(self, *, exchange: str = "gather", **common: Any) -> None:
        self.exchange = choice("exchange", exchange, EXCHANGES)
        super().__init__(**common)

    @property
    def conserves(self) -> bool:
        """Whether the conservation identity holds (to the rounding of sums in the gradient's
        dtype): with ``exchange="gather"`` only."""
        return self.exchange == "gather"

    def options(self) -> dict[str, Any]:
        return {"exchange": self.exchange}

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` rounded to ``wire``, saturated at its largest finite value; built range by
        range into the result, so the only full-size allocation is the 16-bit result itself."""
        if x.dtype == self.wire:
            return x.clone()
        top = torch.finfo(self.wire).max
        row = torch.empty(x.numel(), dtype=self.wire, device=x.device)
        for a, b in chunks(x.numel()):
            part = x[a:b]
            if top < torch.finfo(x.dtype).max:  # saturate instead of overflowing to Inf
                part = part.clamp(-top, top)
            row[a:b].copy_(part)
        return row

    def _row_bytes(self, call: ReduceCall) -> Callable[[int, int], torch.Tensor]:
        """Bytes ``[lo, hi)`` of the 16-bit row of ``call.x``, cast when asked for (in the
        "select" phase): the row is sent a window at a time and never exists whole."""
        n = self.wire.itemsize

        def row_bytes(lo: int, hi: int) -> torch.Tensor:
            with call.phase("select"):
                return self._cast(call.x[lo // n:hi // n]).view(torch.uint8)
        return row_bytes

    def _run(self, call: ReduceCall) -> torch.Tensor:
        x, dtype, P = call.x, call.layout.dtype, self.comm.size
        call.handshake(count=call.d)
        if self.exchange == "gather":
            with call.phase("comm"):  # each window cast as it is sent
                avg = gather_decoded_mean(self.comm, self._row_bytes(call),
                                          lambda part, a, b: part.values(a, b, self.wire).to(dtype), call.output(),
                                          residual=call.x if call.error_feedback else None,
                                          width=8 * self.wire.itemsize, size=call.d * self.wire.itemsize,
                                          owners=self.owners)
            call.commit_subtracted()
        else:
            with call.phase("select"):
                row = self._cast(x / P if P > 1 else x)
                mine = row.to(dtype).mul_(P)
            with call.phase("comm"):
                self.comm.all_reduce_(row)
                avg = call.output().copy_(row)
            call.commit_dense(mine)
        call.counted_dense(self.owners if self.exchange == "gather" else None, P > 1)
        call.stats.update(payload_ratio=self.wire.itemsize / dtype.itemsize)
        return avg


@register
class FP16(CastReducer):
    """float16 casting of the exchanged gradient, as PyTorch's DDP ``fp16_compress_hook`` does,
    here with error feedback (the rounding error kept in the residual). float16: 11
    significant bits, largest finite value 65504."""

    name = "fp16"
    per_tensor = True  # every coordinate cast on its own
    summary = "every coordinate cast to float16, rounding error kept by error feedback"
    wire = torch.float16


@register
class BF16(CastReducer):
    """bfloat16 casting with error feedback (the rounding error kept in the residual): float32's
    range, 8 significant bits (PyTorch's ``bf16_compress_hook``, without error feedback)."""

    name = "bf16"
    per_tensor = True  # every coordinate cast on its own
    summary = "every coordinate cast to bfloat16, rounding error kept by error feedback"
    wire = torch.bfloat16
