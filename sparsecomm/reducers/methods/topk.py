"""Top-k sparsification, per tensor and over the whole vector."""
from __future__ import annotations

from typing import Any

import torch

from ..base import ReduceCall
from ..layout import Layout
from ..registry import register
from ..select.exact_topk import TopKSelection
from ..select.primitives import target_count
from .sparse_base import SparseReducer


class _ExactTopK(SparseReducer):
    """A top-k over fixed ranges of the flat vector (``_ranges``), by the rule of
    :mod:`~sparsecomm.reducers.select.exact_topk` (equal |x|: the lower position first).
    ``selection``: ``"auto"`` (default: the sampled bound and the fused pass where it can run),
    ``"fused"`` or ``"torch"`` (torch.topk per range); the selected positions are the same."""

    def __init__(self, *, exchange: str = "gather", selection: str = "auto", **common: Any) -> None:
        self.topk = TopKSelection(selection)
        super().__init__(exchange=exchange, **common)
        self._ranges: list[tuple[int, int]] = []
        self._ks: list[int] = []

    def options(self) -> dict[str, Any]:
        return {**super().options(), "selection": self.topk.selection}

    def describe(self) -> dict[str, Any]:
        return self.topk.describe()

    def _fuses_compensation(self) -> bool:
        return self.topk.fused

    def _configure(self, layout: Layout) -> None:
        self.topk.configure(layout)

    def _run(self, call: ReduceCall) -> torch.Tensor:
        idx, values = self.topk(call, self._ranges, self._ks)
        header = call.handshake(count=idx.numel())
        return self._send(call, idx, header.counts, values)


@register
class TopK(_ExactTopK):
    """Layer-wise top-k (as in the PowerSGD and "rethinking" research code): in each tensor
    the k_t = max(1, floor(c * numel_t)) largest |x|."""

    name = "topk"
    summary = "layer-wise top-k: the k_t largest |x| of every tensor"

    def _configure(self, layout: Layout) -> None:
        super()._configure(layout)
        self._ranges = list(layout.segments)
        self._ks = [target_count(self.density, n) for n in layout.sizes]


@register
class GlobalTopK(_ExactTopK):
    """Global top-k: the k = max(1, floor(c * d)) largest |x| of the flat vector."""

    name = "global_topk"
    summary = "top-k over the whole flat vector"

    def _configure(self, layout: Layout) -> None:
        super()._configure(layout)
        self._ranges = [(0, layout.numel)]
        self._ks = [target_count(self.density, layout.numel)]
