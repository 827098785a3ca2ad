"""CLT-k, gTop-k and DEFT beyond the generic tests: who selects, what every rank agrees on,
how the bytes grow, and DEFT's units, k allocation and bin-packing on hand-computed cases."""
import math
import random

import pytest
import torch

import reducer_scenarios as sc
from reducer_reference import Simulation
from reference_leader_tree import deft_bins, deft_k, deft_units
from sparsecomm import reducers
from sparsecomm.reducers.methods import deft as deft_mod
from sparsecomm.reducers.methods.deft import COMMON, pack_units, split_units
from sparsecomm.reducers.select.exact_topk import TopKSelection
from sparsecomm.reducers.select.primitives import allocate_k
from sparsecomm.reducers.methods.gtopk import merge_top
from sparsecomm.reducers.select.primitives import target_count

HANDSHAKE = 48  # bytes of the step's handshake row (6 float64 fields; docs/reducers.md)
D = sum(math.prod(s) for s in sc.SHAPES)
DENSITY = 0.05


# ------------------------------------------------------------- functions the workers run
def counted_cltk(steps: int) -> dict:
    """cltk with its top-k selection wrapped in a counter: how often this rank asked for a
    positive k, per step (a follower's selection asks for none: its pass only builds x)."""
    calls = []
    original = TopKSelection.__call__

    def counting(self, call, ranges, ks):
        calls[-1] += sum(ks) > 0
        return original(self, call, ranges, ks)

    TopKSelection.__call__ = counting
    try:
        r = reducers.build("cltk", density=DENSITY)
        out = {"calls": [], "stats": []}
        for t in range(steps):
            calls.append(0)
            r.reduce(sc.make_grads(sc.SHAPES, sc.rank(), t))
            out["calls"].append(calls[-1])
            out["stats"].append(r.stats)
        return out
    finally:
        TopKSelection.__call__ = original


def big_bias_grads(rank: int, step: int) -> list[torch.Tensor]:
    """A 100-element weight of scale 0.01 and a 2-element bias of scale 1 or more."""
    weight = sc.make_grads(((100,),), rank, step, scale=0.01)[0]
    return [weight, torch.tensor([2.0 + rank, -1.0 - step])]


def deft_with_big_bias(steps: int) -> dict:
    """DEFT on :func:`big_bias_grads`: the bias's norm earns it more than its 2 coordinates, so
    it is a common unit."""
    r = reducers.build("deft", density=0.1)
    out = {"avg": [], "memory": [], "stats": [], "units": None}
    for t in range(steps):
        g = big_bias_grads(sc.rank(), t)
        out["avg"].append(sc.flat(r.reduce(g)))
        out["memory"].append(sc.flat(r.residual))
        out["stats"].append(r.stats)
        out["units"] = r.units
    return out


def run_and_compare(clusters, name, P, shapes, density, steps=4, **options):
    """Run ``name`` on P processes and check it against the reference step by step."""
    results = clusters(P).run(sc.run_steps, name, density=density, steps=steps, shapes=shapes, options=options)
    sim = Simulation(name, P, shapes, density, **options)
    for t in range(steps):
        grads = [sc.make_grads(shapes, r, t) for r in range(P)]
        ref_avg, ref_residuals = sim.step(grads)
        for r in range(P):
            assert torch.equal(results[r]["avg"][t], results[0]["avg"][t])
            assert torch.equal(results[r]["memory"][t], ref_residuals[r]), f"step {t}: rank {r}'s residual"
        torch.testing.assert_close(results[0]["avg"][t], ref_avg, rtol=1e-5, atol=1e-7)
    return results, sim


# --------------------------------------------------------------------------------- CLT-k
def test_cltk_only_the_leader_selects_and_the_leader_rotates(clusters):
    P, steps = 3, 7
    k = target_count(DENSITY, D)
    results = clusters(P).run(counted_cltk, steps)
    for t in range(steps):
        leader = t % P
        for r in range(P):
            stats = results[r]["stats"][t]
            assert stats["leader"] == leader
            assert results[r]["calls"][t] == (1 if r == leader else 0), f"step {t}: rank {r} ran top-k"
            assert stats["local_density"] == (k / D if r == leader else 0.0)
            assert stats["density"] == k / D
            # the leader alone sends the k indices (a broadcast); everyone k values
            assert stats["bytes_sent"] == HANDSHAKE + 4 * k + (4 * k if r == leader else 0)


def test_cltk_zeroes_the_leaders_top_k_everywhere(clusters):
    P = 3
    results, _ = run_and_compare(clusters, "cltk", P, sc.SHAPES, DENSITY, steps=4)
    x = [sc.flat(sc.make_grads(sc.SHAPES, r, 0)) for r in range(P)]  # step 0: x = g
    top = set(torch.topk(x[0].abs(), target_count(DENSITY, D)).indices.tolist())  # leader 0
    for r in range(P):
        assert set(torch.nonzero(results[r]["memory"][0] == 0).view(-1).tolist()) == top


