"""The DDP communication hook (sparsecomm.ddp) on real gloo process groups of 1 to 4 workers.

Model scope: the same averages as this project's reducer, the same training as its loop,
resume, gradient accumulation, static graphs, and the errors. Bucket scope: each bucket's
average equals its own reducer's and the method's single-process reference on that bucket;
per-tensor methods mean what they mean in model scope, across DDP's rebuild; every method
trains in its auto scope; resume across the rebuild; the same errors, and a state of another
rank refused on every rank."""
from __future__ import annotations

import io
import math
import pickle

import pytest
import torch

import ddp_scenarios as sc
from nonfinite_outcomes import assert_skip_then_raise
from reducer_reference import APPROXIMATE, Simulation
from sparsecomm import reducers
from sparsecomm.ddp import ReducerHookState
from sparsecomm.reducers.buckets import resolve_scope


def _same(a: list[torch.Tensor], b: list[torch.Tensor], what: str) -> None:
    for t, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"{what}, step {t}: max difference {float((x - y).abs().max()):.3g}"


@pytest.mark.parametrize("world", [2, 3])
def test_model_scope_averages_as_the_reducer(clusters, world):
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
    assert saved["reducer"]["units"] == [] and saved["reducer"]["residual"] is None
    assert saved["parameter_shapes"] is None and saved["scope"] == "model" and saved["rank"] is None
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


# ------------------------------------------------------------------------- bucket scope
# Each method's auto scope: "bucket" where its result on a tensor depends on that tensor alone.
AUTO_SCOPE = {
    "exact": "bucket", "topk": "bucket", "accordion": "bucket", "legacy": "bucket", "powersgd": "bucket",
    "dgc": "bucket", "qsgd": "bucket", "terngrad": "bucket", "efsignsgd": "bucket", "signsgd": "bucket",
    "fp16": "bucket", "bf16": "bucket",
    "global_topk": "model", "randomk": "model", "thresh": "model", "sage": "model", "micro": "model",
    "exdyna": "model", "cltk": "model", "gtopk": "model", "deft": "model", "omgs": "model", "agtf": "model",
}
# Per-tensor methods whose random streams belong to a bucket's reducer (a bucket draws its own
# numbers), so that their bits depend on the bucketing; their meaning does not.
OWN_STREAMS = {"qsgd", "terngrad", "dgc"}


def test_every_method_declares_its_scope():
    names = reducers.available()
    assert sorted(AUTO_SCOPE) == names, "a registered method without an expected scope here"
    for name in names:
        cls = reducers.lookup(name)
        assert "per_tensor" in vars(cls), f"{name} ({cls.__name__}) does not declare per_tensor itself"
        assert resolve_scope("auto", name) == AUTO_SCOPE[name], name
    assert resolve_scope("auto", "thresh", {"scope": "layer"}) == "bucket"
    assert resolve_scope("auto", "thresh", {"threshold": 0.01}) == "bucket"
    assert resolve_scope("auto", "dgc", {"clip_norm": 1.0}) == "model"
    assert ReducerHookState("thresh", 0.01, scope="auto", method_options={"scope": "layer"}).scope == "bucket"
    with pytest.raises(ValueError, match="scope must be one of"):
        ReducerHookState("topk", 0.01, scope="layer")

    class Undeclared(reducers.Reducer):
        name = "undeclared"

        def _run(self, call):
            raise NotImplementedError

    with pytest.raises(TypeError, match="does not declare per_tensor"):
        reducers.register(Undeclared)


