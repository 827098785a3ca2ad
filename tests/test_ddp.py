"""The DDP communication hook (sparsecomm.ddp) on real gloo process groups of 2 and 3 workers:
the same averages as this project's reducer, the same training as its loop, resume, gradient
accumulation, static graphs, and the errors."""
from __future__ import annotations

import io
import pickle

import pytest
import torch

import ddp_scenarios as sc
from nonfinite_outcomes import assert_skip_then_raise
from sparsecomm import reducers
from sparsecomm.ddp import ReducerHookState


def _same(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    for t, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"{what}, step {t}: max difference {float((x - y).abs().max()):.3g}"


@pytest.mark.parametrize("world", [2, 3])
def test_every_method_averages_as_its_reducer(clusters, world):
    names = reducers.available()
    results = clusters(world).run(sc.methods_vs_reducer, names)
    for rank, by_name in enumerate(results):
        assert sorted(by_name) == names
        for name, got in by_name.items():
            _same(got["hook"], got["reducer"], f"{name} on rank {rank} of {world}")
            _same(got["hook"], results[0][name]["hook"], f"{name}: rank {rank} against rank 0")
    sparse = [n for n in names if results[0][n]["density"] < 0.5]
    assert {"exdyna", "topk", "global_topk", "micro"} <= set(sparse), "the methods must really compress here"


@pytest.mark.parametrize("world", [2, 3])
def test_exact_matches_ddp_allreduce(clusters, world):
    for got in clusters(world).run(sc.exact_vs_default):
        for d, h in zip(got["default"], got["hook"], strict=True):
            torch.testing.assert_close(h, d, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("world,name,ddp_kwargs", [
    (2, "exdyna", {}),
    (3, "topk", {"gradient_as_bucket_view": True}),
    (2, "powersgd", {"static_graph": True}),
    (3, "exdyna", {"find_unused_parameters": True, "spare": True}),  # several first buckets, an unused layer
])
def test_training_reproduces_the_projects_loop(clusters, world, name, ddp_kwargs):
    cluster = clusters(world)
    loop = cluster.run(sc.train_loop, name, 20, spare=ddp_kwargs.get("spare", False))
    hook = cluster.run(sc.train_hook, name, 20, **ddp_kwargs)
    for rank in range(world):
        assert torch.equal(hook[rank], loop[rank]), f"rank {rank}: {float((hook[rank] - loop[rank]).abs().max()):.3g}"
        assert torch.equal(hook[rank], hook[0])
    assert not torch.equal(loop[0], sc.flat(sc.make_model(spare="spare" in ddp_kwargs).parameters())), "no training"


@pytest.mark.parametrize("world,name", [(2, "exdyna"), (3, "powersgd")])
def test_resume_mid_run_equals_straight_run(clusters, world, name):
    cluster = clusters(world)
    straight = cluster.run(sc.train_hook, name, 20)
    resumed = cluster.run(sc.train_hook_resumed, name, 10, 20)
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b), f"max difference {float((a - b).abs().max()):.3g}"


def test_no_sync_accumulation(clusters):
    for got in clusters(2).run(sc.no_sync_vs_reducer, "exdyna"):
        _same(got["hook"], got["reducer"], "exdyna with no_sync")


# ------------------------------------------------------------------------------ errors
def test_nonfinite_skip_and_raise(clusters):
    assert_skip_then_raise(clusters(2), sc.nonfinite)


@pytest.mark.parametrize("ranks", [[0, 1], [1]])
def test_other_model_raises_on_every_rank(clusters, ranks):
    for rank, got in enumerate(clusters(2).run(sc.other_model, ranks)):
        assert got["group_alive"]
        assert got["error"] is not None and got["error"][0] == "LayoutMismatchError", got
        if rank in ranks:
            assert "not seen at the first step" in got["error"][1]


def test_sparse_gradients_raise_on_every_rank(clusters):
    for got in clusters(2).run(sc.sparse_gradients):
        assert got["group_alive"]
        assert got["error"] is not None and "sparse gradients" in got["error"][1], got


def test_mixed_dtypes_raise_on_every_rank(clusters):
    for got in clusters(2).run(sc.mixed_dtypes):
        assert got["group_alive"]
        assert got["error"] is not None and "dtypes ['torch.float32', 'torch.float64']" in got["error"][1], got


@pytest.mark.parametrize("kwargs", [
    {"method": "nope"},
    {"method": "exdyna", "num_blocks_typo": 3},
    {"method": "topk", "density": 0.0},
    {"method": "sage", "sample_error": 0.05, "exchange": "carrier pigeon"},
])
def test_bad_input_raises_what_build_raises(kwargs):
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    with pytest.raises(ValueError) as built:
        reducers.build(method, group=reducers.SoloCommunicator(), **kwargs)
    with pytest.raises(ValueError) as hooked:
        ReducerHookState(method, **kwargs)
    assert str(hooked.value) == str(built.value)


def test_state_round_trips_without_a_process_group():
    state = ReducerHookState("exdyna", density=0.01, num_blocks=64)
    saved = state.state_dict()
    assert saved["reducer"] is None and saved["parameter_shapes"] is None
    again = pickle.loads(pickle.dumps(state))
    assert again.state_dict() == saved and again.process_group is None
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    ReducerHookState("exdyna", density=0.01, num_blocks=64).load_state_dict(torch.load(buf, weights_only=True))
    with pytest.raises(ValueError, match="density: saved 0.01, this state 0.02"):
        ReducerHookState("exdyna", density=0.02, num_blocks=64).load_state_dict(saved)
    with pytest.raises(ValueError, match="not a ReducerHookState state"):
        state.load_state_dict({"format": "something else"})


def test_process_group_keyword_is_named():
    with pytest.raises(ValueError, match="process_group="):
        ReducerHookState("topk", density=0.1, group=None)
