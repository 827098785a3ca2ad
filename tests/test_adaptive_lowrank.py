"""PowerSGD, Accordion and LEGACY beyond the generic tests: Accordion's and LEGACY's switches at
the right epochs (driven by begin_epoch across real processes), PowerSGD's skip rule, warm
start, rank and options, and clear errors for bad options."""
import math

import pytest
import torch

import adaptive_scenarios as asc
import reducer_scenarios as sc
from reducer_reference import Simulation
from sparsecomm import reducers
from sparsecomm.reducers.methods.powersgd import orthogonalize_
from sparsecomm.reducers.select import exact_topk
from sparsecomm.reducers.select.primitives import target_count

ACC = {"k_low": 0.1, "k_high": 0.5, "detection_threshold": 0.5, "switch_freq": 2}
# epochs 0..7; the learning rate drops 10x at epoch 4; the total is 8 epochs
ACC_PLAN = [(e, 0.1 if e < 4 else 0.01, 8) for e in range(8)]
# (epoch, critical tensors) of every decision, from adaptive_scenarios.accordion_scale:
# 0: first decision; 2: tensor 1's norm tripled; 4: the learning rate dropped; 6: tensor 0's
# norm fell by 0.6 (> 0.5), tensor 2's rose by 0.3 (< 0.5)
ACC_DECISIONS = [(0, [0, 1, 2]), (2, [1]), (4, [0, 1, 2]), (6, [0])]


def replay(name, P, plan, results, shapes, steps_per_epoch=2, grads=asc.accordion_grads, **options):
    """Feed the single-process reference the same inputs; check every rank against it."""
    sim = Simulation(name, P, shapes, 0.05, **options)
    previous = [torch.zeros(sum(math.prod(s) for s in shapes)) for _ in range(P)]
    i = 0
    for epoch, lr, total in plan:
        if epoch is not None:
            sim.begin_epoch(epoch, lr, total)
        for t in range(steps_per_epoch):
            g = [grads(w, 0 if epoch is None else epoch, t) for w in range(P)]
            ref_avg, ref_res = sim.step(g)
            for w in range(P):
                assert torch.equal(results[w]["avg"][i], results[0]["avg"][i]), f"step {i}: rank {w} differs"
                assert torch.equal(results[w]["memory"][i], ref_res[w]), f"step {i}: rank {w}'s residual"
            torch.testing.assert_close(results[0]["avg"][i], ref_avg, rtol=1e-5, atol=1e-7)
            x_sum = sum(previous[w] + sc.flat(g[w]) for w in range(P))
            kept = P * results[0]["avg"][i] + sum(results[w]["memory"][i] for w in range(P))
            torch.testing.assert_close(kept, x_sum, rtol=1e-5, atol=1e-6)
            previous = [results[w]["memory"][i] for w in range(P)]
            i += 1
    return sim


# ----------------------------------------------------------------------------- Accordion
def test_accordion_switches_at_the_right_epochs(clusters):
    P = 3
    results = clusters(P).run(asc.run_epochs, "accordion", ACC_PLAN, options=ACC)
    sim = replay("accordion", P, ACC_PLAN, results, asc.ACCORDION_SHAPES, **ACC)
    assert [(e, [i for i, c in enumerate(crit) if c]) for e, _, crit in sim.state["decisions"]] == ACC_DECISIONS

    sizes = [math.prod(s) for s in asc.ACCORDION_SHAPES]
    d, L = sum(sizes), len(sizes)
    decisions = dict(ACC_DECISIONS)
    critical = None
    for step, stats in enumerate(results[0]["stats"]):
        epoch, first = divmod(step, 2)
        deciding = first == 0 and epoch in decisions
        if deciding:
            critical = decisions[epoch]
        assert stats["decision"] is deciding, step
        assert stats["critical_fraction"] == len(critical) / L
        k = sum(math.floor((0.5 if i in critical else 0.1) * n) for i, n in enumerate(sizes))
        assert stats["local_density"] == k / d and stats["target_density"] == k / d
        # payload: handshake row (48 B) + one packed (int32, float32) row of k pairs (no padding);
        # rank 0 also sends the decision, one byte per tensor, at decision steps only
        for w in range(P):
            sent = results[w]["stats"][step]["bytes_sent"]
            assert sent == 48 + k * 8 + (L if deciding and w == 0 else 0), (step, w)
        assert results[1]["stats"][step]["bytes_wire"] >= (L if deciding else 0)

    for w in range(P):
        info = results[w]["describe"][-1]
        assert [(h["epoch"], h["critical"]) for h in info["decisions"]] == ACC_DECISIONS
        assert [h["step"] for h in info["decisions"]] == [0, 4, 8, 12]
        assert [h["lr"] for h in info["decisions"]] == [0.1, 0.1, 0.01, 0.01]
        assert info["switch_epochs"] == [2, 4, 6]
        assert info["densities"] == [0.5, 0.1, 0.1] and info["critical"] == [True, False, False]


