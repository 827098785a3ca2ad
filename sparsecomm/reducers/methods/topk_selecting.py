"""The ``selection`` option of the methods that select by exact top-k."""
from __future__ import annotations

from typing import Any

from ..base import Reducer
from ..layout import Layout
from ..select.exact_topk import TopKSelection


class TopKSelecting(Reducer):
    """A base for methods whose selection is an exact top-k by the rule of
    :mod:`~sparsecomm.reducers.select.exact_topk` (equal |x|: the lower position first; NaN
    above all). ``selection``: ``"auto"`` (default: a sampled bound and the fused pass where it
    can run), ``"fused"`` (raises where it cannot) or ``"torch"`` (torch.topk per range); the
    selected positions are the same. The method selects with ``self.topk(call, ranges, ks)``
    (positions, and x there when the fused path has them). While the fused path is on, ``x``
    is built in that pass unless the method reads ``call.x`` first."""

    def __init__(self, *, selection: str = "auto", **common: Any) -> None:
        self.topk = TopKSelection(selection)
        super().__init__(**common)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "selection": self.topk.selection}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.topk.describe()}

    def _fuses_compensation(self) -> bool:
        return self.topk.fused

    def _configure(self, layout: Layout) -> None:
        super()._configure(layout)
        self.topk.configure(layout)
