"""Random-k sparsification with indices shared by construction."""
from __future__ import annotations

from typing import Any

import torch

from ..base import ReduceCall, Reducer
from ..comm.exchange import allreduce_at
from ..registry import register
from ..select.primitives import sample_distinct, target_count
from .sparse_base import union_stats


@register
class RandomK(Reducer):
    """Random-k (Stich et al., NeurIPS 2018): k = max(1, floor(c * d)) distinct positions
    drawn uniformly by a generator seeded identically on every worker, so all workers pick
    the same positions and one all-reduce of k values suffices. Positions are drawn on the
    CPU, so CPU and GPU runs with the same seed pick the same positions. Routed
    (:meth:`~..base.Reducer.route_to`): each value goes to its position's owner only
    (:func:`~..comm.exchange.routed_sum_at`)."""

    name = "randomk"
    # k = c d positions drawn over the whole vector: how many land in a tensor depends on the others
    per_tensor = False
    summary = "k random positions, the same on every worker; all-reduce of their values"

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        self._generator = torch.Generator()
        self._generator.manual_seed(self.seed)

    def _run(self, call: ReduceCall) -> torch.Tensor:
        k = target_count(self.density, call.d)
        call.handshake(count=k)
        with call.phase("select"):
            positions = sample_distinct(call.d, k, self._generator).to(call.x.device, call.layout.index_dtype)
        with call.phase("comm"):
            avg = allreduce_at(self.comm, call.x, positions, call.output(), self.owners)
        call.commit_sparse(positions)
        call.counted(selected=k, received=k)
        union_stats(call, self.owners, positions)
        return avg

    def _method_state(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])
