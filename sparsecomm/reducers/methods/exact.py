"""The uncompressed baseline."""
from __future__ import annotations

import torch

from ..base import Reducer, Step
from ..exchange import dense_allreduce_mean
from ..registry import register


@register
class Exact(Reducer):
    """Dense all-reduce of the whole gradient: one flat collective per step, no residual."""

    name = "exact"
    summary = "dense all-reduce baseline (every coordinate, one flat collective)"
    compensates = False
    uses_density = False

    def _run(self, step: Step) -> torch.Tensor:
        step.handshake(count=step.d)
        with step.phase("comm"):
            avg = dense_allreduce_mean(self.comm, step.x)
        step.stats.update(density=1.0 if step.d else 0.0, local_density=1.0 if step.d else 0.0)
        return avg
