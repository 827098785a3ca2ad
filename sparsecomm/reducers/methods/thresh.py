"""Hard-threshold sparsification with a fixed threshold."""
from __future__ import annotations

from typing import Any

import torch

from ...validate import choice, number
from ..base import ReduceCall
from ..select.fused import SELECTIONS, FusedSearch, resolve
from ..layout import Layout
from ..registry import register
from ..select.primitives import ThresholdSearch, initial_threshold, target_count, threshold_select_segments
from .sparse_base import SparseReducer

SCOPES = ("flat", "layer")


@register
class HardThreshold(SparseReducer):
    """Hard threshold (Sahu et al., NeurIPS 2021): send every coordinate with |x| >= lambda,
    a constant. By default lambda = 1 / (2 sqrt(k)) with k = max(1, floor(c * d)) (their rule
    of thumb for the density one would use with top-k); with ``scope="layer"`` each tensor
    gets 1 / (2 sqrt(k_t)) from its own size. An explicit ``threshold`` applies everywhere.
    The achieved density is whatever lambda gives."""

    name = "thresh"
    summary = "hard threshold |x| >= lambda, lambda fixed (default 1/(2 sqrt(k)))"

    def __init__(self, *, threshold: float | None = None, scope: str = "flat", selection: str = "auto",
                 exchange: str = "gather",
                 **common: Any) -> None:
        self.scope = choice("scope", scope, SCOPES)
        self.selection = choice("selection", selection, SELECTIONS)
        if selection == "fused" and scope == "layer" and threshold is None:
            raise ValueError("selection='fused' needs one threshold: use scope='flat' or selection='torch'")
        self._fused = False
        self._fused_search = FusedSearch()
        self.threshold = None if threshold is None else number("threshold", threshold, 0.0, low_open=True)
        super().__init__(exchange=exchange, **common)
        self._lambdas: list[float] = []
        self._flat = 0.0
        self._search = ThresholdSearch(self.density)

    @property
    def per_tensor(self) -> bool:  # type: ignore[override]
        """An explicit threshold, or one per tensor from its own k_t (``scope="layer"``), judges
        each coordinate by its tensor alone; the default lambda comes from k = c d, the whole
        vector's length."""
        return self.threshold is not None or self.scope == "layer"

    def options(self) -> dict[str, Any]:
        return {**super().options(), "threshold": self.threshold, "scope": self.scope, "selection": self.selection}

    def _configure(self, layout: Layout) -> None:
        if self.threshold is None and self.scope == "layer":
            self._lambdas = [initial_threshold(target_count(self.density, n)) for n in layout.sizes]
        else:
            self._lambdas = []
            self._flat = self.threshold or initial_threshold(target_count(self.density, layout.numel))
        self._fused = resolve(self.selection, layout.device, layout.dtype, layout.index_dtype,
                              "per-layer thresholds are not fused" if self._lambdas else None)

    def _fuses_compensation(self) -> bool:
        return self._fused

    def describe(self) -> dict[str, Any]:
        return {"selection": "fused" if self._fused else "torch"}

    def _run(self, call: ReduceCall) -> torch.Tensor:
        layout = call.layout
        values = None
        with call.phase("select"):
            if self._fused:  # x = g + m built in the same pass, x[idx] with it
                found = call.select_fused(self._flat, search=self._fused_search)
                idx, values = found.indices, found.values
            elif self._lambdas:
                idx = threshold_select_segments(call.x, self._lambdas, layout.segments, layout.index_dtype)
            else:
                idx = self._search(call.x, self._flat, layout.index_dtype, scratch=call.scratch())
        header = call.handshake(count=idx.numel())
        avg = self._send(call, idx, header.counts, values)
        if not self._lambdas:
            call.stats["threshold"] = self._flat
        return avg
