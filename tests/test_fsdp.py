"""Methods as FSDP2's reduce-scatter (sparsecomm.fsdp) on real gloo process groups of 2 and 3
workers, a model of three FSDP units: exact against FSDP's own reduce-scatter, every method
against this project's reducer on each unit's unsharded gradient, conservation, identical
ranks, resume, mixed precision, and the refusals."""
from __future__ import annotations

import pytest
import torch

import fsdp_scenarios as sc
import reducer_scenarios
from nonfinite_outcomes import assert_skip_then_raise
from reducer_reference import Simulation
from sparsecomm import reducers
from sparsecomm.fsdp import FSDPReducerState, register_reducer

CORE = ["exact", "topk", "exdyna", "powersgd", "fp16"]


def _same(a: list[torch.Tensor], b: list[torch.Tensor], what: str, tolerance: float = 0.0) -> None:
    for t, (x, y) in enumerate(zip(a, b, strict=True)):
        gap = float((x - y).abs().max())
        assert gap <= tolerance, f"{what}, step {t}: max difference {gap:.3g}"


@pytest.mark.parametrize("world,reshard", [(2, True), (3, False), (4, True)])
def test_exact_equals_fsdps_reduce_scatter(clusters, world, reshard):
    for got in clusters(world).run(sc.exact_vs_default, 5, reshard):
        assert float((got["exact"] - got["default"]).abs().max()) <= 1e-6
        assert got["stats"]["modules"] == 3 and got["stats"]["density"] == 1.0


@pytest.mark.parametrize("world,reshard", [(2, True), (3, True), (3, False)])
def test_core_methods_average_as_their_reducer_per_unit(clusters, world, reshard):
    results = clusters(world).run(sc.methods_vs_reducer, CORE, 3, reshard)
    for rank, by_name in enumerate(results):
        for name, got in by_name.items():
            # exact is a reduce-scatter, its reference an all-reduce: the sums round in another order;
            # so do the routed union exchanges on 3 or more ranks (rank order against gloo's ring)
            rounded = name == "exact" or (world > 2 and name in UNION_ROUTING)
            _same(got["fsdp"], got["reducer"], f"{name} on rank {rank} of {world}", 1e-7 if rounded else 0.0)
            _same(got["fsdp"], results[0][name]["fsdp"], f"{name}: rank {rank} against rank 0")
            assert got["conservation"] <= 1e-5, f"{name}: conservation off by {got['conservation']:.3g}"
    assert {"topk", "exdyna"} <= {n for n in CORE if results[0][n]["density"] < 0.5}, "the methods must compress"


