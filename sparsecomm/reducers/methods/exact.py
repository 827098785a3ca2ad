"""The uncompressed baseline."""
from __future__ import annotations

import torch

from ..base import ReduceCall, Reducer
from ..comm.exchange import dense_allreduce_mean
from ..registry import register


@register
class Exact(Reducer):
    """Dense all-reduce of the whole gradient: one flat collective per step, no residual."""

    name = "exact"
    per_tensor = True  # every coordinate is averaged on its own
    summary = "dense all-reduce baseline (every coordinate, one flat collective)"
    compensates = False
    uses_density = False

    def _run(self, call: ReduceCall) -> torch.Tensor:
        call.handshake(count=call.d)
        with call.phase("comm"):
            avg = dense_allreduce_mean(self.comm, call.x)
        call.counted(selected=call.d, received=call.d)
        return avg
