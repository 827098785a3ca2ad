"""Which examples each worker trains and evaluates on.

Training: every rank draws the same permutation of the data set from a generator seeded by
``(seed, epoch)``, drops the last ``n mod world`` positions and takes every ``world``-th
position starting at its rank. The shards are disjoint, shuffled afresh each epoch and of
equal size, so every worker runs the same number of steps (collectives need that). Splitting
an unshuffled array contiguously instead is how one NCF worker once got nearly all positives.

Evaluation: contiguous, disjoint chunks that together cover every example exactly once, so the
workers' partial metrics add up to the metric of the whole test set (never the same chunk
evaluated P times).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["shard_indices", "eval_range", "ShardSampler"]


def _check(n: int, rank: int, world: int) -> None:
    """ValueError for a negative size, a world below 1 or a rank outside [0, world)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world - 1}] for world={world}, got {rank!r}")


def _generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator seeded by the pair (seed, epoch), hashed by numpy's SeedSequence."""
    for name, value in (("seed", seed), ("epoch", epoch)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def shard_indices(n: int, rank: int, world: int, epoch: int = 0, seed: int = 0) -> torch.Tensor:
    """This rank's training indices for one epoch: ``floor(n / world)`` distinct ints in range(n).

    The permutation depends only on ``(n, seed, epoch)`` (and the torch version), so every rank
    computes the same one without communicating; the ``n mod world`` examples left out change
    from epoch to epoch.
    """
    _check(n, rank, world)
    perm = torch.randperm(n, generator=_generator(seed, epoch))
    return perm[:(n // world) * world][rank::world].clone()


def eval_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's evaluation chunk ``[start, end)``; sizes differ by at most one, lower ranks larger."""
    _check(n, rank, world)
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardSampler(Sampler[int]):
    """A DataLoader sampler yielding :func:`shard_indices`; call ``set_epoch`` before each epoch."""

    def __init__(self, n: int, rank: int, world: int, seed: int = 0) -> None:
        _check(n, rank, world)
        self.n, self.rank, self.world, self.seed, self.epoch = n, rank, world, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(shard_indices(self.n, self.rank, self.world, self.epoch, self.seed).tolist())

    def __len__(self) -> int:
        return self.n // self.world