@pytest.mark.parametrize("world", [2, 3])
def test_methods_equal_their_single_process_reference_per_unit(clusters, world):
    """Each unit's average against the method's single-process reference
    (tests/reducer_reference.py) fed every rank's gradient of that unit."""
    names = ["topk", "exdyna", "global_topk", "fp16"]
    steps = 3
    got = clusters(world).run(sc.methods_vs_reducer, names, steps)[0]
    plain = sc.make_model()
    grads = []  # step -> rank -> unit -> gradients
    for t in range(steps):
        by_rank = []
        for r in range(world):
            plain.zero_grad()
            sc.loss_of(plain, r, t).backward()
            by_rank.append({u: [p.grad.clone() for p in ps] for u, ps in sc.units(plain).items()})
        grads.append(by_rank)
    order = [id(p) for p in plain.parameters()]
    for name in names:
        sims = {u: Simulation(name, world, [list(p.shape) for p in ps], sc.DENSITY) for u, ps in sc.units(plain).items()}
        for t in range(steps):
            avg = {}
            for u, ps in sc.units(plain).items():
                flat, _ = sims[u].step([grads[t][r][u] for r in range(world)])
                at = 0
                for p in ps:
                    avg[id(p)] = flat[at:at + p.numel()]
                    at += p.numel()
            want = torch.cat([avg[i] for i in order])
            torch.testing.assert_close(got[name]["fsdp"][t], want, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{name}, step {t}, {world} ranks: {m}")


def test_every_method_averages_as_its_reducer_per_unit(clusters):
    names = [n for n in reducers.available() if n not in CORE]
    results = clusters(2).run(sc.methods_vs_reducer, names, 2)
    for rank, by_name in enumerate(results):
        for name, got in by_name.items():
            _same(got["fsdp"], got["reducer"], f"{name} on rank {rank}")
            _same(got["fsdp"], results[0][name]["fsdp"], f"{name}: rank {rank} against rank 0")
            assert got["conservation"] <= 1e-5, f"{name}: conservation off by {got['conservation']:.3g}"


def test_every_registered_method_trains_under_fully_shard(clusters):
    names = reducers.available()
    results = clusters(3).run(sc.every_method, names)
    start = sc.full(sc.make_model().parameters())
    for name in names:
        got = [r[name] for r in results]
        assert got[0]["error"] is None, f"{name}: {got[0]['error']}"
        assert torch.isfinite(got[0]["params"]).all() and not torch.equal(got[0]["params"], start), name
        for rank, r in enumerate(got):
            assert torch.equal(r["params"], got[0]["params"]), f"{name}: rank {rank} against rank 0"


@pytest.mark.parametrize("world,name", [(2, "exdyna"), (3, "powersgd"), (3, "topk")])
def test_resume_mid_run_equals_straight_run(clusters, world, name):
    cluster = clusters(world)
    straight = cluster.run(sc.train, name, 8)
    resumed = cluster.run(sc.train_resumed, name, 4, 8)
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b), f"max difference {float((a - b).abs().max()):.3g}"