# -------------------------------------------------------------------------------- gTop-k
def test_merge_is_symmetric_and_breaks_ties_by_position():
    ia, va = torch.tensor([5, 1, 9], dtype=torch.int32), torch.tensor([2.0, -3.0, 1.0])
    ib, vb = torch.tensor([1, 7, 3], dtype=torch.int32), torch.tensor([1.0, -2.0, 2.0])
    # merged: 1 -> -2, 3 -> 2, 5 -> 2, 7 -> -2, 9 -> 1: four-way tie at |2|, the lowest
    # positions win
    for k in (1, 2, 3, 4, 5):
        i1, v1 = merge_top(ia, va, ib, vb, k)
        i2, v2 = merge_top(ib, vb, ia, va, k)
        assert torch.equal(i1, i2) and torch.equal(v1, v2)
        assert i1.tolist() == [1, 3, 5, 7, 9][:k]
    assert merge_top(ia, va, ib, vb, 5)[1].tolist() == [-2.0, 2.0, 2.0, -2.0, 1.0]


@pytest.mark.parametrize("P", [3, 4])
def test_gtopk_every_rank_gets_the_same_global_set(clusters, P):
    results, sim = run_and_compare(clusters, "gtopk", P, sc.SHAPES, DENSITY, steps=3)
    k = target_count(DENSITY, D)
    # the reference recorded its G for the last step; every rank zeroed exactly G
    chosen = set(sim.stats["global_set"].tolist())
    assert len(chosen) == k
    for r in range(P):
        assert set(torch.nonzero(results[r]["memory"][-1] == 0).view(-1).tolist()) == chosen
        assert set(torch.nonzero(results[r]["avg"][-1]).view(-1).tolist()) <= chosen


def test_gtopk_bytes_grow_with_log2_of_the_workers(clusters):
    k = target_count(DENSITY, D)
    pair = 4 * k + 4 * k  # an int32 position and a float32 value
    sent = {}
    for P in (1, 3, 4):
        if P == 1:
            results = [sc.run_steps("gtopk", density=DENSITY, steps=2, solo=True)]
        else:
            results = clusters(P).run(sc.run_steps, "gtopk", density=DENSITY, steps=2)
        sent[P] = [res["stats"][-1]["bytes_sent"] for res in results]
        rounds = [res["stats"][-1]["rounds"] for res in results]
        for r in range(P):
            q = 1 << (P.bit_length() - 1)
            expected = HANDSHAKE + 4 * k  # the handshake and the final all-reduce of k values
            if r >= q:
                expected += pair  # hands its pairs to r - q
                assert rounds[r] == 0
            else:
                expected += int(math.log2(q)) * pair + (4 * k if r + q < P else 0)  # G back to r + q
                assert rounds[r] == int(math.log2(q)) + (1 if r + q < P else 0)
            assert sent[P][r] == expected, (P, r, sent[P])
    # from 1 to 4 workers: log2(4) = 2 more rounds of k pairs (an all-gather of everyone's
    # pairs would cost P - 1 = 3 times k pairs more on the wire)
    assert max(sent[4]) - sent[1][0] == 2 * pair
    assert max(sent[3]) - sent[1][0] == pair + 4 * k  # a round, and G back to the extra rank


# ---------------------------------------------------------------------------------- DEFT
def test_deft_units_follow_the_splitting_rule():
    # d = 1932, P = 4: tensors above 483 elements are cut into 4; the empty tensor is no unit
    sizes = [1200, 30, 189, 0, 500, 13]
    assert split_units(sizes, 4) == [(0, 300), (300, 600), (600, 900), (900, 1200), (1200, 1230),
                                     (1230, 1419), (1419, 1544), (1544, 1669), (1669, 1794), (1794, 1919),
                                     (1919, 1932)]
    assert split_units(sizes, 1) == [(0, 1200), (1200, 1230), (1230, 1419), (1419, 1919), (1919, 1932)]
    # near-equal pieces, the first n mod P one longer; exactly d / P is not "larger"
    assert split_units([10, 2], 4) == [(0, 3), (3, 6), (6, 8), (8, 10), (10, 12)]
    assert split_units([5, 5], 2) == [(0, 5), (5, 10)]
    # a tensor shorter than P: its empty pieces are dropped
    assert split_units([3], 4) == [(0, 1), (1, 2), (2, 3)]
    assert split_units([], 3) == [] and split_units([0, 0], 2) == []


def test_deft_k_allocation_by_hand():
    # largest norm first: 20 * 8/16 = 10 > size 2 -> 2 (capped: common); 18 * 4/8 = 9; 9 * 4/4 = 9
    assert allocate_k([8.0, 4.0, 4.0], [2, 100, 50], 20) == [2, 9, 9]
    # every unit gets at least 1, even beyond k
    assert allocate_k([1.0, 1.0, 1.0], [5, 5, 5], 2) == [1, 1, 1]
    # leftover: 8 * 3/4 = 6; the 1-element unit takes 1 of the 2 offered; the 1 left goes back
    # to the first unit in norm order
    assert allocate_k([3.0, 1.0], [10, 1], 8) == [7, 1]
    # all norms zero: 1 each, the rest handed out in unit order up to each size
    assert allocate_k([0.0, 0.0], [3, 3], 4) == [3, 1]
    # proportional shares that need no correction
    assert allocate_k([1.0, 2.0, 1.0], [100, 100, 100], 40) == [10, 20, 10]
    assert allocate_k([], [], 5) == []


