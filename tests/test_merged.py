"""OMGS and AGTF: the grouping against a brute-force search, the noise rule, and overlap with
backward giving the same average as the plain exchange, across real processes."""
import itertools
import random

import pytest
import torch

import merged_scenarios as ms
from sparsecomm import reducers
from sparsecomm.reducers.select.grouping import (LinearCost, best_grouping, fit_linear, fusion_allowed, predicted_time,
                                          sparsification_noise)


def all_groupings(L):
    for cuts in itertools.product((0, 1), repeat=L - 1):
        groups, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                groups.append((start, i))
                start = i
        groups.append((start, L))
        yield groups


def random_problem(rng, L):
    sizes = [rng.choice([10, 100, 1000, 5000, 20000]) for _ in range(L)]
    backward = [rng.uniform(0, 2e-3) for _ in range(L)]
    selected = [max(1, n * rng.choice([0.001, 0.01, 0.1])) for n in sizes]
    select = LinearCost(rng.uniform(0, 5e-4), rng.uniform(0, 1e-7))
    comm = LinearCost(rng.uniform(1e-5, 2e-3), rng.uniform(0, 1e-6))
    return sizes, backward, selected, select, comm


@pytest.mark.parametrize("seed", range(40))
def test_omgs_grouping_is_optimal(seed):
    rng = random.Random(seed)
    sizes, backward, selected, select, comm = random_problem(rng, rng.randint(1, 9))
    groups, predicted = best_grouping(backward, sizes, selected, select, comm)
    brute = min(predicted_time(g, backward, sizes, selected, select, comm) for g in all_groupings(len(sizes)))
    assert predicted == pytest.approx(brute, rel=1e-12, abs=1e-15)
    assert predicted_time(groups, backward, sizes, selected, select, comm) == pytest.approx(predicted, rel=1e-12)
    assert [g[0] for g in groups][1:] == [g[1] for g in groups][:-1] and groups[0][0] == 0


@pytest.mark.parametrize("seed", range(40))
def test_agtf_grouping_is_optimal_and_never_raises_noise(seed):
    rng = random.Random(100 + seed)
    sizes, backward, _, select, comm = random_problem(rng, rng.randint(1, 9))
    densities = [rng.choice([0.001, 0.01, 0.05, 0.2]) for _ in sizes]
    sq_norms = [rng.uniform(0.01, 10.0) for _ in sizes]
    selected = [r * p for r, p in zip(densities, sizes)]
    allowed = fusion_allowed(sizes, densities, sq_norms)
    groups, predicted = best_grouping(backward, sizes, selected, select, comm, allowed)
    feasible = [g for g in all_groupings(len(sizes)) if all(j - i == 1 or allowed(i, j) for i, j in g)]
    brute = min(predicted_time(g, backward, sizes, selected, select, comm) for g in feasible)
    assert predicted == pytest.approx(brute, rel=1e-12, abs=1e-15)
    for i, j in groups:
        p, r, g = sizes[i:j], densities[i:j], sq_norms[i:j]
        assert sparsification_noise(p, r, g, fused=True) <= sparsification_noise(p, r, g, fused=False) * (1 + 1e-9)


def test_noise_model_and_fit():
    # two layers of 100 elements, densities 0.1 and 0.01, squared norms 1 and 4
    assert sparsification_noise([100, 100], [0.1, 0.01], [1.0, 4.0], fused=False) == pytest.approx(9 + 4 * 99)
    assert sparsification_noise([100, 100], [0.1, 0.01], [1.0, 4.0], fused=True) == pytest.approx((200 / 11 - 1) * 5)
    assert not fusion_allowed([100, 100], [0.1, 0.1], [1.0, 4.0])(0, 2) is False  # equal densities: fusing is neutral
    cost = fit_linear([1, 2, 3, 4], [3, 5, 7, 9])
    assert cost.a == pytest.approx(1) and cost.b == pytest.approx(2)
    assert fit_linear([1, 2], [5, 1]).b == 0.0  # never a negative slope


@pytest.mark.parametrize("name,groups", [("omgs", [3, 2, 3]), ("omgs", None), ("agtf", [1, 4, 3])])
def test_overlap_gives_the_same_average(clusters, name, groups):
    """The same groups with and without overlap give bit-identical averages and residuals. With
    ``groups=None`` the overlapped run fits its own grouping (timing-dependent), and the plain run
    is then given that grouping."""
    c = clusters(2)
    overlapped = c.run(ms.backward_steps, name, overlap=True, groups=groups)
    fitted = overlapped[0]["describe"]["groups"]
    assert overlapped[1]["describe"]["groups"] == fitted, "ranks formed different groups"
    plain = c.run(ms.backward_steps, name, overlap=False, groups=groups or fitted)
    for r in range(2):
        for t in range(4):
            assert torch.equal(plain[r]["avg"][t], overlapped[r]["avg"][t]), f"rank {r} step {t}"
            assert torch.equal(plain[r]["memory"][t], overlapped[r]["memory"][t])
            assert plain[r]["bytes"][t] == overlapped[r]["bytes"][t]
        assert overlapped[r]["overlapped"] == [False, True, True, True]  # from the second step on
        assert not any(plain[r]["overlapped"])
    info = overlapped[0]["describe"]
    assert set(info["cost_model"]) == {"select", "comm"}
    assert len(info["backward_times_s"]) == 8 and sum(info["backward_times_s"]) > 0  # measured by the hooks


def test_agtf_shares_the_budget_by_norm():
    r = reducers.build("agtf", density=0.1)
    big, small = torch.zeros(100), torch.zeros(100)
    big[:50] = 10.0
    small[:50] = 1.0
    r.reduce([big, small])
    k = r.describe()["history"][-1]["k_per_layer"][::-1]  # parameter order
    assert k == [18, 2]  # 20 shared in proportion 10:1 (floor, then the rest)
    assert r.describe()["history"][-1]["from_step"] == 1


def test_groups_option_is_checked():
    with pytest.raises(ValueError, match=r"groups must be a list of positive integers \(layer counts, backward order\)"):
        reducers.build("omgs", groups=[2, 0])
    r = reducers.build("omgs", groups=[1, 1])
    with pytest.raises(ValueError, match=r"groups \[1, 1\] must be positive layer counts adding up to 3"):
        r.reduce([torch.randn(4), torch.randn(4), torch.randn(4)])
    with pytest.raises(ValueError, match="regroup_every must be a positive integer"):
        reducers.build("agtf", regroup_every=0)