def test_accordion_resumes_between_decisions(clusters):
    straight = clusters(3).run(asc.run_epochs, "accordion", ACC_PLAN, options=ACC)
    resumed = clusters(3).run(asc.run_epochs, "accordion", ACC_PLAN, options=ACC, save_after=3)
    for w in range(3):
        assert all(torch.equal(a, b) for a, b in zip(straight[w]["avg"], resumed[w]["avg"]))
        assert all(torch.equal(a, b) for a, b in zip(straight[w]["memory"], resumed[w]["memory"]))
        assert straight[w]["describe"][-1] == resumed[w]["describe"][-1]


def test_accordion_without_begin_epoch_decides_once_as_epoch_zero():
    r = reducers.build("accordion", **ACC)
    for t in range(3):
        r.reduce(asc.accordion_grads(0, t, 0))
        assert r.stats["decision"] is (t == 0) and r.stats["critical_fraction"] == 1.0
    info = r.describe()
    assert [h["epoch"] for h in info["decisions"]] == [0] and info["lr"] is None
    # a reducer that starts mid-run decides at its first reduce, then at the next multiple
    r = reducers.build("accordion", **ACC)
    for epoch in (3, 4):
        r.begin_epoch(epoch, 0.1, 8)
        r.reduce(asc.accordion_grads(0, epoch, 0))
        assert r.stats["decision"]
    assert [h["epoch"] for h in r.describe()["decisions"]] == [3, 4]


@pytest.mark.parametrize("P", [1, 2, 3, 4])
def test_accordion_dense_steps_send_the_rules_selection(clusters, P):
    """At k_high = 0.99 every step of exchange="auto" is dense: the same selection (the rule's,
    ties included) and residual as the gather-sum, the same average (bit for bit at P <= 2)."""
    steps, plan = 3, [(None, None, None)]
    runs = {ex: clusters(P).run(asc.run_epochs, "accordion", plan, steps_per_epoch=steps, options={"exchange": ex},
                                grads=asc.tied_grads) for ex in ("auto", "gather")}
    sizes = [math.prod(s) for s in asc.TIED_SHAPES]
    d, L = sum(sizes), len(sizes)
    segments = [(sum(sizes[:i]), sum(sizes[:i + 1])) for i in range(L)]
    ks = [target_count(0.99, n) for n in sizes]
    previous = [torch.zeros(d) for _ in range(P)]
    for t in range(steps):
        xs = [previous[w] + sc.flat(asc.tied_grads(w, 0, t)) for w in range(P)]
        avg = runs["auto"][0]["avg"][t]
        for w in range(P):
            sel = exact_topk.reference(xs[w], segments, ks, torch.int64)
            residual = xs[w].clone()
            residual[sel] = 0
            for ex, run in runs.items():
                assert torch.equal(run[w]["avg"][t], run[0]["avg"][t]), (ex, t, w)
                assert torch.equal(run[w]["memory"][t], residual), (ex, t, w)
                stats = run[w]["stats"][t]
                assert stats["dense_exchange"] is (ex == "auto") and stats["local_density"] == sum(ks) / d
            sent = runs["auto"][w]["stats"][t]["bytes_sent"]
            assert sent == 48 + 4 * d + (L if t == 0 and w == 0 else 0), (t, w)
        gathered = runs["gather"][0]["avg"][t]
        if P <= 2:
            assert torch.equal(avg, gathered)
        else:
            torch.testing.assert_close(avg, gathered, rtol=1e-6, atol=1e-6)
        if P == 1:
            assert torch.equal(avg, xs[0] - runs["auto"][0]["memory"][t])
        torch.testing.assert_close(sum(xs[w] - runs["auto"][w]["memory"][t] for w in range(P)), P * avg,
                                   rtol=1e-5, atol=1e-6)
        dense, gather = runs["auto"][0]["stats"][t], runs["gather"][0]["stats"][t]
        assert dense["local_density"] <= dense["density"] <= gather["density"]
        if P == 1:
            assert dense["density"] == gather["density"]
        assert dense["wire_floor_bytes"] == gather["wire_floor_bytes"]
        previous = [runs["auto"][w]["memory"][t] for w in range(P)]


