"""The warm start and the fast controllers of ExDyna, MiCRO and SAGE: the pieces alone, agreement
with the single-process references across 1 to 4 real workers over steps that drive the
controllers out of their bands, the density after a 10x jump of the gradient scale, step 0 on
partitions as uneven as NeuMF's, and bit-exact resumption mid-descent."""
import math

import pytest
import torch

import warm_start_scenarios as ws
from reducer_reference import Simulation
from reducer_scenarios import SHAPES, flat
from sparsecomm import reducers
from sparsecomm.reducers.select.control import MultiplicativeScaling, SageScaling, pooled_threshold
from sparsecomm.reducers.select.primitives import curve_counts, top_curve

PAPER = {"controller": "paper", "warm_start": False}
PAPER_FACTORS = (1.005, 0.995, 1.00125, 0.9987, 1.0)
PAPER_GAMMAS = (0.95, 1.0, 1.05)


# ----------------------------------------------------------------------------- the pieces
def test_curve_counts_halve_down_to_one():
    assert curve_counts(10) == [1, 2, 3, 5, 10]
    assert curve_counts(6110) == [1, 2, 3, 6, 12, 24, 48, 96, 191, 382, 764, 1528, 3055, 6110]
    assert curve_counts(1) == curve_counts(0) == [1]


def test_top_curve_reads_the_sorted_magnitudes():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    ordered = x[100:400].abs().sort(descending=True).values
    assert top_curve(x, [1, 2, 3, 5, 10], 100, 400).tolist() == ordered[[0, 1, 2, 4, 9]].tolist()
    assert top_curve(x, [1, 2, 5], 10, 13).tolist() == x[10:13].abs().sort(descending=True).values[[0, 1, 2]].tolist()
    assert top_curve(x, [1, 2], 5, 5).tolist() == [0.0, 0.0]


