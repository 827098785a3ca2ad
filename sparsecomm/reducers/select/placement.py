"""Placement: which part of the flat vector each worker selects from.

Both placements cut the vector into P exclusive, contiguous partitions that together cover
it; at step t worker r owns partition ``(t + r) mod P``, so ownership rotates and no two
workers ever select the same coordinate.
"""
from __future__ import annotations

__all__ = ["Partitions", "EqualPartitions", "BlockPartitions"]


class Partitions:
    """P exclusive contiguous partitions of ``range(d)`` with rotating ownership."""

    def __init__(self, d: int, workers: int) -> None:
        if workers < 1:
            raise ValueError(f"need at least one worker, got {workers}")
        self.d = d
        self.workers = workers

    def bounds(self) -> list[tuple[int, int]]:
        """``[start, end)`` of every partition, in order."""
        raise NotImplementedError

    def owned(self, step: int, rank: int) -> int:
        """The partition worker ``rank`` selects from at ``step``."""
        return (step + rank) % self.workers

    def by_partition(self, per_rank: list[int], step: int) -> list[int]:
        """Reorder per-rank figures of ``step`` into per-partition order."""
        out = [0] * self.workers
        for rank, value in enumerate(per_rank):
            out[self.owned(step, rank)] = value
        return out

    def update(self, counts: list[int]) -> None:
        """Adapt to the last step's selected count per partition (static by default)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class EqualPartitions(Partitions):
    """MiCRO's placement (Yoon & Oh, HiPC 2023): P equal partitions, the first ``d mod P``
    one element longer."""

    def __init__(self, d: int, workers: int) -> None:
        super().__init__(d, workers)
        q, r = divmod(d, workers)
        sizes = [q + (1 if p < r else 0) for p in range(workers)]
        starts = [sum(sizes[:p]) for p in range(workers)]
        self._bounds = [(s, s + n) for s, n in zip(starts, sizes)]

    def bounds(self) -> list[tuple[int, int]]:
        return list(self._bounds)


class BlockPartitions(Partitions):
    """ExDyna's block-based partitioning with dynamic allocation (Yoon & Oh, CCGrid 2024).

    The vector is cut into ``num_blocks`` blocks of ``floor(d / num_blocks)`` elements rounded
    down to a multiple of ``align``; the remainder belongs to the last partition. (When d is so
    small that this size would be 0, blocks are ``align`` elements and there are
    ``d // align`` of them.) Partition p starts with ``floor(B / P)`` blocks, plus one for the
    first ``B mod P``. After each step the boundaries are swept once, left to right: if
    partition p selected more than ``high`` times the per-partition average and p+1 less than
    ``low`` times it, p gives its last block to p+1 (and the mirror case); a partition never
    shrinks below ``B * min_fraction / P`` blocks. As in the authors' code, each move shifts
    the estimated counts by ``block_size * (last density)`` before the sweep goes on.
    """

    def __init__(self, d: int, workers: int, num_blocks: int = 1024, align: int = 32,
                 high: float = 1.05, low: float = 0.95238, min_fraction: float = 0.25) -> None:
        super().__init__(d, workers)
        if num_blocks < 1 or align < 1:
            raise ValueError(f"num_blocks and align must be positive, got {num_blocks} and {align}")
        size = (d // num_blocks) // align * align
        if size == 0:
            size, num_blocks = align, d // align
        self.block_size = size
        self.num_blocks = num_blocks
        self.remainder = d - size * num_blocks
        self.high, self.low = high, low
        self.min_blocks = num_blocks * min_fraction / workers
        q, r = divmod(num_blocks, workers)
        self.blocks = [q + (1 if p < r else 0) for p in range(workers)]
        self.moves = 0

    def bounds(self) -> list[tuple[int, int]]:
        out, at = [], 0
        for p, n in enumerate(self.blocks):
            end = (at + n) * self.block_size
            out.append((at * self.block_size, end if p < self.workers - 1 else self.d))
            at += n
        return out

    def update(self, counts: list[int]) -> None:
        total = sum(counts)
        if total <= 0 or self.workers < 2:
            return
        average = total / self.workers
        shift = int(self.block_size * total / self.d)
        estimate = [float(c) for c in counts]
        for p in range(self.workers - 1):
            left, right = estimate[p] / average, estimate[p + 1] / average
            if left > self.high and right < self.low and self.blocks[p] - 1 >= self.min_blocks:
                self.blocks[p] -= 1
                self.blocks[p + 1] += 1
                estimate[p] -= shift
                estimate[p + 1] += shift
                self.moves += 1
            elif left < self.low and right > self.high and self.blocks[p + 1] - 1 >= self.min_blocks:
                self.blocks[p] += 1
                self.blocks[p + 1] -= 1
                estimate[p] += shift
                estimate[p + 1] -= shift
                self.moves += 1

    def state_dict(self) -> dict:
        return {"blocks": list(self.blocks), "moves": self.moves}

    def load_state_dict(self, state: dict) -> None:
        blocks = [int(b) for b in state["blocks"]]
        if len(blocks) != self.workers or sum(blocks) != self.num_blocks:
            raise ValueError(f"saved partition of {sum(blocks)} blocks over {len(blocks)} workers does not fit "
                             f"{self.num_blocks} blocks over {self.workers} workers")
        self.blocks = blocks
        self.moves = int(state["moves"])