@pytest.mark.parametrize("dtype,k_high", [(torch.float32, 0.5), (torch.float32, 0.501), (torch.float64, 0.666),
                                          (torch.float64, 0.667), (torch.float16, 0.33), (torch.float16, 0.34)])
def test_accordion_auto_exchange_is_dense_exactly_when_pairs_cost_more(dtype, k_high):
    n = 1000
    value = dtype.itemsize
    k = target_count(k_high, n)
    dense = k * (4 + value) > n * value  # int32 positions
    g = [torch.randn(n).to(dtype)]
    r = reducers.build("accordion", k_low=0.1, k_high=k_high)
    r.reduce(g)
    assert r.stats["dense_exchange"] is dense
    assert r.stats["bytes_sent"] == 48 + 1 + (n * value if dense else k * (4 + value))
    for options in ({"exchange": "gather"}, {"exchange": "union"}, {"values": "fp16"}, {"indices": "bitmap"}):
        other = reducers.build("accordion", k_low=0.1, k_high=k_high, **options)
        other.reduce(g)
        assert other.stats["dense_exchange"] is False, options


ACC99 = {**ACC, "k_high": 0.99}


def test_accordion_auto_exchange_follows_the_regimes_and_resumes(clusters):
    """Dense while sum_t k_t > d / 2 (epochs 0-1, 4-7), the gather-sum otherwise (epochs 2-3);
    checked against the reference, and a run saved and restored between decisions is the same."""
    P = 3
    straight = clusters(P).run(asc.run_epochs, "accordion", ACC_PLAN, options=ACC99)
    resumed = clusters(P).run(asc.run_epochs, "accordion", ACC_PLAN, options=ACC99, save_after=3)
    sim = replay("accordion", P, ACC_PLAN, straight, asc.ACCORDION_SHAPES, **ACC99)
    assert [(e, [i for i, c in enumerate(crit) if c]) for e, _, crit in sim.state["decisions"]] == ACC_DECISIONS
    d = sum(math.prod(s) for s in asc.ACCORDION_SHAPES)
    for step, stats in enumerate(straight[0]["stats"]):
        epoch = step // 2
        assert stats["dense_exchange"] is (epoch not in (2, 3)), step
        assert stats["dense_exchange"] is (stats["local_density"] > 0.5), step
        if stats["dense_exchange"]:
            assert stats["bytes_sent"] == 48 + 4 * d + (3 if stats["decision"] else 0)
    for w in range(P):
        assert all(torch.equal(a, b) for a, b in zip(straight[w]["avg"], resumed[w]["avg"]))
        assert all(torch.equal(a, b) for a, b in zip(straight[w]["memory"], resumed[w]["memory"]))
        assert [s["dense_exchange"] for s in straight[w]["stats"]] == [s["dense_exchange"] for s in resumed[w]["stats"]]
        assert straight[w]["describe"][-1] == resumed[w]["describe"][-1]


# ----------------------------------------------------------------------------- LEGACY
LEGACY_SHAPES = ((40, 25), (200,), (30, 20))


def legacy_grads(rank, epoch, step):
    return sc.make_grads(LEGACY_SHAPES, rank, 10 * epoch + step)


def test_legacy_epoch_schedule_splits_the_epochs_evenly(clusters):
    options = {"schedule": "epoch", "group_compressions": [0.5, 0.2, 0.05]}
    # one step before any begin_epoch (phase 0), six epochs of a 6-epoch run, and one past the end
    plan = [(None, None, None)] + [(e, 0.1, 6) for e in range(6)] + [(7, 0.1, 6)]
    results = clusters(3).run(asc.run_epochs, "legacy", plan, options=options, grads=legacy_grads)
    replay("legacy", 3, plan, results, LEGACY_SHAPES, grads=legacy_grads, **options)
    sizes = [math.prod(s) for s in LEGACY_SHAPES]
    phases = [0, 0, 0, 1, 1, 2, 2, 2]
    for entry, phase in enumerate(phases):
        c = options["group_compressions"][phase]
        for t in range(2):
            stats = results[0]["stats"][2 * entry + t]
            assert stats["phase"] == phase
            assert stats["local_density"] == sum(math.floor(c * n) for n in sizes) / sum(sizes)
        assert results[1]["describe"][entry]["densities"] == [c] * 3