def test_deft_bin_packing_by_hand():
    sizes, ks = [100, 50, 40, 30, 8], [16, 4, 2, 1, 8]
    # costs 100 log2 16 = 400, 50 log2 4 = 100, 40 log2 2 = 40, 30 (k = 1: numel); unit 4 has
    # k = size: common
    assert pack_units(sizes, ks, 2) == [0, 1, 1, 1, COMMON]  # loads 400 | 100 + 40 + 30
    assert pack_units(sizes, ks, 3) == [0, 1, 2, 2, COMMON]  # 400 | 100 | 40 + 30
    # more bins than units to share: the last bins stay empty
    assert pack_units(sizes, ks, 8) == [0, 1, 2, 3, COMMON]
    # ties: equal costs go in unit order, equal loads to the lower bin
    assert pack_units([10, 10, 10], [4, 4, 4], 2) == [0, 1, 0]
    assert pack_units([1, 1], [1, 1], 3) == [COMMON, COMMON]


def test_deft_pieces_agree_with_the_reference_on_random_cases():
    rng = random.Random(5)
    for _ in range(300):
        P = rng.randint(1, 6)
        shapes = [(rng.choice([0, 1, 2, 3, 7, 50, 400]),) for _ in range(rng.randint(1, 6))]
        units = split_units([s[0] for s in shapes], P)
        assert units == deft_units(shapes, P)
        sizes = [b - a for a, b in units]
        norms = [rng.choice([0.0, rng.random(), rng.random() * 1e-3, 10 * rng.random()]) for _ in units]
        k = rng.randint(1, max(1, sum(sizes)))
        ks = allocate_k(norms, sizes, k)
        assert ks == deft_k(norms, sizes, k)
        assert all(1 <= kk <= n for kk, n in zip(ks, sizes))
        assert sum(ks) >= min(k, sum(sizes))
        assert pack_units(sizes, ks, P) == deft_bins(sizes, ks, P)


def test_deft_more_workers_than_units_to_share(clusters):
    # d = 6, P = 4: the 5-element tensor is cut into 2, 1, 1, 1; the 1-element bias stays one
    # unit. k = 1; every unit gets 1, so the size-1 units are common and only the 2-element unit
    # goes to a bin: three of the four bins are empty every step.
    P, shapes = 4, ((5,), (1,))
    results, _ = run_and_compare(clusters, "deft", P, shapes, DENSITY, steps=5)
    for t in range(5):
        owner = [r for r in range(P) if (t + r) % P == 0]
        for r in range(P):
            stats = results[r]["stats"][t]
            assert stats["units"] == 5 and stats["leader"] == t % P
            assert stats["common_density"] == 4 / 6
            assert stats["density"] == 5 / 6
            assert stats["local_density"] == ((1 if r in owner else 0) + 4) / 6


def test_deft_common_units_are_sent_by_everyone(clusters):
    P = 3
    results = clusters(P).run(deft_with_big_bias, 3)
    assert results[0]["units"] == [(0, 34), (34, 67), (67, 100), (100, 102)]
    for t in range(3):
        bias = [big_bias_grads(r, t)[1] for r in range(P)]
        for r in range(P):
            stats = results[r]["stats"][t]
            assert stats["common_density"] == 2 / 102
            # the bias's mean, exactly, and nothing left of it in any residual
            assert results[r]["memory"][t][100:].tolist() == [0.0, 0.0]
        torch.testing.assert_close(results[0]["avg"][t][100:], (bias[0] + bias[1] + bias[2]) / 3)
        # each weight piece belongs to one worker, who sends a share of the 8 left to them
        for a, b in ((0, 34), (34, 67), (67, 100)):
            sent = int((results[0]["memory"][t][a:b] == 0).sum())
            assert 1 <= sent < b - a


def test_deft_computes_all_unit_norms_in_one_call(monkeypatch):
    """All unit norms are computed together, one vector per step (one host copy), not one
    call per unit."""
    copies = []
    original = deft_mod._unit_norms

    def watched(x, units, dtype=torch.float32):
        out = original(x, units, dtype)
        copies.append(out.numel())
        return out

    monkeypatch.setattr(deft_mod, "_unit_norms", watched)
    r = reducers.build("deft", density=DENSITY)
    for t in range(3):
        r.reduce(sc.make_grads(sc.SHAPES, 0, t))
    assert copies == [5, 5, 5]  # one norm vector of all 5 units per step


def test_deft_single_worker_sends_common_units_too():
    # one worker, a 1-element tensor: always common; the research code dropped commons at P = 1
    r = reducers.build("deft", density=0.01)
    g = [torch.randn(300, generator=torch.Generator().manual_seed(1)) * 0.01, torch.tensor([0.5])]
    avg = r.reduce(g)
    assert avg[1].item() == 0.5 and r.residual[1].item() == 0.0
    assert r.stats["common_density"] == 1 / 301
