"""Top-k sparsification, per tensor and over the whole vector."""
from __future__ import annotations

import torch

from ..base import ReduceCall
from ..layout import Layout
from ..registry import register
from ..select.primitives import target_count
from .sparse_base import SparseReducer
from .topk_selecting import TopKSelecting


@register
class TopK(TopKSelecting, SparseReducer):
    """Layer-wise top-k (as in the PowerSGD and "rethinking" research code): in each tensor
    the k_t = max(1, floor(c * numel_t)) largest |x| (equal |x|: the lower position first)."""

    name = "topk"
    per_tensor = True  # k_t and the top-k of each tensor are its own
    summary = "layer-wise top-k: the k_t largest |x| of every tensor"

    def _configure(self, layout: Layout) -> None:
        super()._configure(layout)
        self._ks = [target_count(self.density, n) for n in layout.sizes]

    def _run(self, call: ReduceCall) -> torch.Tensor:
        idx, values = self.topk(call, call.layout.segments, self._ks)
        header = call.handshake(count=idx.numel())
        return self._send(call, idx, header.counts, values)


@register
class GlobalTopK(TopKSelecting, SparseReducer):
    """Global top-k: the k = max(1, floor(c * d)) largest |x| of the flat vector (equal |x|:
    the lower position first)."""

    name = "global_topk"
    per_tensor = False  # one k over d, the largest |x| of all tensors together
    summary = "top-k over the whole flat vector"

    def _run(self, call: ReduceCall) -> torch.Tensor:
        idx, values = self.topk(call, [(0, call.d)], [target_count(self.density, call.d)])
        header = call.handshake(count=idx.numel())
        return self._send(call, idx, header.counts, values)