def test_legacy_layer_and_both_schedules(clusters):
    # sizes 1000, 200, 600 with splits [200, 700]: groups 2, 1 (200 is not < 200), 1
    both = {"schedule": "both", "group_splits": [200, 700], "percent": True,
            "group_compressions": [[90, 50, 20], [40, 10, 1]]}
    plan = [(e, 0.1, 4) for e in range(4)]
    results = clusters(3).run(asc.run_epochs, "legacy", plan, options=both, grads=legacy_grads)
    replay("legacy", 3, plan, results, LEGACY_SHAPES, grads=legacy_grads, **both)
    assert [info["densities"] for info in results[0]["describe"]] == \
        [[0.2, 0.5, 0.5]] * 2 + [[0.01, 0.1, 0.1]] * 2
    info = results[0]["describe"][-1]
    assert [(g["min_numel"], g["max_numel"], g["tensors"]) for g in info["groups"]] == \
        [(0, 199, 0), (200, 699, 2), (700, None, 1)]

    layer = reducers.build("legacy", group_splits=[200, 700], group_compressions=[0.9, 0.5, 0.2])
    layer.reduce(legacy_grads(0, 0, 0))
    assert layer.describe()["densities"] == [0.2, 0.5, 0.5]
    layer.begin_epoch(5, 0.1, 6)  # the layer schedule has one phase
    layer.reduce(legacy_grads(0, 5, 0))
    assert layer.stats["phase"] == 0 and layer.describe()["densities"] == [0.2, 0.5, 0.5]

    default = reducers.build("legacy")  # the seed code's [10000] and [1, 1] percent: 1% everywhere
    assert reducers.method_options("legacy")["group_splits"] == (10000,)
    default.reduce([torch.randn(20000), torch.randn(500)])
    assert default.stats["local_density"] == (200 + 5) / 20500


@pytest.mark.parametrize("name,options", [
    ("accordion", {"exchange": "union", "k_high": 0.3}),
    ("legacy", {"exchange": "union", "group_splits": [100], "group_compressions": [0.5, 0.05]}),
])
def test_union_exchange_matches_the_reference(clusters, name, options):
    P, steps = 3, 3
    results = clusters(P).run(sc.run_steps, name, steps=steps, options=options)
    sim = Simulation(name, P, sc.SHAPES, 0.05, **options)
    for t in range(steps):
        ref_avg, ref_res = sim.step([sc.make_grads(sc.SHAPES, w, t) for w in range(P)])
        torch.testing.assert_close(results[0]["avg"][t], ref_avg, rtol=1e-5, atol=1e-7)
        for w in range(P):
            assert torch.equal(results[w]["avg"][t], results[0]["avg"][t])
            assert torch.equal(results[w]["memory"][t], ref_res[w])
    assert results[0]["stats"][-1]["density"] > results[0]["stats"][-1]["local_density"]


