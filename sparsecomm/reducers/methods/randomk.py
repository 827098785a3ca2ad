"""Random-k sparsification with indices shared by construction."""
from __future__ import annotations

from typing import Any

import torch

from ..base import Reducer, Step
from ..comm.exchange import allreduce_at
from ..registry import register
from ..select.primitives import sample_distinct, target_count


@register
class RandomK(Reducer):
    """Random-k (Stich et al., NeurIPS 2018): k = max(1, floor(c * d)) distinct positions
    drawn uniformly by a generator seeded identically on every worker, so all workers pick
    the same positions and one all-reduce of k values suffices. Positions are drawn on the
    CPU, so CPU and GPU runs with the same seed pick the same positions."""

    name = "randomk"
    summary = "k random positions, the same on every worker; all-reduce of their values"

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        self._generator = torch.Generator()
        self._generator.manual_seed(self.seed)

    def _run(self, step: Step) -> torch.Tensor:
        k = target_count(self.density, step.d)
        step.handshake(count=k)
        with step.phase("select"):
            positions = sample_distinct(step.d, k, self._generator).to(step.x.device, step.layout.index_dtype)
        with step.phase("comm"):
            avg = allreduce_at(self.comm, step.x, positions, step.output())
        step.commit_sparse(positions)
        step.counted(selected=k, received=k)
        return avg

    def _method_state(self) -> dict[str, Any]:
        return {"generator": self._generator.get_state()}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        self._generator.set_state(state["generator"])