def _segments(shapes):
    offsets = [0]
    for shape in shapes:
        offsets.append(offsets[-1] + math.prod(shape))
    return offsets


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_bucket_scope_averages_each_bucket_as_its_reference(clusters, world):
    """DDP's first buckets, kept (find_unused_parameters): each bucket's average is bit-identical
    to a reducer of the method built for that bucket alone, on every rank, and agrees with the
    method's single-process reference on that bucket (averages to float tolerance, residuals
    bit for bit), as tests/test_reducers_distributed.py holds the whole-model reducers."""
    names = reducers.available()
    results = clusters(world).run(sc.buckets_vs_references, names)
    for name in names:
        got = [r[name] for r in results]
        buckets = got[0]["buckets"]
        assert len(buckets) == 3 and got[0]["scope"] == "bucket", buckets
        assert sorted(p for b in buckets for p in b["positions"]) == list(range(6))
        offsets = _segments(got[0]["shapes"])
        for rank in range(world):
            for t, (hook, own) in enumerate(zip(got[rank]["hook"], got[rank]["own"], strict=True)):
                assert torch.equal(hook, own), f"{name}, rank {rank}, step {t}: {float((hook - own).abs().max()):.3g}"
                assert torch.equal(hook, got[0]["hook"][t]), f"{name}: rank {rank} against rank 0, step {t}"
        for bucket in buckets:
            positions = bucket["positions"]
            shapes = [got[0]["shapes"][p] for p in positions]
            sim = Simulation(name, world, shapes, sc.DENSITY, seed=bucket["seed"], describe=bucket["describe"])

            def part(v: torch.Tensor) -> torch.Tensor:
                return torch.cat([v[offsets[p]:offsets[p + 1]] for p in positions])

            for t in range(len(got[0]["hook"])):
                grads = [[g.view(s) for g, s in zip(part(got[r]["local"][t]).split(
                    [offsets[p + 1] - offsets[p] for p in positions]), shapes)] for r in range(world)]
                ref_avg, ref_residuals = sim.step(grads)
                what = f"{name}, bucket {positions}, step {t}"
                tolerance = dict(rtol=1e-4, atol=1e-6) if name in APPROXIMATE else dict(rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(part(got[0]["hook"][t]), ref_avg, **tolerance,
                                           msg=lambda m, what=what: f"{what}: {m}")
                for r in range(world):
                    residual = got[r]["residual"][t]
                    if residual is None:
                        continue
                    if name in APPROXIMATE:
                        torch.testing.assert_close(part(residual), ref_residuals[r], rtol=1e-4, atol=1e-6)
                    else:
                        assert torch.equal(part(residual), ref_residuals[r]), f"{what}: rank {r}'s residual"


@pytest.mark.parametrize("world", [2])
def test_per_tensor_methods_mean_the_same_bucket_by_bucket(clusters, world):
    """Across DDP's rebuild (one bucket, then two): in bucket scope a per-tensor method's
    averages are bit-identical to model scope's (residuals and per-tensor state follow the
    parameters into the new buckets), except where a bucket draws its own random numbers."""
    names = [n for n, scope in AUTO_SCOPE.items() if scope == "bucket" and n not in OWN_STREAMS]
    results = clusters(world).run(sc.bucket_vs_model, names)
    for name in names:
        got = results[0][name]
        assert got["bucket_units"] == [(5, 4, 3, 2), (1, 0)], "DDP rebuilt its buckets (last layers first)"
        for t, (b, m) in enumerate(zip(got["bucket"], got["model"], strict=True)):
            assert torch.equal(b, m), f"{name}, step {t}: {float((b - m).abs().max()):.3g}"


def test_every_method_trains_in_its_auto_scope(clusters):
    """20 steps of every registered method in its auto scope, 3 workers: finite, the same model
    on every rank, and the conservation identity at the last step where the method keeps it."""
    names = reducers.available()
    results = clusters(3).run(sc.auto_scope_training, names)
    start = sc.flat(sc.make_model().parameters())
    for name in names:
        got = [r[name] for r in results]
        assert got[0]["scope"] == AUTO_SCOPE[name]
        assert got[0]["buckets"] == (2 if AUTO_SCOPE[name] == "bucket" else 1)
        assert torch.isfinite(got[0]["params"]).all(), name
        assert not torch.equal(got[0]["params"], start), f"{name}: no training"
        for r in range(1, 3):
            assert torch.equal(got[r]["params"], got[0]["params"]), f"{name}: rank {r}'s model differs"
        if got[0]["conserves"]:
            torch.testing.assert_close(3 * got[0]["avg"] + sum(g["residual"] for g in got),
                                       sum(g["x"] for g in got), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("world,name,options", [
    (2, "topk", {}), (2, "powersgd", {}), (2, "qsgd", {}), (2, "dgc", {"momentum": 0.0}),
    (2, "exdyna", {}), (3, "exdyna", {}), (3, "sage", {}),
])
def test_bucket_scope_resumes_bit_exactly_across_the_rebuild(clusters, world, name, options):
    """10 steps, save, a fresh DDP model (its first backward has one bucket again) and a fresh
    state, 10 more: bit-identical to 20 straight, for per-tensor methods, methods with their
    own random streams per bucket, and whole-model methods asked for bucket scope."""
    cluster = clusters(world)
    straight = cluster.run(sc.train_hook, name, 20, options, scope="bucket")
    resumed = cluster.run(sc.train_hook_resumed, name, 10, 20, options, scope="bucket")
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b), f"max difference {float((a - b).abs().max()):.3g}"


@pytest.mark.parametrize("name,ddp_kwargs", [
    ("topk", {"gradient_as_bucket_view": True}),
    ("powersgd", {"static_graph": True}),
    ("topk", {"find_unused_parameters": True, "spare": True}),
])
def test_bucket_scope_trains_as_the_loop(clusters, name, ddp_kwargs):
    """20 SGD steps with momentum, 2 workers, bucket scope: bit-identical to this project's
    loop (a per-tensor method means the same bucket by bucket)."""
    cluster = clusters(2)
    loop = cluster.run(sc.train_loop, name, 20, spare=ddp_kwargs.get("spare", False))
    hook = cluster.run(sc.train_hook, name, 20, scope="bucket", **ddp_kwargs)
    for rank in range(2):
        assert torch.equal(hook[rank], loop[rank]), f"rank {rank}: {float((hook[rank] - loop[rank]).abs().max()):.3g}"


def test_no_sync_accumulation_in_bucket_scope(clusters):
    for got in clusters(2).run(sc.no_sync_vs_reducer, "topk", scope="bucket"):
        _same(got["hook"], got["reducer"], "topk with no_sync, bucket scope")


def test_nonfinite_skip_and_raise_in_bucket_scope(clusters):
    cluster = clusters(2)
    for got in cluster.run(sc.nonfinite, "skip", name="topk", scope="bucket"):
        assert got["error"] is None and got["group_alive"]
        assert [s["skipped"] for s in got["steps"]] == [False, True, False]
        assert [s["zero"] for s in got["steps"]] == [False, True, False]
    for got in cluster.run(sc.nonfinite, "raise", name="topk", scope="bucket"):
        assert got["group_alive"] and len(got["steps"]) == 1
        assert got["error"] is not None and got["error"][0] == "NonFiniteGradientError", got


@pytest.mark.parametrize("ranks", [[0, 1], [1]])
def test_other_model_raises_on_every_rank_in_bucket_scope(clusters, ranks):
    for rank, got in enumerate(clusters(2).run(sc.other_model, ranks, name="topk", scope="bucket")):
        assert got["group_alive"]
        assert got["error"] is not None and got["error"][0] == "LayoutMismatchError", got
        if rank in ranks:
            assert "not seen at the first step" in got["error"][1]


@pytest.mark.parametrize("how", ["load", "pickle"])
def test_another_ranks_state_is_refused_on_every_rank(clusters, how):
    """Every rank given rank 0's state (as a checkpoint written by rank 0 alone would do): every
    rank raises one ValueError naming both ranks, at load (a collective) or, for a state
    unpickled without one, at the first bucket of the next step; no rank is left waiting."""
    for got in clusters(2).run(sc.wrong_rank_state, how):
        assert got["group_alive"]
        assert got["error"] is not None and got["error"][0] == "ValueError", got
        assert "rank 1 was given the hook state saved by rank 0" in got["error"][1], got
        assert "\n" not in got["error"][1]
        assert got.get("loaded", False) is (how == "pickle")