# ----------------------------------------------------------------------------- PowerSGD
def test_powersgd_compresses_only_where_it_saves_bytes():
    shapes = [(40, 30), (3, 3), (5, 4), (4, 4), (10,), (2, 50), (0, 5), (6, 2, 3, 3), ()]
    grads = [torch.randn(s) for s in shapes]
    r = reducers.build("powersgd")
    r.reduce(grads)
    # rank 2: r (n + m) < n m  <=>  compressed; (4, 4) is the equality case; 1-d and 0-d never
    assert [(c["tensor"], c["shape"], c["rank"]) for c in r.describe()["compressed"]] == \
        [(0, [40, 30], 2), (2, [5, 4], 2), (7, [6, 18], 2)]
    assert r.describe()["uncompressed"] == [1, 3, 4, 5, 6, 8]
    r1 = reducers.build("powersgd", rank=1)
    r1.reduce(grads)
    assert [c["tensor"] for c in r1.describe()["compressed"]] == [0, 1, 2, 3, 5, 7]
    big = reducers.build("powersgd", rank=30)  # rank clamped to min(n, m); (40, 30) is then not worth it
    big.reduce(grads)
    assert big.describe()["compressed"] == []


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_powersgd_rank_sets_the_payload(rank):
    shapes = [(64, 32), (16,), (8, 3, 3, 3)]
    r = reducers.build("powersgd", rank=rank)
    r.reduce([torch.randn(s) for s in shapes])
    d = 64 * 32 + 16 + 8 * 27
    values = 64 * rank + 16 + 8 * rank + 32 * rank + 27 * rank  # P's, the 1-d tensor, Q's
    assert r.stats["payload_ratio"] == values / d
    assert r.stats["bytes_sent"] == 48 + 4 * values  # handshake row + the two all-reduces
    assert r.stats["density"] == 1.0 and r.stats["target_density"] == 1.0


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation():
    gen = torch.Generator().manual_seed(5)
    u, v = torch.randn(60, 4, generator=gen), torch.randn(40, 4, generator=gen)
    M = u @ torch.diag(torch.tensor([8.0, 4.0, 2.0, 1.0])) @ v.t() / 10 + 0.01 * torch.randn(60, 40, generator=gen)
    s = torch.linalg.svdvals(M)
    best = float(s[2:].square().sum().sqrt())  # error of the best rank-2 approximation
    errors = {}
    for warm in (True, False):
        r = reducers.build("powersgd", error_feedback=False, warm_start=warm, seed=1)
        for _ in range(20):
            avg = r.reduce([M])[0]
        errors[warm] = float(torch.linalg.matrix_norm(M - avg))
    assert errors[True] < 1.001 * best  # power iteration with the reused Q has converged
    assert errors[False] > 1.05 * best  # a fresh random Q every step has not


def test_powersgd_reuses_q_between_steps():
    g1, g2 = [torch.randn(20, 10)], [torch.randn(20, 10)]
    a = reducers.build("powersgd", error_feedback=False)
    a.reduce(g1)
    q = a.state_dict()["method_state"]["q"].view(2, 10).t()  # kept as Q^T
    second = a.reduce(g2)[0]
    p_hat = orthogonalize_(g2[0] @ q)
    torch.testing.assert_close(second, p_hat @ (g2[0].t() @ p_hat).t())
    torch.testing.assert_close(a.state_dict()["method_state"]["q"].view(2, 10).t(), g2[0].t() @ p_hat)


def test_powersgd_zero_gradient_restarts_q():
    g = [torch.randn(20, 10)]
    a = reducers.build("powersgd")
    assert int(a.reduce([torch.zeros(20, 10)])[0].count_nonzero()) == 0
    fresh = reducers.build("powersgd")
    assert torch.equal(a.reduce(g)[0], fresh.reduce(g)[0])


