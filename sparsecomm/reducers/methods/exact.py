"""The uncompressed baseline."""
from __future__ import annotations

import torch

from ..base import Reducer, Step
from ..comm.exchange import dense_allreduce_mean
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
        step.counted(selected=step.d, received=step.d)
        return avg
