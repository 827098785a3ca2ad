"""Corner cases across real process groups: degenerate gradients, low precision, non-finite
values and gradients that do not match between ranks or steps."""
import pytest
import torch

import reducer_scenarios as sc
from sparsecomm import reducers

METHODS = reducers.available()


def check_step(outs, P, rtol, atol, name=None):
    """Identical averages on every rank, shapes and dtypes kept, conservation (unless the
    method ``name`` says it does not conserve: its reducer's ``conserves`` is False; then a
    finite average)."""
    for r in range(1, P):
        assert torch.equal(outs[r]["avg"], outs[0]["avg"]), f"rank {r} differs"
        assert outs[r]["shapes"] == outs[0]["shapes"]
    if name is not None and not getattr(reducers.build(name), "conserves", True):
        assert torch.isfinite(outs[0]["avg"]).all()
        return
    x_sum = sum(o["x"].double() + o["memory_before"].double() for o in outs)
    kept = P * outs[0]["avg"].double() + sum(o["memory"].double() for o in outs)
    torch.testing.assert_close(kept, x_sum, rtol=rtol, atol=atol)


@pytest.mark.parametrize("recipe,P", [
    ("zeros_grads", 3), ("empty_grads", 2), ("no_grads", 2), ("tiny_grads", 4), ("tiny_grads", 3),
])
@pytest.mark.parametrize("name", METHODS)
def test_degenerate_gradients(clusters, name, recipe, P):
    steps = clusters(P).run(sc.call_reduce, name, getattr(sc, recipe), steps=3)
    for t in range(3):
        outs = [steps_r[t] for steps_r in steps]
        check_step(outs, P, rtol=1e-6, atol=1e-7, name=name)
        assert outs[0]["shapes"] == [tuple(g.shape) for g in getattr(sc, recipe)(0, t)]
        stats = outs[0]["stats"]
        assert 0 <= stats["density"] <= 1 and stats["skipped"] is False
        if recipe == "zeros_grads":
            assert int(outs[0]["avg"].count_nonzero()) == 0


@pytest.mark.parametrize("name", METHODS)
def test_density_below_one_coordinate_still_sends_something(clusters, name):
    steps = clusters(2).run(sc.call_reduce, name, sc.tiny_grads, steps=2, density=1e-6)
    for t in range(2):
        outs = [s[t] for s in steps]
        check_step(outs, 2, rtol=1e-6, atol=1e-7, name=name)
        assert outs[0]["stats"]["density"] > 0, "at least one coordinate reaches the average"


@pytest.mark.parametrize("recipe,tol", [("half_grads", 2e-3), ("bf16_grads", 1.6e-2)])
@pytest.mark.parametrize("name", METHODS)
def test_low_precision_gradients(clusters, name, recipe, tol):
    steps = clusters(3).run(sc.call_reduce, name, getattr(sc, recipe), steps=3, density=0.05)
    dtype = torch.float16 if recipe == "half_grads" else torch.bfloat16
    for t in range(3):
        outs = [s[t] for s in steps]
        assert outs[0]["dtypes"] == [dtype, dtype]
        check_step(outs, 3, rtol=tol, atol=tol * 0.05, name=name)


@pytest.mark.parametrize("name", METHODS)
def test_nonfinite_gradient_raises_on_every_rank(clusters, name):
    outs = clusters(2).outcomes(sc.call_reduce, name, sc.nan_on_rank1_step1, steps=2)
    for o in outs:  # rank 0's own gradient is finite, and it must stop too
        assert not o.ok and o.error_type == "NonFiniteGradientError", o.trace
        assert "rank(s) [1]" in o.error


@pytest.mark.parametrize("name", METHODS)
def test_nonfinite_gradient_skipped_when_asked(clusters, name):
    steps = clusters(2).run(sc.call_reduce, name, sc.nan_on_rank1_step1, steps=3, options={"nonfinite": "skip"})
    for r in range(2):
        skipped = steps[r][1]
        assert skipped["stats"]["skipped"] is True and skipped["stats"]["skipped_steps"] == 1
        assert int(skipped["avg"].count_nonzero()) == 0
        assert torch.equal(skipped["memory"], skipped["memory_before"]), "a skipped step changed the residual"
        assert torch.isfinite(steps[r][2]["memory"]).all()
        assert steps[r][2]["stats"]["skipped"] is False
    check_step([steps[r][2] for r in range(2)], 2, rtol=1e-6, atol=1e-7, name=name)


def test_inf_raises_too(clusters):
    outs = clusters(3).outcomes(sc.call_reduce, "exdyna", sc.inf_on_rank0_step0)
    assert all(not o.ok and o.error_type == "NonFiniteGradientError" for o in outs)


@pytest.mark.parametrize("recipe,message", [
    ("shapes_differ_by_rank", "gradient layouts differ between ranks"),
    ("count_differs_by_rank", "gradient layouts differ between ranks"),
])
@pytest.mark.parametrize("name", ["exact", "topk", "sage", "exdyna", "randomk"])
def test_layouts_differing_between_ranks_fail_clearly(clusters, name, recipe, message):
    outs = clusters(2).outcomes(sc.call_reduce, name, getattr(sc, recipe), timeout=90)
    for o in outs:
        assert not o.ok and o.error_type == "LayoutMismatchError", o.trace
        assert message in o.error and "rank 0: 2 tensors, 43 elements" in o.error


@pytest.mark.parametrize("name", ["exact", "thresh", "micro", "global_topk"])
def test_layout_change_on_one_rank_fails_everywhere(clusters, name):
    outs = clusters(3).outcomes(sc.call_reduce, name, sc.shape_changes_on_rank1, steps=2, timeout=90)
    assert all(not o.ok and o.error_type == "LayoutMismatchError" for o in outs)
    assert "gradient 1 has shape (2,), expected (3,)" in outs[1].error
    assert "rank(s) [1] fed gradients whose layout changed" in outs[0].error


def test_layout_change_everywhere_fails_everywhere(clusters):
    outs = clusters(2).outcomes(sc.call_reduce, "sage", sc.shape_changes_everywhere, steps=2, timeout=90)
    assert all(not o.ok and o.error_type == "LayoutMismatchError" for o in outs)
    assert all("gradient 0 has shape (10, 5), expected (10, 4)" in o.error for o in outs)
