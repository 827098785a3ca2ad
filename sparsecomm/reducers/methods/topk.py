"""Top-k sparsification, per tensor and over the whole vector."""
from __future__ import annotations

from typing import Any

import torch

from ..base import ReduceCall
from ..layout import Layout
from ..registry import register
from ..select.primitives import target_count, topk, topk_per_segment
from .sparse_base import SparseReducer


@register
class TopK(SparseReducer):
    """Layer-wise top-k (as in the PowerSGD and "rethinking" research code): in each tensor
    the k_t = max(1, floor(c * numel_t)) largest |x|."""

    name = "topk"
    per_tensor = True  # k_t and the top-k of each tensor are its own
    summary = "layer-wise top-k: the k_t largest |x| of every tensor"

    def __init__(self, *, exchange: str = "gather", **common: Any) -> None:
        super().__init__(exchange=exchange, **common)
        self._ks: list[int] = []

    def _configure(self, layout: Layout) -> None:
        self._ks = [target_count(self.density, n) for n in layout.sizes]

    def _run(self, call: ReduceCall) -> torch.Tensor:
        with call.phase("select"):
            idx = topk_per_segment(call.x, call.layout.segments, self._ks, call.layout.index_dtype, call.scratch())
        header = call.handshake(count=idx.numel())
        return self._send(call, idx, header.counts)


@register
class GlobalTopK(SparseReducer):
    """Global top-k: the k = max(1, floor(c * d)) largest |x| of the flat vector."""

    name = "global_topk"
    per_tensor = False  # one k over d, the largest |x| of all tensors together
    summary = "top-k over the whole flat vector"

    def _run(self, call: ReduceCall) -> torch.Tensor:
        with call.phase("select"):
            idx = topk(call.x, target_count(self.density, call.d), call.layout.index_dtype, call.scratch())
        header = call.handshake(count=idx.numel())
        return self._send(call, idx, header.counts)
