"""Every registered method across real gloo process groups of 1 to 4 workers: identical
averages on all ranks, the conservation identity, and agreement with the reference."""
import pytest
import torch

from sparsecomm import reducers
from reducer_reference import APPROXIMATE, Simulation, has_reference
from reducer_scenarios import SHAPES, make_grads, flat, run_steps

SIZES = (1, 2, 3, 4)
STEPS = 5
DENSITY = 0.05

# Every method, named here by hand (a new method must be added, with a reference), with default
# options, plus the option variants that change the exchange.
METHODS = ("exact", "topk", "global_topk", "randomk", "thresh", "sage", "micro", "exdyna", "cltk", "gtopk", "deft",
           "accordion", "legacy", "omgs", "agtf", "powersgd", "dgc", "qsgd", "terngrad", "efsignsgd", "signsgd",
           "fp16", "bf16")
CASES = [(name, {}) for name in METHODS] + [
    ("topk", {"exchange": "union"}),
    ("global_topk", {"exchange": "union"}),
    ("thresh", {"exchange": "union"}),
    ("thresh", {"scope": "layer"}),
    ("thresh", {"threshold": 0.03}),
    ("sage", {"exchange": "union"}),
    ("accordion", {"exchange": "gather"}),
    ("exdyna", {"num_blocks": 16}),
    ("dgc", {"momentum": 0.0}),
]
# Methods whose average is not the plain mean of what the workers hold (their reducer says so:
# ``conserves`` is False), and why; tests/test_quantized.py checks what holds instead.
NOT_CONSERVING = {
    "qsgd": "unbiased, no residual: the mean in expectation only (checked there with a confidence bound)",
    "terngrad": "unbiased, no residual: the mean in expectation only (checked there with a confidence bound)",
    "signsgd": "a majority vote, not an average, and no residual (the vote is checked there)",
    "dgc": "momentum correction adds mu u_w: sum_w (x_w + mu u_w) = P avg + sum_w m_w is checked there; "
           "the case momentum=0 keeps the plain identity",
}


def conserves(name, options):
    return getattr(reducers.build(name, **options), "conserves", True)


def case_id(case):
    name, options = case
    return name + "".join(f"-{k}={v}" for k, v in options.items())


def test_every_registered_method_is_covered():
    untested = sorted(set(reducers.available()) - set(METHODS))
    assert not untested, f"registered methods without a case here: {untested} (add them to METHODS)"
    unknown = sorted(set(METHODS) - set(reducers.available()))
    assert not unknown, f"cases for methods that are not registered: {unknown}"
    no_reference = sorted(name for name in METHODS if not has_reference(name))
    assert not no_reference, f"methods without a single-process reference in tests/reference_*.py: {no_reference}"


@pytest.mark.parametrize("P", SIZES)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_method_across_processes(clusters, P, case):
    name, options = case
    results = clusters(P).run(run_steps, name, density=DENSITY, steps=STEPS, options=options)
    sim = Simulation(name, P, SHAPES, DENSITY, **options, describe=results[0]["describe"])
    d = sum(results[0]["avg"][0].numel() for _ in [0])
    previous = [torch.zeros(d) for _ in range(P)]
    for t in range(STEPS):
        grads = [make_grads(SHAPES, r, t) for r in range(P)]
        avgs = [res["avg"][t] for res in results]
        residuals = [res["memory"][t] for res in results]
        for r in range(1, P):
            assert torch.equal(avgs[r], avgs[0]), f"step {t}: rank {r}'s average differs from rank 0's"
        # conservation: sum_w x_w == P * avg + sum_w m_w(new)
        x_sum = sum(previous[w] + flat(grads[w]) for w in range(P))
        if conserves(name, options):
            torch.testing.assert_close(P * avgs[0] + sum(residuals), x_sum, rtol=1e-5, atol=1e-6)
        else:
            assert name in NOT_CONSERVING, f"{name} does not conserve: say why in NOT_CONSERVING"
        # the single-process reference
        ref_avg, ref_residuals = sim.step(grads)
        torch.testing.assert_close(avgs[0], ref_avg, rtol=1e-5, atol=1e-7)
        for w in range(P):
            if name in APPROXIMATE:
                torch.testing.assert_close(residuals[w], ref_residuals[w], rtol=1e-4, atol=1e-6)
            else:
                assert torch.equal(residuals[w], ref_residuals[w]), f"step {t}: rank {w}'s residual differs"
        previous = residuals
    stats = results[0]["stats"][-1]
    for key in ("density", "local_density", "bytes_sent", "bytes_wire", "t_select", "t_comm", "residual_norm"):
        assert key in stats, key
    assert 0 < stats["density"] <= 1
    if P > 1:
        assert stats["bytes_wire"] > 0
    else:
        assert stats["bytes_wire"] == 0


@pytest.mark.parametrize("name", reducers.available())
def test_writing_into_the_gradients_gives_the_same_average(clusters, name):
    plain, into = (clusters(3).run(run_steps, name, density=DENSITY, steps=3, into_grads=flag) for flag in (False, True))
    for r in range(3):
        for t in range(3):
            assert torch.equal(plain[r]["avg"][t], into[r]["avg"][t])
            assert torch.equal(plain[r]["memory"][t], into[r]["memory"][t])


def test_out_of_another_layout_is_refused():
    r = reducers.build("topk", density=0.5)
    with pytest.raises(ValueError, match=r"out does not match the gradients: tensor 0 has shape \(3,\)"):
        r.reduce([torch.randn(4)], out=[torch.empty(3)])
