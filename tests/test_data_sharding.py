"""Training shards and evaluation ranges: disjoint, equal, covering, reshuffled per epoch."""
import pytest
import torch

from sparsecomm.data.sharding import ShardSampler, eval_range, shard_indices


@pytest.mark.parametrize("n,world", [(0, 1), (1, 1), (7, 1), (10, 3), (100, 4), (1001, 8), (5, 8)])
def test_shards_disjoint_equal_and_cover_all_but_remainder(n, world):
    shards = [shard_indices(n, r, world, epoch=3, seed=11) for r in range(world)]
    assert {len(s) for s in shards} == {n // world}
    assert all(s.dtype == torch.long for s in shards)
    union = torch.cat(shards)
    assert len(set(union.tolist())) == len(union)  # disjoint, no repeats
    assert set(union.tolist()) <= set(range(n))
    assert n - len(union) == n % world < world


def test_shards_shuffled_differ_per_epoch_and_seed_repeat_per_call():
    a = shard_indices(1000, 1, 4, epoch=0, seed=0)
    assert torch.equal(a, shard_indices(1000, 1, 4, epoch=0, seed=0))
    assert not torch.equal(a, shard_indices(1000, 1, 4, epoch=1, seed=0))
    assert not torch.equal(a, shard_indices(1000, 1, 4, epoch=0, seed=1))
    assert not torch.equal(a.sort().values, torch.arange(1, 1000, 4))  # not the unshuffled stride
    # (seed, epoch) pairs are not confused: (0, 1) != (1, 0)
    assert not torch.equal(shard_indices(1000, 0, 1, epoch=1, seed=0), shard_indices(1000, 0, 1, epoch=0, seed=1))


def test_dropped_remainder_changes_with_epoch():
    dropped = []
    for epoch in range(5):
        kept = torch.cat([shard_indices(10, r, 3, epoch=epoch) for r in range(3)])
        dropped.append(sorted(set(range(10)) - set(kept.tolist())))
    assert len({tuple(d) for d in dropped}) > 1


@pytest.mark.parametrize("n,world", [(0, 3), (2, 3), (10, 3), (10, 1), (1000, 7), (12, 4)])
def test_eval_ranges_cover_exactly_once(n, world):
    ranges = [eval_range(n, r, world) for r in range(world)]
    covered = [i for a, b in ranges for i in range(a, b)]
    assert covered == list(range(n))
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_sampler_follows_shard_indices():
    s = ShardSampler(50, 2, 3, seed=5)
    s.set_epoch(4)
    assert list(s) == shard_indices(50, 2, 3, epoch=4, seed=5).tolist()
    assert len(s) == 16


@pytest.mark.parametrize("args,match", [
    ((10, 3, 3), "rank"), ((10, -1, 3), "rank"), ((10, 0, 0), "world"), ((-1, 0, 1), "n must"),
    ((10, 0, 2, -1, 0), "epoch"), ((10, 0, 2, 0, -5), "seed"), ((10, 0.5, 2), "rank"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        shard_indices(*args)


def test_eval_range_bad_rank():
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, 1\]"):
        eval_range(10, 2, 2)