@pytest.mark.parametrize("options", [{"rank": 1}, {"warm_start": False}, {"start_iter": 2},
                                     {"residual": "mean"}, {"rank": 3, "residual": "mean", "warm_start": False}],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_powersgd_options_across_processes(clusters, options):
    P, steps = 3, 4
    results = clusters(P).run(sc.run_steps, "powersgd", steps=steps, options=options)
    sim = Simulation("powersgd", P, sc.SHAPES, 0.05, **options)
    previous = [torch.zeros(results[0]["avg"][0].numel()) for _ in range(P)]
    for t in range(steps):
        g = [sc.make_grads(sc.SHAPES, w, t) for w in range(P)]
        ref_avg, ref_res = sim.step(g)
        for w in range(P):
            assert torch.equal(results[w]["avg"][t], results[0]["avg"][t])
            torch.testing.assert_close(results[w]["memory"][t], ref_res[w], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(results[0]["avg"][t], ref_avg, rtol=1e-5, atol=1e-7)
        x_sum = sum(previous[w] + sc.flat(g[w]) for w in range(P))
        torch.testing.assert_close(P * results[0]["avg"][t] + sum(r["memory"][t] for r in results), x_sum,
                                   rtol=1e-5, atol=1e-6)
        previous = [r["memory"][t] for r in results]
        warmup = t < options.get("start_iter", 0)
        assert results[0]["stats"][t]["warmup"] is warmup
        if warmup:
            assert all(int(r["memory"][t].count_nonzero()) == 0 for r in results)
    assert all(clusters(3).run(sc.resume_matches, "powersgd", options=options))


def test_powersgd_local_and_mean_residuals_split_the_same_remainder(clusters):
    out = {mode: clusters(3).run(sc.run_steps, "powersgd", steps=1, options={"residual": mode})
           for mode in ("local", "mean")}
    assert torch.equal(out["local"][0]["avg"][0], out["mean"][0]["avg"][0])  # the same average
    assert not torch.allclose(out["local"][0]["memory"][0], out["mean"][0]["memory"][0])
    torch.testing.assert_close(sum(r["memory"][0] for r in out["local"]),  # the same total left behind
                               sum(r["memory"][0] for r in out["mean"]), rtol=1e-5, atol=1e-7)


def test_powersgd_keeps_16_bit_residuals_in_float32():
    r = reducers.build("powersgd")
    total, total_sent = (torch.zeros(30 * 20 + 7, dtype=torch.float64) for _ in range(2))
    for t in range(4):
        g = sc.bf16_grads(0, t)
        avg = r.reduce(g)
        assert [a.dtype for a in avg] == [torch.bfloat16] * 2 and r.residual[0].dtype == torch.float32
        total += sc.flat(g).double()
        total_sent += sc.flat(avg).double()
        # one worker: sum of gradients = sum of averages + residual, to float32 rounding
        torch.testing.assert_close(total_sent + sc.flat(r.residual).double(), total, rtol=0, atol=1e-5)


def test_orthogonalize_is_deterministic_and_keeps_zero_columns():
    p = torch.randn(50, 3)
    a, b = orthogonalize_(p.clone()), orthogonalize_(p.clone())
    assert torch.equal(a, b)
    torch.testing.assert_close(a.t() @ a, torch.eye(3), rtol=0, atol=1e-6)
    z = torch.zeros(10, 2)
    z[:, 1] = 1e-30  # tiny, not zero: normalised without underflow
    out = orthogonalize_(z)
    assert torch.equal(out[:, 0], torch.zeros(10)) and torch.isfinite(out).all()
    torch.testing.assert_close(float(out[:, 1].norm()), 1.0)


# ----------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("name,options,message", [
    ("powersgd", {"rank": 0}, "rank must be a positive integer, got 0"),
    ("powersgd", {"rank": 2.5}, "rank must be a positive integer"),
    ("powersgd", {"start_iter": -1}, "start_iter must be an integer >= 0"),
    ("powersgd", {"warm_start": "yes"}, "warm_start must be true or false"),
    ("powersgd", {"residual": "global"}, r"residual must be one of \['local', 'mean'\], got 'global'"),
    ("accordion", {"k_low": 0}, r"k_low must be a number in \(0, 1\] \(a fraction of each tensor\), got 0"),
    ("accordion", {"k_high": 99}, r"k_high must be a number in \(0, 1\]"),
    ("accordion", {"k_low": 0.6, "k_high": 0.5}, r"k_low \(0.6\) must not exceed k_high \(0.5\)"),
    ("accordion", {"detection_threshold": -1}, "detection_threshold must be a finite number > 0"),
    ("accordion", {"switch_freq": 0}, "switch_freq must be a positive integer"),
    ("accordion", {"exchange": "tree"}, r"exchange must be one of \['auto', 'gather', 'union'\]"),
    ("legacy", {"schedule": "phase"}, r"schedule must be one of \['layer', 'epoch', 'both'\], got 'phase'"),
    ("legacy", {"group_compressions": [0.1, 0.2, 0.3]},
     r"group_compressions must hold len\(group_splits\) \+ 1 = 2 densities for schedule='layer' \(one per size "
     r"group\), got 3"),
    ("legacy", {"group_compressions": [5, 1]}, r"got 5 \(percent=True takes percentages\)"),
    ("legacy", {"group_compressions": [150, 1], "percent": True}, r"percentages in \(0, 100\], got 150"),
    ("legacy", {"group_splits": [100, 50], "group_compressions": [0.1, 0.1, 0.1]},
     r"group_splits must be strictly increasing, got \[100, 50\]"),
    ("legacy", {"group_splits": [0]}, r"group_splits must be a list of positive integers \(tensor sizes\)"),
    ("legacy", {"schedule": "epoch", "group_compressions": [[0.1, 0.2]]},
     r"must be a flat list of densities for schedule='epoch' \(one per training phase\)"),
    ("legacy", {"schedule": "both", "group_compressions": [[0.1, 0.2], [0.1]]},
     r"every row must hold len\(group_splits\) \+ 1 = 2 densities; row 1 is \[0.1\]"),
    ("legacy", {"schedule": "both", "group_compressions": []}, "group_compressions must be a non-empty list"),
])
def test_bad_options_fail_clearly(name, options, message):
    with pytest.raises(ValueError, match=message):
        reducers.build(name, **options)
