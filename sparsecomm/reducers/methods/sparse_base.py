"""Shared by methods where every worker selects anywhere in the vector."""
from __future__ import annotations

from typing import Any

import torch

from ...validate import choice
from ..base import ReduceCall, Reducer
from ..comm.exchange import sparse_gather_sum, union_allreduce
from ..comm.wire import WireFormat, floor_bits, gather_pairs, union_pairs

EXCHANGES = ("gather", "union")


class SparseReducer(Reducer):
    """A sparsifier whose selection travels by sparse gather-sum (``exchange="gather"``: each
    worker's own pairs are summed, each worker zeroes its residual at its own positions) or by
    union all-reduce (``exchange="union"``: every worker sends its values at the union of all
    selected positions and zeroes its residual there).

    ``values`` and ``indices`` choose the wire format of the pairs (:mod:`..wire`):
    values in full precision, fp16 or bf16; positions as int32, a bitmap, delta-coded
    (Elias-Fano) or the smallest of them for the step."""

    def __init__(self, *, exchange: str = "gather", values: str = "full", indices: str = "int32",
                 **common: Any) -> None:
        self.exchange = choice("exchange", exchange, EXCHANGES)
        self.wire = WireFormat(values, indices)
        super().__init__(**common)

    def options(self) -> dict[str, Any]:
        return {"exchange": self.exchange, **self.wire.options()}

    def _send(self, call: ReduceCall, idx: torch.Tensor, counts: list[int], values: torch.Tensor | None = None
              ) -> torch.Tensor:
        """Exchange the positions ``idx`` selected by this worker; return the flat average.
        ``values``: ``x[idx]`` when the selection already has it (the fused pass)."""
        kept = None
        with call.phase("comm"):
            if self.wire.default:
                if self.exchange == "gather":
                    avg, union = sparse_gather_sum(self.comm, call.x, idx, counts, call.output(), values)
                else:
                    avg, union = union_allreduce(self.comm, call.x, idx, counts, call.output())
                sent = idx if self.exchange == "gather" else union
            elif self.exchange == "gather":
                avg, union, sent, kept = gather_pairs(self.comm, call.x, idx, counts, call.output(), self.wire)
            else:
                avg, union, kept = union_pairs(self.comm, call.x, idx, counts, call.output(), self.wire)
                sent = union
        call.commit_sparse(sent, kept)
        call.counted(selected=idx.numel(), received=union.numel())
        call.stats["wire_floor_bytes"] = floor_bits(
            call.d, idx.numel(), sent.numel(), self.wire.value_bits(call.x.dtype)) / 8
        return avg
