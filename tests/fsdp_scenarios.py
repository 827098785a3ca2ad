"""Functions the cluster's workers run for test_fsdp.py: models under FSDP2's ``fully_shard``
with a sparsecomm reduce-scatter, next to FSDP's own reduce-scatter and to this project's
reducer run on an unsharded copy of the model, one reducer per FSDP module.

The model is an MLP of three FSDP units: ``0`` and ``2`` (its first two Linear layers) and the
root, which holds the last Linear (5 output rows: padded on 2 and 3 ranks). Batches are a pure
function of (rank, step).
"""
from __future__ import annotations

import copy
import io
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from dist_cluster import outcome_in_step
from sparsecomm import reducers
from sparsecomm.fsdp import FSDPReducerState, register_reducer

DENSITY = 0.05
LR = 0.1

# Options that make a method deterministic between two reducers of one process: OMGS and
# AGTF otherwise group layers by timings measured at their first step.
DETERMINISTIC = {"omgs": {"groups": [1, 1]}, "agtf": {"groups": [1, 1]}}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 48), nn.Tanh(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 5))


def shard(model: nn.Module, reshard: bool = True, mp: MixedPrecisionPolicy | None = None,
          mesh_shape: tuple[int, ...] | None = None, **kwargs: Any) -> nn.Module:
    """``fully_shard`` on layers 0 and 2, then on the root (which keeps layer 4)."""
    shape = mesh_shape or (dist.get_world_size(),)
    names = ("replicate", "shard") if len(shape) == 2 else ("shard",)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
    extra = {"reshard_after_forward": reshard, "mp_policy": mp or MixedPrecisionPolicy(), **kwargs}
    fully_shard(model[0], mesh=mesh, **extra)
    fully_shard(model[2], mesh=mesh, **extra)
    fully_shard(model, mesh=mesh, **extra)
    return model


