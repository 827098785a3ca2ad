"""MiCRO and ExDyna: threshold selection inside rotating exclusive partitions."""
from __future__ import annotations

from typing import Any

import torch

from ...validate import positive_int
from ..base import Reducer, Step
from ..control import MultiplicativeScaling
from ..exchange import union_allreduce
from ..layout import Layout
from ..placement import BlockPartitions, EqualPartitions, Partitions
from ..registry import register
from ..selection import ThresholdSearch, initial_threshold, target_count


class PartitionedThreshold(Reducer):
    """Worker r selects |x| >= lambda only inside partition (t + r) mod P; if nothing passes it
    sends one position anyway (start + t mod size) so every step has a well-formed exchange.
    Partitions never overlap, so the union of indices is their concatenation; every worker
    all-reduces its values there and zeroes its residual there. lambda follows
    :class:`~sparsecomm.reducers.control.MultiplicativeScaling` with k = max(1, floor(c d)),
    so the total count over all workers tracks k."""

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        self._partitions: Partitions | None = None
        self._control: MultiplicativeScaling | None = None
        self._search = ThresholdSearch(self.density)

    def _partitioning(self, d: int) -> Partitions:
        raise NotImplementedError

    def _configure(self, layout: Layout) -> None:
        k = target_count(self.density, layout.numel)
        self._partitions = self._partitioning(layout.numel)
        self._control = MultiplicativeScaling(k, initial_threshold(k))

    @property
    def partitions(self) -> Partitions:
        if self._partitions is None:
            raise RuntimeError("partitions are set up at the first reduce()")
        return self._partitions

    def _run(self, step: Step) -> torch.Tensor:
        x, control, parts = step.x, self._control, self.partitions
        assert control is not None
        threshold = control.threshold
        start, end = parts.bounds()[parts.owned(step.index, self.rank)]
        with step.phase("select"):
            idx = self._search(x, threshold, step.layout.index_dtype, start, end, step.scratch())
            if idx.numel() == 0 and end > start:
                idx = torch.tensor([start + step.index % (end - start)], dtype=idx.dtype, device=x.device)
        header = step.handshake(count=idx.numel())
        with step.phase("comm"):
            avg, union = union_allreduce(self.comm, x, idx, header.counts, step.output(), disjoint=True)
        step.commit_sparse(union)
        total = sum(header.counts)
        step.counted(selected=idx.numel(), received=total)
        step.stats.update(threshold=threshold, partition_size=step.fraction(end - start),
                          load_imbalance=max(header.counts) * self.comm.size / total - 1.0 if total else 0.0)
        control.update(total)
        parts.update(parts.by_partition(header.counts, step.index))
        return avg

    def _method_state(self) -> dict[str, Any]:
        assert self._control is not None
        return {"control": self._control.state_dict(), "partitions": self.partitions.state_dict()}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        assert self._control is not None
        self._control.load_state_dict(state["control"])
        self.partitions.load_state_dict(state["partitions"])


@register
class Micro(PartitionedThreshold):
    """MiCRO (Yoon & Oh, HiPC 2023): P equal, static partitions with rotating ownership,
    threshold selection, union all-reduce."""

    name = "micro"
    summary = "threshold selection in P equal rotating exclusive partitions"

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)

    def _partitioning(self, d: int) -> Partitions:
        return EqualPartitions(d, self.comm.size)


@register
class ExDyna(PartitionedThreshold):
    """ExDyna (Yoon & Oh, CCGrid 2024): block-based partitions whose boundaries move towards
    balanced per-partition counts (:class:`~sparsecomm.reducers.placement.BlockPartitions`),
    rotating exclusive ownership, online threshold scaling, union all-reduce."""

    name = "exdyna"
    summary = "threshold selection in dynamically balanced rotating block partitions"

    def __init__(self, *, num_blocks: int = 1024, block_align: int = 32, **common: Any) -> None:
        self.num_blocks = positive_int("num_blocks", num_blocks)
        self.block_align = positive_int("block_align", block_align)
        super().__init__(**common)

    def options(self) -> dict[str, Any]:
        return {"num_blocks": self.num_blocks, "block_align": self.block_align}

    def _partitioning(self, d: int) -> Partitions:
        return BlockPartitions(d, self.comm.size, self.num_blocks, self.block_align)