@pytest.mark.parametrize("dtype,tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_mixed_precision_reduce_dtype_is_honoured(clusters, dtype, tolerance):
    """float16 reduces by SUM around FSDP's pre- and post-divisions, bfloat16 by AVG: exact
    matches FSDP's own within the reduce dtype's rounding."""
    for got in clusters(2).run(sc.exact_vs_default, 3, True, dtype):
        assert float((got["exact"] - got["default"]).abs().max()) <= tolerance


def test_methods_average_in_the_bfloat16_reduce_dtype(clusters):
    """The reducer gets the gradients in the reduce dtype, as FSDP casts them: bit-equal to the
    method's reducer on the unsharded gradients cast to bfloat16."""
    results = clusters(2).run(sc.methods_vs_reducer, ["topk", "exdyna", "powersgd"], 3, True, torch.bfloat16)
    for rank, by_name in enumerate(results):
        for name, got in by_name.items():
            _same(got["fsdp"], got["reducer"], f"{name} (bfloat16) on rank {rank}")
            _same(got["fsdp"], results[0][name]["fsdp"], f"{name} (bfloat16): rank {rank} against rank 0")


# ------------------------------------------------------------------------------ refusals
def test_nonfinite_skip_and_raise(clusters):
    assert_skip_then_raise(clusters(2), sc.nonfinite)



def test_hsdp_is_refused(clusters):
    for got in clusters(2).run(sc.hsdp):
        assert got["group_alive"]
        assert got["error"] is not None and "2-D mesh" in got["error"][1] and "HSDP" in got["error"][1], got


def test_sharding_on_another_dimension_is_refused(clusters):
    for got in clusters(2).run(sc.shard_dim_1):
        assert got["error"] is not None and "only Shard(0) is supported" in got["error"][1], got


def test_gradient_divide_factor_is_refused_on_every_rank(clusters):
    for got in clusters(2).run(sc.divide_factor):
        assert got["group_alive"]
        assert got["error"] is not None and "AVG and SUM only" in got["error"][1], got


def test_another_ranks_or_models_state_is_refused(clusters):
    results = clusters(2).run(sc.foreign_states)
    assert results[0]["rank"] is None
    assert "rank: saved 0, this state 1" in results[1]["rank"]
    for got in results:
        assert "another model's" in got["model"], got


@pytest.mark.parametrize("kwargs", [
    {"method": "nope"},
    {"method": "exdyna", "num_blocks_typo": 3},
    {"method": "topk", "density": 0.0},
])
def test_bad_input_raises_what_build_raises_before_any_model_is_read(kwargs):
    kwargs = dict(kwargs)
    method = kwargs.pop("method")
    with pytest.raises(ValueError) as built:
        reducers.build(method, group=reducers.SoloCommunicator(), **kwargs)
    with pytest.raises(ValueError) as registered:
        register_reducer(torch.nn.Linear(2, 2), method, **kwargs)
    assert str(registered.value) == str(built.value)


def test_a_model_without_fsdp_modules_is_refused():
    with pytest.raises(ValueError, match="no module of the Linear is an FSDP module"):
        register_reducer(torch.nn.Linear(2, 2), "topk", density=0.1)


def test_state_format_is_checked():
    with pytest.raises(ValueError, match="not a sparsecomm FSDP reducer state"):
        FSDPReducerState("topk", density=0.1).load_state_dict({"format": "sparsecomm.ddp_hook/1"})


# ------------------------------------------------------------------ routing (issue 22)
ROUTING = ["topk", "global_topk", "thresh", "sage", "dgc", "accordion", "legacy"]


def _pairs_all_gather_is_no_dearer(counts: list[int], world: int, pair_bytes: int = 8) -> bool:
    """The rule of exchange.routed_gather_sum: the all-gather where its padded pairs cost no
    more bytes per rank than routing's table of counts (int32 positions, float32 values)."""
    return max(counts) * pair_bytes <= 8 * world


def _same_shards_and_residuals(got: dict, t: int, what: str) -> None:
    """Step ``t`` of :func:`fsdp_scenarios.routed_vs_unrouted` for one method on one rank:
    routed and unrouted gradient shards and every unit's residuals identical bit for bit."""
    for i, (a, b) in enumerate(zip(got[True]["shards"][t], got[False]["shards"][t], strict=True)):
        assert torch.equal(a, b), f"{what}, parameter {i}"
    _same_residuals(got, t, what)


def _same_residuals(got: dict, t: int, what: str) -> None:
    """Step ``t`` of :func:`fsdp_scenarios.routed_vs_unrouted`: every unit's routed and
    unrouted residuals identical bit for bit."""
    for unit, ms in got[True]["residuals"][t].items():
        for a, b in zip(ms, got[False]["residuals"][t][unit], strict=True):
            assert torch.equal(a, b), f"{what}, unit {unit}: residual"


def _checked_steps(results: list[dict], world: int, steps: int):
    """``(method, its results on one rank, step)`` for every rank, method and step of
    :func:`fsdp_scenarios.routed_vs_unrouted`'s ``results``, each after checking that step's
    shards and residuals (:func:`_same_shards_and_residuals`)."""
    for rank, by_name in enumerate(results):
        for name, got in by_name.items():
            for t in range(steps):
                _same_shards_and_residuals(got, t, f"{name}, rank {rank}/{world}, step {t}")
                yield name, got, t


def _add_bytes(totals: dict[bool, list[float]], routed: dict, plain: dict) -> None:
    """Add one unit call's ``bytes_wire`` and ``bytes_sent``, routed and not, into ``totals``
    (route -> [wire, sent])."""
    for route, entry in ((True, routed), (False, plain)):
        totals[route][0] += entry["bytes_wire"]
        totals[route][1] += entry["bytes_sent"]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_routed_shards_and_residuals_equal_unrouted_bit_for_bit(clusters, world):
    """route=True against route=False on the model of three FSDP units: every rank's gradient
    shard and every unit's residual identical bit for bit at every step. Bytes: a routed unit
    moves fewer over all ranks and steps; on one rank and step it may move up to routing's
    table of counts more (every pair of the others landing in its shard)."""
    results = clusters(world).run(sc.routed_vs_unrouted, ROUTING, 3)
    routed_units, table = 0, 8 * world
    totals = {True: [0.0, 0.0], False: [0.0, 0.0]}
    for name, got, t in _checked_steps(results, world, 3):
        for unit, st in got[True]["stats"][t].items():
            plain = got[False]["stats"][t][unit]
            assert "routed" not in plain and st["local_density"] == plain["local_density"]
            if st.get("routed") is None:  # no gather-sum this step (accordion's dense step)
                assert st["bytes_wire"] == plain["bytes_wire"], (name, unit, st, plain)
            elif st["routed"]:
                routed_units += 1
                for key, bound in (("bytes_wire", (world - 1) * table), ("bytes_sent", table)):
                    assert st[key] <= plain[key] + bound, (name, unit, key, st, plain)
                _add_bytes(totals, st, plain)
                assert st["density"] <= plain["density"] and 0 <= st["shard_density"] <= 1
            else:  # the all-gather: what the unrouted step moves, the whole union known
                assert st["bytes_wire"] == plain["bytes_wire"] and st["density"] == plain["density"]
        units = [st for st in got[True]["stats"][t].values() if st.get("shard_density") is not None]
        total = got[True]["state"][t]
        if units:  # the state's figures over its units: a count and a weighted mean
            assert total["routed"] == sum(bool(st["routed"]) for st in units)
            assert total["shard_density"] == pytest.approx(
                sum(st["owned"] * st["shard_density"] for st in units) / (sum(st["owned"] for st in units) or 1))
        assert "shard_density" not in got[False]["state"][t]
    assert routed_units, "some unit must route"
    assert totals[True][0] < totals[False][0] and totals[True][1] < totals[False][1], totals


@pytest.mark.parametrize("world", [2, 3, 4])
def test_routing_falls_back_to_the_all_gather_where_that_moves_no_more_bytes(clusters, world):
    """topk at density 0.005: unit 0 selects 2 + 1 pairs, the root's unit 1 + 1 (k_t >= 1 per
    tensor), unit 2 5 + 1. Every rank takes the same choice, the one the byte rule gives from
    the counts every rank saw, and the shards stay those of the unrouted step."""
    results = clusters(world).run(sc.routed_vs_unrouted, ["topk"], 2, 0.005)
    seen = set()
    for t in range(2):
        for unit in results[0]["topk"][True]["stats"][t]:
            stats = [r["topk"][True]["stats"][t][unit] for r in results]
            counts = [round(s["local_density"] * s["d"]) for s in stats]
            want = not _pairs_all_gather_is_no_dearer(counts, world)
            assert all(s["routed"] == want for s in stats), (unit, counts, stats)
            seen.add(want)
    for rank, r in enumerate(results):
        for t in range(2):
            for a, b in zip(r["topk"][True]["shards"][t], r["topk"][False]["shards"][t], strict=True):
                assert torch.equal(a, b), f"rank {rank}, step {t}"
    assert False in seen, "the root's unit (2 pairs) must take the all-gather"
    if world == 2:
        assert True in seen, "unit 2 (6 pairs) must route at 2 workers"


@pytest.mark.parametrize("world,name", [(3, "topk"), (4, "dgc")])
def test_routed_training_and_resume_equal_unrouted(clusters, world, name):
    """Routed and unrouted training end at the same parameters; a state saved routed resumes
    (routed) to them as well."""
    cluster = clusters(world)
    routed = cluster.run(sc.train, name, 6)
    plain = cluster.run(sc.train, name, 6, {"route": False})
    resumed = cluster.run(sc.train_resumed, name, 3, 6)
    for a, b, c in zip(routed, plain, resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_owners_tile_the_vector_and_route_to_checks_the_world():
    from sparsecomm.reducers.comm.exchange import Owners

    owners = Owners([(0, 3, 0), (3, 3, 1), (3, 5, 1), (5, 9, 0)], 2)
    assert owners.d == 9 and owners.owned(0) == [(0, 3), (5, 9)] and owners.numel(1) == 2
    for dtype in (torch.int32, torch.int64):
        assert owners.of(torch.arange(9, dtype=dtype)).tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="tile"):
        Owners([(0, 2, 0), (3, 4, 1)], 2)
    with pytest.raises(ValueError, match="tile"):
        Owners([(0, 2, 2)], 2)
    with pytest.raises(ValueError, match="does not fit 1 workers"):
        reducers.build("topk", density=0.1, group=reducers.SoloCommunicator()).route_to(owners)
    from sparsecomm.reducers.comm.exchange import routed_gather_sum

    idx = torch.tensor([1, 3], dtype=torch.int32)
    one = Owners([(0, 4, 0)], 1)
    avg, union, routed = routed_gather_sum(reducers.SoloCommunicator(), torch.arange(4.0), idx, [2], torch.zeros(4), one)
    assert avg.tolist() == [0.0, 1.0, 0.0, 3.0] and union.tolist() == [1, 3] and not routed  # one worker: gathered
    with pytest.raises(ValueError, match="for a vector of 5 coordinates"):
        routed_gather_sum(reducers.SoloCommunicator(), torch.arange(5.0), idx, [2], torch.zeros(5), one)


def test_all_to_all_of_one_worker_is_a_counted_copy():
    comm = reducers.SoloCommunicator()
    got = comm.all_to_all(torch.arange(3, dtype=torch.int32), [3], [3])
    assert got.tolist() == [0, 1, 2] and comm.bytes_sent == 12 and comm.bytes_wire == 0.0
    with pytest.raises(ValueError, match="all_to_all"):
        comm.all_to_all(torch.arange(3), [2], [2])


@pytest.mark.parametrize("options, dtype, share, kept", [
    ({}, "torch.float32", 1.0, False),
    ({"residual_dtype": "bfloat16"}, "torch.bfloat16", 0.5, False),
    ({"keep_buffers": True}, "torch.float32", 1.0, True),
])
def test_units_hold_their_residual_and_drop_the_other_buffers(clusters, options, dtype, share, kept):
    for r in clusters(2).run(sc.held_between_backwards, "exdyna", options):
        assert r["dtypes"] == [dtype] and r["residual_bytes"] == share * r["gradient_bytes"]
        assert r["kept"] is kept


def test_a_bfloat16_residual_resumes_bit_exactly_under_fully_shard(clusters):
    cluster, options = clusters(2), {"residual_dtype": "bfloat16"}
    straight = cluster.run(sc.train, "topk", 8, options)
    resumed = cluster.run(sc.train_resumed, "topk", 4, 8, options)
    wide = cluster.run(sc.train, "topk", 8)
    for a, b, c in zip(straight, resumed, wide, strict=True):
        assert torch.equal(a, b), f"max difference {float((a - b).abs().max()):.3g}"
        assert not torch.equal(a, c), "the narrow residual must round something"


DENSE_ROUTING = ["qsgd", "terngrad", "efsignsgd", "signsgd", "fp16", "bf16"]


@pytest.mark.parametrize("world", [2, 3, 4])
def test_routed_quantisers_and_casts_give_the_unrouted_shards(clusters, world):
    """The quantisers and casts, route=True against route=False on the model of three FSDP
    units, 3 steps: every rank's gradient shards and every unit's residual identical bit for
    bit; every unit call routed, shard_density 1 (0 for a rank owning nothing of a unit); what
    reaches a rank at most what the all-gather brought it, and over all ranks fewer bytes
    received and sent."""
    results = clusters(world).run(sc.routed_vs_unrouted, DENSE_ROUTING, 3)
    totals = {name: {True: [0.0, 0.0], False: [0.0, 0.0]} for name in DENSE_ROUTING}
    for name, got, t in _checked_steps(results, world, 3):
        for unit, st in got[True]["stats"][t].items():
            plain = got[False]["stats"][t][unit]
            assert st["routed"] is True and "routed" not in plain, (name, unit, st)
            assert st["shard_density"] == (1.0 if st["owned"] else 0.0), (name, unit, st)
            assert st["density"] == plain["density"] == 1.0
            assert st["bytes_wire"] <= plain["bytes_wire"], (name, unit, st, plain)
            _add_bytes(totals[name], st, plain)
        assert got[True]["state"][t]["routed"] == len(got[True]["stats"][t])
    for name, by_route in totals.items():
        assert by_route[True][0] < by_route[False][0] and by_route[True][1] < by_route[False][1], (name, by_route)
    efsign = results[0]["efsignsgd"][True]["residuals"][-1]
    assert any(m.any() for ms in efsign.values() for m in ms), "efsignsgd keeps a residual"


def test_a_state_resumes_whether_or_not_buffers_were_kept():
    saved = FSDPReducerState("topk", 0.01, keep_buffers=True).state_dict()
    FSDPReducerState("topk", 0.01).load_state_dict(saved)  # keep_buffers changes no value
    with pytest.raises(ValueError, match="residual_dtype"):
        FSDPReducerState("topk", 0.01).load_state_dict(FSDPReducerState("topk", 0.01, residual_dtype="bfloat16").state_dict())


UNION_ROUTING = ["exdyna", "micro", "deft", "randomk", "cltk", "gtopk"]


def _close_shards(got: dict, t: int, world: int, what: str) -> int:
    """Step ``t``'s routed gradient shards against the unrouted ones: bit for bit with 2
    workers; with more, every coordinate within 4 P eps of the largest magnitude in this rank's
    unrouted shards of the step (the routed owner sums in rank order, gloo's ring in its own;
    the terms of a sum can be far larger than the sum, so the bound is not taken per
    coordinate or parameter). Returns how many coordinates differ."""
    pairs = list(zip(got[True]["shards"][t], got[False]["shards"][t], strict=True))
    bound = 4 * world * torch.finfo(torch.float32).eps * max(float(b.abs().max()) for _, b in pairs if b.numel())
    differ = 0
    for i, (a, b) in enumerate(pairs):
        if world == 2:
            assert torch.equal(a, b), f"{what}, parameter {i}"
        else:
            assert bool(((a - b).abs() <= bound).all()), f"{what}, parameter {i}"
        differ += int((a != b).sum())
    return differ


@pytest.mark.parametrize("world", [2, 3, 4])
def test_routed_union_methods_give_the_unrouted_shards(clusters, world):
    """The methods whose values travel to the union (exdyna, micro, deft) or to agreed
    positions (randomk, cltk, gtopk), route=True against route=False under fully_shard, 3 steps:
    every rank's shards bit for bit with 2 workers (trained, lr 0.1), within float rounding with
    3 and 4 (lr 0, so both keep seeing the same gradients); every unit's residual and method
    state bit for bit; every unit call routed; fewer bytes over all ranks, sent and received."""
    results = clusters(world).run(sc.routed_vs_unrouted, UNION_ROUTING, 3, sc.DENSITY, sc.LR if world == 2 else 0.0)
    totals = {name: {True: [0.0, 0.0], False: [0.0, 0.0]} for name in UNION_ROUTING}
    differ = 0
    for rank, by_name in enumerate(results):
        for name, got in by_name.items():
            for t in range(3):
                what = f"{name}, rank {rank}/{world}, step {t}"
                differ += _close_shards(got, t, world, what)
                _same_residuals(got, t, what)
                for unit, state in got[True]["methods"][t].items():
                    assert reducer_scenarios.same_state(state, got[False]["methods"][t][unit]), f"{what}, {unit}"
                for unit, st in got[True]["stats"][t].items():
                    plain = got[False]["stats"][t][unit]
                    assert st["routed"] is True and "routed" not in plain, (what, unit, st)
                    assert st["density"] == plain["density"] and 0 <= st["shard_density"] <= 1, (what, unit, st)
                    _add_bytes(totals[name], st, plain)
                assert got[True]["state"][t]["routed"] == len(got[True]["stats"][t]), what
    for name, by_route in totals.items():
        assert by_route[True][0] < by_route[False][0] and by_route[True][1] < by_route[False][1], (name, by_route)
    if world > 2:
        assert differ, "gloo's ring should round some sum of 3 or 4 workers otherwise than rank order"
