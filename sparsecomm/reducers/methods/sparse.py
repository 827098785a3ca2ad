"""Shared by methods where every worker selects anywhere in the vector."""
from __future__ import annotations

from typing import Any

import torch

from ...validate import choice
from ..base import Reducer, Step
from ..exchange import sparse_gather_sum, union_allreduce

EXCHANGES = ("gather", "union")


class SparseReducer(Reducer):
    """A sparsifier whose selection travels by sparse gather-sum (``exchange="gather"``: each
    worker's own pairs are summed, each worker zeroes its residual at its own positions) or by
    union all-reduce (``exchange="union"``: every worker sends its values at the union of all
    selected positions and zeroes its residual there)."""

    def __init__(self, *, exchange: str = "gather", **common: Any) -> None:
        self.exchange = choice("exchange", exchange, EXCHANGES)
        super().__init__(**common)

    def options(self) -> dict[str, Any]:
        return {"exchange": self.exchange}

    def _send(self, step: Step, idx: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Exchange the positions ``idx`` selected by this worker; return the flat average."""
        with step.phase("comm"):
            if self.exchange == "gather":
                avg, union = sparse_gather_sum(self.comm, step.x, idx, counts, step.output())
            else:
                avg, union = union_allreduce(self.comm, step.x, idx, counts, step.output())
        step.commit_sparse(idx if self.exchange == "gather" else union)
        step.counted(selected=idx.numel(), received=union.numel())
        return avg