def uneven(d=400_000, seed=0):
    """Gaussian magnitudes whose last quarter is 4x larger."""
    a = torch.randn(d, generator=torch.Generator().manual_seed(seed)).abs()
    a[3 * d // 4:] *= 4
    return a


@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize("c", [0.01, 0.001])
def test_pooled_threshold_adds_up_counts_where_averaging_thresholds_does_not(P, c):
    """Only counts add up across partitions: the pooled curves give k to within 3%, while the
    mean of the per-partition thresholds (each for its share of k) is off by more than 3x."""
    a = uneven()
    d, k = a.numel(), int(c * a.numel())
    bounds = [(p * d // P, (p + 1) * d // P) for p in range(P)]
    counts = curve_counts(k)
    curves = [top_curve(a, counts, s, e).tolist() for s, e in bounds]
    lam = pooled_threshold(curves, counts, [e - s for s, e in bounds], k)
    assert abs(int((a >= lam).sum()) / k - 1) < 0.03
    mean = sum(float(a[s:e].topk(k * (e - s) // d).values[-1]) for s, e in bounds) / P
    assert int((a >= mean).sum()) / k > 3


def test_pooled_threshold_of_degenerate_domains():
    counts = curve_counts(8)
    assert pooled_threshold([[0.0] * len(counts)] * 2, counts, [10, 10], 8) is None  # all zero: no calibration
    assert pooled_threshold([[5.0] * len(counts)], counts, [0], 8) is None            # nothing searched
    x = torch.zeros(100)
    x[:3] = torch.tensor([3.0, 2.0, 1.0])  # fewer nonzeros than the target: the smallest value seen
    assert top_curve(x, counts).tolist() == [3.0, 2.0, 0.0, 0.0]
    assert pooled_threshold([top_curve(x, counts).tolist()], counts, [100], 8) == 2.0


def test_fast_multiplicative_rule():
    paper, fast = MultiplicativeScaling(1000, 1.0), MultiplicativeScaling(1000, 1.0, fast=True)
    for selected in (1000, 1050, 1100, 950, 910):  # inside the band: the published steps
        assert fast.factor(selected) == paper.factor(selected)
    assert fast.factor(1500) == pytest.approx(1.5 ** 0.1)
    assert fast.factor(1101) == pytest.approx(1.101 ** 0.1)  # about twice the published 1.005
    assert fast.factor(10 ** 7) == 2.0
    assert paper.factor(10 ** 7) == 1.005
    steps = [fast.factor(0) for _ in range(20)]  # nothing selected: 0.995, then 1.5x steeper each time
    assert steps[0] == pytest.approx(0.995)
    assert steps[1] == pytest.approx(0.995 ** 1.5)
    assert steps[-1] == pytest.approx(0.5) and min(steps) >= 0.5 - 1e-12
    assert fast.factor(1000) == 1.0 and fast.factor(0) == pytest.approx(0.995)  # the band starts it over
    assert fast.factor(900) == pytest.approx(0.995 ** min(1.5, 0.9 ** -0.25))
    assert fast.state_dict()["descent"] > 0
    restored = MultiplicativeScaling(1000, 1.0, fast=True)
    restored.load_state_dict(fast.state_dict())
    assert restored.factor(0) == fast.factor(0)


def test_fast_sage_gamma():
    paper, fast = SageScaling(0.01, 1.0), SageScaling(0.01, 1.0, fast=True)
    for ratio in (0.5, 0.9, 1.0, 1.5, 2.0):
        assert fast.gamma(ratio) == paper.gamma(ratio) == 1.0
    assert paper.gamma(0.3) == 1.0 and fast.gamma(0.3) == pytest.approx(0.3 ** 0.1)
    assert paper.gamma(0.05) == 0.95 and fast.gamma(0.05) == pytest.approx(0.05 ** 0.1)
    assert paper.gamma(5.0) == 1.0 and fast.gamma(5.0) == pytest.approx(5.0 ** 0.1)
    assert fast.gamma(1e9) == 2.0 and fast.gamma(0.0) == 0.5


@pytest.mark.parametrize("name", ["exdyna", "micro", "sage"])
def test_options(name):
    assert {"warm_start": True, "controller": "fast"}.items() <= reducers.method_options(name).items()
    assert reducers.build(name, **PAPER).options().items() >= PAPER.items()
    with pytest.raises(ValueError, match=r"controller must be one of \['fast', 'paper'\], got 'quick'"):
        reducers.build(name, controller="quick")
    with pytest.raises(ValueError, match="warm_start must be true or false, got 'yes'"):
        reducers.build(name, warm_start="yes")


# ------------------------------------------------------------- across processes, vs the reference
STEPS = 30
CASES = [("exdyna", {}), ("exdyna", PAPER), ("micro", {}), ("micro", PAPER), ("sage", {}), ("sage", PAPER),
         ("sage", {"exchange": "union", "warm_start": False}), ("exdyna", {"num_blocks": 16, "controller": "paper"})]


def factors(stats):
    thresholds = [s["threshold"] for s in stats]
    return [b / a for a, b in zip(thresholds, thresholds[1:])]


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("name,options", CASES, ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={x}" for k, x in v.items()) or "default")
def test_agrees_with_the_reference_out_of_band(clusters, P, name, options):
    """30 steps whose gradient scale jumps 10x and back: identical averages on every rank,
    conservation, and the reference's averages and residuals; the run must have taken the
    controller's non-published steps (or, for "paper", only published ones)."""
    results = clusters(P).run(ws.run_small, name, STEPS, options)
    sim = Simulation(name, P, SHAPES, 0.05, **options)
    d = results[0]["avg"][0].numel()
    previous = [torch.zeros(d) for _ in range(P)]
    for t in range(STEPS):
        grads = [ws.small_jumping_grads(r, t) for r in range(P)]
        avgs, residuals = [res["avg"][t] for res in results], [res["memory"][t] for res in results]
        for r in range(1, P):
            assert torch.equal(avgs[r], avgs[0]), f"step {t}: rank {r}'s average differs from rank 0's"
        x_sum = sum(previous[w] + flat(grads[w]) for w in range(P))
        torch.testing.assert_close(P * avgs[0] + sum(residuals), x_sum, rtol=1e-5, atol=1e-5)
        ref_avg, ref_residuals = sim.step(grads)
        torch.testing.assert_close(avgs[0], ref_avg, rtol=1e-5, atol=1e-7)
        for w in range(P):
            assert torch.equal(residuals[w], ref_residuals[w]), f"step {t}: rank {w}'s residual differs"
        previous = residuals
    stats = results[0]["stats"]
    fast = options.get("controller", "fast") == "fast"
    if name == "sage":
        off = [s["gamma"] for s in stats[1:] if not any(math.isclose(s["gamma"], g) for g in PAPER_GAMMAS)]
    else:
        off = [f for f in factors(stats) if not any(math.isclose(f, p, rel_tol=1e-9) for p in PAPER_FACTORS)]
        if fast:
            assert min(off) < 0.99 and max(off) > 1.01, off  # both directions were exercised
    assert bool(off) == fast, off


# ------------------------------------------------------------------------- the 10x jump
def settle(ratios):
    """The first step from which every ratio is within 2x (None: never)."""
    for i in range(len(ratios)):
        if all(0.5 <= q <= 2 for q in ratios[i:]):
            return i
    return None


def phases(per_step, key, density=0.01, n=ws.PHASE):
    ratios = [s[key] / density for s in per_step]
    return [ratios[i * n:(i + 1) * n] for i in range(3)]


def show(label, parts):
    cells = []
    for part in parts:
        first = settle(part)
        late = sum(0.5 <= q <= 2 for q in part[20:]) / len(part[20:])
        cells.append(f"within 2x from step {'-' if first is None else first}, {late:.0%} of steps 20+")
    print(f"\n{label}: " + "; ".join(cells))
    for part in parts:
        print("   " + " ".join(f"{q:.2g}" for q in part))


@pytest.mark.parametrize("name,measure", [("exdyna", "density"), ("micro", "density"), ("sage", "local_density")])
def test_density_comes_back_after_a_10x_jump(clusters, capsys, name, measure):
    """Two workers, error feedback, target 0.01; the scale is 1, 10, then 1 (60 steps each).
    Default: within 2x from step 20 of the first two phases at the latest and for good,
    approaching the target after the jump up without falling below it by 2x. The published
    method is still more than 2x off after 60 steps of either. After the jump down the
    threshold has to come down through the residuals piled up under it: a sawtooth for ExDyna
    and MiCRO (whose band keeps the published steps), so there only most steps are required."""
    cluster = clusters(2)
    fast = phases(cluster.run(ws.track, name, "jumping_grads", 3 * ws.PHASE)[0], measure)
    paper = phases(cluster.run(ws.track, name, "jumping_grads", 3 * ws.PHASE, options=PAPER)[0], measure)
    with capsys.disabled():
        show(f"{name} {measure}/target, default (scale x1, x10, x1)", fast)
        show(f"{name} {measure}/target, controller='paper', warm_start=False", paper)
    for part in fast[:2]:
        first = settle(part)
        assert first is not None and first <= 20, part
        assert min(part[:first] or [1.0]) >= 0.5, "overshot below the target on the way"
    assert sum(0.5 <= q <= 2 for q in fast[2][20:]) >= 0.5 * len(fast[2][20:])
    if name == "sage":
        assert settle(fast[2]) is not None and settle(fast[2]) <= 25
    assert settle(paper[1]) is None
    if name != "sage":
        assert settle(paper[0]) is None


@pytest.mark.parametrize("name", ["exdyna", "micro"])
def test_without_error_feedback_the_jump_down_settles_too(clusters, capsys, name):
    """Without residuals under the threshold, the accelerating descent brings density back
    within 2x after the jump down as well, and for good."""
    fast = phases(clusters(2).run(ws.track, name, "jumping_grads", 3 * ws.PHASE, error_feedback=False)[0], "density")
    with capsys.disabled():
        show(f"{name} density/target without error feedback", fast)
    for part in fast:
        first = settle(part)
        assert first is not None and first <= 20, part


# ---------------------------------------------------------------------------- step 0
@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("name,measure", [("exdyna", "density"), ("micro", "density"), ("sage", "local_density")])
def test_step_zero_hits_the_target_on_uneven_partitions(clusters, P, name, measure):
    """Step 0 selects within 10% of the target on gradients whose last fifth is 20x larger
    (the published start, 1/(2 sqrt(k)), is more than 3x off there), every rank with the
    same threshold."""
    warm = clusters(P).run(ws.track, name, "skewed_grads", 1, density=0.01)
    cold = clusters(P).run(ws.track, name, "skewed_grads", 1, density=0.01, options=PAPER)
    assert len({run[0]["threshold"] for run in warm}) == 1
    if name == "sage":
        achieved = sum(run[0]["local_density"] for run in warm) / P
    else:
        achieved = warm[0][0][measure]
    assert abs(achieved / 0.01 - 1) < 0.1, achieved
    assert not 1 / 3 < cold[0][0][measure] / 0.01 < 3


# ---------------------------------------------------------------------------- resuming
@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("name", ["exdyna", "micro", "sage"])
def test_resumes_bit_exactly_mid_descent(clusters, P, name):
    """Saved at step 22 (ExDyna and MiCRO in the middle of an accelerating descent), restored
    into a new reducer: the rest is bit-identical to the straight run."""
    runs = clusters(P).run(ws.resume_mid_run, name)
    assert all(run["same"] for run in runs)
    if name != "sage":
        assert runs[0]["control"]["descent"] > 0
