"""LEGACY: layer-wise top-k whose density depends on the tensor's size and on the training phase."""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ...validate import boolean, choice, positive_ints
from ..base import ReduceCall
from ..layout import Layout
from ..registry import register
from ..select.primitives import target_count
from .sparse_base import SparseReducer
from .topk_selecting import TopKSelecting

SCHEDULES = ("layer", "epoch", "both")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_list(v: Any) -> bool:
    return isinstance(v, Sequence) and not isinstance(v, (str, bytes))


@register
class Legacy(TopKSelecting, SparseReducer):
    """LEGACY: adaptive compression by layer size and by training phase, over layer-wise top-k
    (each tensor sends its k_t = max(1, floor(c_t numel_t)) largest |x|; sparse gather-sum by
    default, ``exchange="union"`` as for ``topk``). The ``density`` argument is not used;
    ``target_density`` reports sum_t k_t / d.

    Size groups: ``group_splits`` s_1 < s_2 < ... are tensor sizes; a tensor goes to the first
    group i whose split exceeds its element count (numel < s_i), else to the last group, so
    there are len(group_splits) + 1 groups. ``schedule`` picks the density c_t:

    * ``"layer"``: ``group_compressions`` holds one density per size group;
    * ``"epoch"``: ``group_compressions`` holds one density per training phase, the same for
      every tensor (``group_splits`` is not used); the total epochs are split evenly across
      the phases, used in order: phase i covers epochs e with i T/n <= e < (i + 1) T/n, and
      epochs past the end stay in the last phase (the seed code indexes past its table there);
    * ``"both"``: ``group_compressions`` is a table [phase][size group].

    Densities are fractions in (0, 1]; ``percent=True`` takes them in the seed code's percent
    form (1 means 1%). The defaults are the seed code's: ``group_splits=[10000]`` and
    ``group_compressions=[1, 1]`` percent, i.e. 1% for every tensor; ``schedule="layer"`` is
    its size-group strategy. The current epoch and the total come from :meth:`begin_epoch`;
    until it is called (or while the total is unknown or not positive) the phase is 0.

    ``selection``: how the top-k is found, as for ``topk`` (:class:`~.topk_selecting.TopKSelecting`).

    Stats: ``phase``. ``describe()`` returns the schedule, the phase, each size group's bounds,
    tensor count and density, the per-tensor densities in force, and the selection path.
    """

    name = "legacy"
    per_tensor = True  # each tensor's density follows its own size and the phase
    summary = "layer-wise top-k with densities by tensor-size group and training phase (LEGACY)"
    uses_density = False

    def __init__(self, *, group_splits: Sequence[int] = (10000,), group_compressions: Sequence[Any] = (0.01, 0.01),
                 schedule: str = "layer", percent: bool = False, exchange: str = "gather", **common: Any) -> None:
        choice("schedule", schedule, SCHEDULES)
        boolean("percent", percent)
        splits = positive_ints("group_splits", group_splits, "tensor sizes")
        if any(b <= a for a, b in zip(splits, splits[1:])):
            raise ValueError(f"group_splits must be strictly increasing, got {splits}")
        table = self._check_compressions(group_compressions, schedule, len(splits) + 1, percent)
        super().__init__(exchange=exchange, **common)
        self.group_splits = splits
        self.schedule = schedule
        self.percent = percent
        self.group_compressions = ([list(row) for row in group_compressions] if schedule == "both"
                                   else list(group_compressions))
        self._table = table  # [phase][size group], fractions
        self._epoch: int | None = None
        self._epochs: float | None = None
        self._ks_by_phase: dict[int, list[int]] = {}
        self._target = 1.0

    @staticmethod
    def _check_compressions(values: Any, schedule: str, groups: int, percent: bool) -> list[list[float]]:
        """Validate ``group_compressions`` for ``schedule``; return it as [phase][size group] fractions."""
        unit = "percentages in (0, 100]" if percent else "densities in (0, 1]"

        def density(v: Any) -> float:
            if not _is_number(v) or not math.isfinite(v):
                raise ValueError(f"group_compressions must hold numbers ({unit}), got {v!r}")
            c = v / 100.0 if percent else float(v)
            if not 0 < c <= 1:
                hint = "" if percent or not 1 < v <= 100 else " (percent=True takes percentages)"
                raise ValueError(f"group_compressions values must be {unit}, got {v!r}{hint}")
            return c

        if not _is_list(values) or not values:
            raise ValueError(f"group_compressions must be a non-empty list, got {values!r}")
        if schedule == "layer":
            if len(values) != groups:
                raise ValueError(f"group_compressions must hold len(group_splits) + 1 = {groups} densities for "
                                 f"schedule='layer' (one per size group), got {len(values)}")
            return [[density(v) for v in values]]
        if schedule == "epoch":
            if not all(_is_number(v) for v in values):
                raise ValueError(f"group_compressions must be a flat list of densities for schedule='epoch' "
                                 f"(one per training phase), got {values!r}")
            return [[density(v)] * groups for v in values]
        rows = []
        for p, row in enumerate(values):
            if not _is_list(row) or len(row) != groups:
                raise ValueError(f"group_compressions must be a table [phase][size group] for schedule='both': "
                                 f"every row must hold len(group_splits) + 1 = {groups} densities; row {p} is {row!r}")
            rows.append([density(v) for v in row])
        return rows

    def options(self) -> dict[str, Any]:
        return {**super().options(), "group_splits": list(self.group_splits),
                "group_compressions": ([list(r) for r in self.group_compressions] if self.schedule == "both"
                                       else list(self.group_compressions)),
                "schedule": self.schedule, "percent": self.percent}

    # ------------------------------------------------------------------------ training context
    def begin_epoch(self, epoch: int, lr: float, epochs: float) -> None:
        self._epoch = int(epoch)
        self._epochs = None if epochs is None else float(epochs)

    def phase(self) -> int:
        """The training phase in force: the epoch's share of the total, 0 until both are known."""
        n = len(self._table)
        total = self._epochs
        if n == 1 or total is None or not math.isfinite(total) or total <= 0:
            return 0
        epoch = self._epoch or 0
        portion = total / n
        for i in range(n):
            if epoch < (i + 1) * portion:
                return i
        return n - 1

    def group_of(self, numel: int) -> int:
        """The size group of a tensor of ``numel`` elements."""
        for i, split in enumerate(self.group_splits):
            if numel < split:
                return i
        return len(self.group_splits)

    @property
    def target_density(self) -> float:
        return self._target

    def _configure(self, layout: Layout) -> None:
        super()._configure(layout)
        self._ks_by_phase = {}
        self._groups = [self.group_of(n) for n in layout.sizes]

    def _ks(self, layout: Layout, phase: int) -> list[int]:
        ks = self._ks_by_phase.get(phase)
        if ks is None:
            row = self._table[phase]
            ks = self._ks_by_phase[phase] = [target_count(row[g], n) for g, n in zip(self._groups, layout.sizes)]
        return ks

    # ------------------------------------------------------------------------ the step
    def _run(self, call: ReduceCall) -> torch.Tensor:
        layout = call.layout
        phase = self.phase()
        ks = self._ks(layout, phase)
        self._target = sum(ks) / layout.numel if layout.numel else 1.0
        idx, values = self.topk(call, layout.segments, ks)
        header = call.handshake(count=idx.numel())
        avg = self._send(call, idx, header.counts, values)
        call.stats["phase"] = phase
        return avg

    # ------------------------------------------------------------------------ reporting
    def describe(self) -> dict[str, Any]:
        phase = self.phase()
        row = self._table[phase]
        bounds = [0] + self.group_splits + [None]
        info: dict[str, Any] = {"epoch": self._epoch,
                                "total_epochs": self._epochs, "phases": len(self._table), "phase": phase}
        groups = [{"min_numel": bounds[i], "max_numel": None if bounds[i + 1] is None else bounds[i + 1] - 1,
                   "density": row[i]} for i in range(len(row))]
        if self.layout is not None:
            for i, g in enumerate(groups):
                g["tensors"] = sum(1 for x in self._groups if x == i)
            info["densities"] = [row[g] for g in self._groups]
        info["groups"] = groups
        return {**super().describe(), **info}