def units(plain: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The parameters each FSDP unit of :func:`shard` manages, by the names register_reducer uses."""
    return {"(root)": list(plain[4].parameters()), "0": list(plain[0].parameters()),
            "2": list(plain[2].parameters())}


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1_000 * rank + 10 * step + 1)
    return torch.randn(16, 12, generator=gen), torch.randn(16, 5, generator=gen)


def loss_of(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    x, y = batch(rank, step)
    return nn.functional.mse_loss(model(x), y)


def full(tensors) -> torch.Tensor:
    """The unsharded values of (possibly DTensor) tensors, flat, in order."""
    return torch.cat([(t.full_tensor() if hasattr(t, "full_tensor") else t).detach().reshape(-1).float()
                      for t in tensors])


def _train(model: nn.Module, state: FSDPReducerState | None, first: int, last: int) -> None:
    me = dist.get_rank()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for t in range(first, last):
        opt.zero_grad()
        loss_of(model, me, t).backward()
        if state is None or not state.skipped:
            opt.step()


def exact_vs_default(steps: int = 5, reshard: bool = True, reduce_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """FSDP's default reduce-scatter against register_reducer(..., "exact"): parameters after training."""
    mp = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    default = shard(make_model(), reshard, mp)
    ours = shard(make_model(), reshard, mp)
    state = register_reducer(ours, "exact")
    _train(default, None, 0, steps)
    _train(ours, state, 0, steps)
    return {"default": full(default.parameters()), "exact": full(ours.parameters()), "stats": state.stats}


def methods_vs_reducer(names: list[str], steps: int = 3, reshard: bool = True,
                       reduce_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """For each method, each step: the averaged gradients FSDP leaves (gathered), and this
    project's reducer run on an unsharded copy's gradients (cast to ``reduce_dtype`` and back,
    as FSDP casts them), one reducer per FSDP unit; and the
    conservation identity of error feedback per unit (sum over ranks of g + m_before minus
    P avg + sum of m_after, largest absolute difference)."""
    me, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name in names:
        options = DETERMINISTIC.get(name, {})
        plain = make_model()
        model = shard(copy.deepcopy(plain), reshard, MixedPrecisionPolicy(reduce_dtype=reduce_dtype))
        state = register_reducer(model, name, density=DENSITY, seed=0, **options)
        refs = {unit: reducers.build(name, density=DENSITY, seed=0, **options) for unit in units(plain)}
        got, want, gap = [], [], 0.0
        for t in range(steps):
            before = {u: [m.clone() for m in rs.reducer.residual] if rs.reducer else [] for u, rs in state.modules.items()}
            model.zero_grad()
            loss_of(model, me, t).backward()
            got.append(full(p.grad for p in model.parameters()))
            plain.zero_grad()
            loss_of(plain, me, t).backward()
            for unit, params in units(plain).items():
                grads = [p.grad if reduce_dtype is None else p.grad.to(reduce_dtype) for p in params]
                local = [g.clone() for g in grads]
                refs[unit].reduce(grads, out=grads)
                for p, g in zip(params, grads):
                    p.grad.copy_(g)
                reducer = state.modules[unit].reducer
                if reducer is not None and reducer.conserves and reducer.workspace.feedback.enabled:
                    gap = max(gap, _conservation_gap(local, before[unit], grads, reducer.residual, world))
            want.append(full(p.grad for p in plain.parameters()))
        out[name] = {"fsdp": got, "reducer": want, "conservation": gap, "density": state.stats["density"]}
    return out


def _conservation_gap(g: list[torch.Tensor], m_before: list[torch.Tensor], avg: list[torch.Tensor],
                      m_after: list[torch.Tensor], world: int) -> float:
    flat = lambda ts: torch.cat([t.reshape(-1).double() for t in ts])  # noqa: E731
    before = flat(g) + (flat(m_before) if m_before else 0.0)
    lhs = before.clone()
    dist.all_reduce(lhs)
    after = flat(m_after)
    dist.all_reduce(after)
    return float((lhs - (world * flat(avg) + after)).abs().max())


def every_method(names: list[str], steps: int = 3) -> dict[str, Any]:
    """Each method trains ``steps`` steps under fully_shard; its parameters after, or the error."""
    out = {}
    for name in names:
        try:
            model = shard(make_model())
            state = register_reducer(model, name, density=DENSITY, seed=0, **DETERMINISTIC.get(name, {}))
            _train(model, state, 0, steps)
            out[name] = {"params": full(model.parameters()), "error": None}
        except Exception as exc:  # reported to the test
            out[name] = {"params": None, "error": f"{type(exc).__name__}: {exc}"}
    return out


def train(name: str, steps: int, options: dict | None = None) -> torch.Tensor:
    model = shard(make_model())
    state = register_reducer(model, name, density=DENSITY, seed=0, **(options or {}))
    _train(model, state, 0, steps)
    return full(model.parameters())


def train_resumed(name: str, cut: int, total: int, options: dict | None = None) -> torch.Tensor:
    """Train ``cut`` steps, save this rank's parameter shards and reducer state (torch.save, then
    torch.load with weights_only=True), restore into a fresh sharded model (other initial
    weights) and a fresh registration, and train to ``total``. Plain SGD: the optimizer keeps
    no state."""
    model = shard(make_model())
    state = register_reducer(model, name, density=DENSITY, seed=0, **(options or {}))
    _train(model, state, 0, cut)
    buf = io.BytesIO()
    torch.save({"shards": [p.to_local().clone() for p in model.parameters()], "reducer": state.state_dict()}, buf)
    del model, state
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model = shard(make_model(seed=99))
    with torch.no_grad():
        for p, s in zip(model.parameters(), saved["shards"], strict=True):
            p.to_local().copy_(s)
    state = register_reducer(model, name, density=DENSITY, seed=0, **(options or {}))
    state.load_state_dict(saved["reducer"])
    _train(model, state, cut, total)
    return full(model.parameters())


def routed_vs_unrouted(names: list[str], steps: int = 3, density: float = DENSITY, lr: float = LR) -> dict[str, Any]:
    """For each method, two registrations on the same model, ``route=True`` and ``route=False``,
    trained side by side: per step, this rank's gradient shards, each unit's residual, each
    unit's stats (bytes, routed, counts) and method state. ``lr`` 0: the parameters stay, so
    both see the same gradients every step even where their averages differ by rounding."""
    me = dist.get_rank()
    out = {}
    for name in names:
        options = DETERMINISTIC.get(name, {})
        runs = {}
        for route in (True, False):
            model = shard(make_model())
            state = register_reducer(model, name, density=density, seed=0, route=route, **options)
            runs[route] = (model, state, torch.optim.SGD(model.parameters(), lr=lr))
        got: dict[bool, dict[str, list]] = {route: {"shards": [], "residuals": [], "stats": [], "state": [],
                                                    "methods": []} for route in (True, False)}
        for t in range(steps):
            for route, (model, state, opt) in runs.items():
                opt.zero_grad()
                loss_of(model, me, t).backward()
                got[route]["shards"].append([p.grad.to_local().clone() for p in model.parameters()])
                got[route]["residuals"].append({u: [m.clone() for m in rs.reducer.residual]
                                                for u, rs in state.modules.items()})
                got[route]["stats"].append({u: {**rs.reducer.stats, "d": rs.numel,
                                                "owned": rs.owners.numel(me)} for u, rs in state.modules.items()})
                got[route]["state"].append(state.stats)
                got[route]["methods"].append({u: rs.reducer.state_dict()["method_state"]
                                              for u, rs in state.modules.items()})
                opt.step()
        out[name] = got
    return out


# ------------------------------------------------------------------------ what must fail
def hsdp() -> dict[str, Any]:
    model = shard(make_model(), mesh_shape=(1, dist.get_world_size()))
    return outcome_in_step(lambda: register_reducer(model, "topk", density=DENSITY))


def shard_dim_1() -> dict[str, Any]:
    from torch.distributed.tensor import Shard
    model = shard(make_model(), shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 else Shard(0))
    return outcome_in_step(lambda: register_reducer(model, "topk", density=DENSITY))


def divide_factor() -> dict[str, Any]:
    model = shard(make_model())
    register_reducer(model, "topk", density=DENSITY)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(7.0)
    return outcome_in_step(lambda: loss_of(model, dist.get_rank(), 0).backward())


def foreign_states() -> dict[str, Any]:
    """Load rank 0's state on every rank, and a state of another model (one FSDP unit fewer)."""
    model = shard(make_model())
    state = register_reducer(model, "exdyna", density=DENSITY)
    _train(model, state, 0, 2)
    saved = [state.state_dict()]
    dist.broadcast_object_list(saved, src=0)
    other = make_model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    fully_shard(other[0], mesh=mesh)
    fully_shard(other, mesh=mesh)
    other_state = register_reducer(other, "exdyna", density=DENSITY)
    errors = {}
    for what, target, source in (("rank", state, saved[0]), ("model", other_state, state.state_dict())):
        try:
            target.load_state_dict(source)
            errors[what] = None
        except ValueError as exc:
            errors[what] = str(exc)
    return errors


def nonfinite(policy: str, steps: int = 3) -> dict[str, Any]:
    """A NaN loss on rank 1 at step 1: ``skip`` zeroes that step's gradients on every rank and
    says so in ``state.skipped``; ``raise`` raises on every rank."""
    me = dist.get_rank()
    model = shard(make_model())
    state = register_reducer(model, "exdyna", density=DENSITY, nonfinite=policy)
    seen = []

    def run() -> None:
        for t in range(steps):
            model.zero_grad()
            loss = loss_of(model, me, t)
            (loss * float("nan") if (me, t) == (1, 1) else loss).backward()
            seen.append({"skipped": state.skipped, "zero": not full(p.grad for p in model.parameters()).any()})

    return {**outcome_in_step(run), "steps": seen}


def held_between_backwards(name: str, options: dict | None = None, steps: int = 2) -> dict[str, Any]:
    """After ``steps`` backward passes: each unit's residual dtype, the residuals' bytes, the
    unsharded gradients' bytes (float32), and whether any reducer kept its spare buffer for
    ``x`` or a workspace buffer."""
    model = shard(make_model())
    state = register_reducer(model, name, density=DENSITY, seed=0, **(options or {}))
    _train(model, state, 0, steps)
    found = [rs.reducer for rs in state.modules.values() if rs.reducer is not None]
    return {"dtypes": sorted({str(m.dtype) for r in found for m in r.residual}),
            "residual_bytes": state.residual_bytes(),
            "gradient_bytes": sum(rs.numel for rs in state.modules.values()) * 4,
            "kept": any(r.workspace.feedback._x is not None or r.workspace.buffers for r in found)}
