"""Functions the cluster's workers run for test_ddp.py: DDP models with the reducer hook next to
this project's own reducer and training loop, on the same model and the same data, in model
scope (the whole model at once) and in bucket scope (bucket by bucket, overlapped).

The model is a small MLP (6 tensors, 2,324 parameters); with ``BUCKET_MB`` DDP cuts it into one
bucket at the first iteration and two after its rebuild, so every scenario crosses both
bucketings. Batches are a pure function of (rank, step, micro-batch).
"""
from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_cluster import outcome_in_step
from sparsecomm import reducers
from sparsecomm.ddp import ReducerHookState, reducer_hook

BUCKET_MB = 0.002  # 2 KB: one bucket at the first iteration, two after DDP's rebuild
DENSITY = 0.05
LR, MOMENTUM = 0.1, 0.9

# Options that make a method deterministic between two reducers of one process: OMGS and
# AGTF otherwise group layers by timings measured at their first step.
DETERMINISTIC = {"omgs": {"groups": [2, 4]}, "agtf": {"groups": [3, 3]}}


class WithSpare(nn.Module):
    """An MLP and a layer that forward never reaches (its gradient stays None, or zero under DDP)."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(12, 48), nn.Tanh(), nn.Linear(48, 32), nn.Tanh(), nn.Linear(32, 4))
        self.spare = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def make_model(seed: int = 0, spare: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return WithSpare() if spare else nn.Sequential(nn.Linear(12, 48), nn.Tanh(), nn.Linear(48, 32), nn.Tanh(),
                                                   nn.Linear(32, 4))


def batch(rank: int, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1_000 * rank + 10 * step + micro + 1)
    return torch.randn(16, 12, generator=gen), torch.randn(16, 4, generator=gen)


def loss_of(model: nn.Module, rank: int, step: int, micro: int = 0) -> torch.Tensor:
    x, y = batch(rank, step, micro)
    return nn.functional.mse_loss(model(x), y)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def hooked(model: nn.Module, name: str, options: dict | None = None, scope: str = "model",
           **ddp_kwargs: Any) -> tuple[DDP, ReducerHookState]:
    net = DDP(model, bucket_cap_mb=BUCKET_MB, **ddp_kwargs)
    state = ReducerHookState(name, density=DENSITY, seed=0, scope=scope, **(options or {}))
    net.register_comm_hook(state, reducer_hook)
    return net, state


def methods_vs_reducer(names: list[str], steps: int = 3) -> dict[str, Any]:
    """For each method: the gradients DDP with the hook leaves in model scope, and this
    project's reducer's average of the same local gradients (an un-wrapped copy of the model)
    in model order."""
    me = dist.get_rank()
    out = {}
    for name in names:
        options = DETERMINISTIC.get(name, {})
        model = make_model()
        plain = copy.deepcopy(model)
        net, state = hooked(model, name, options)
        reducer = reducers.build(name, density=DENSITY, seed=0, **options)
        hook_avg, ref_avg = [], []
        for t in range(steps):
            net.zero_grad()
            loss_of(net, me, t).backward()
            hook_avg.append(flat(p.grad for p in model.parameters()))
            plain.zero_grad()
            loss_of(plain, me, t).backward()
            grads = [p.grad for p in plain.parameters()]
            reducer.reduce(grads, out=grads)
            ref_avg.append(flat(grads))
        out[name] = {"hook": hook_avg, "reducer": ref_avg, "density": state.stats["density"]}
    return out


def exact_vs_default(steps: int = 3) -> dict[str, list[torch.Tensor]]:
    """DDP's own all-reduce against the hook with ``exact``."""
    me = dist.get_rank()
    default = DDP(make_model(), bucket_cap_mb=BUCKET_MB)
    net, _ = hooked(make_model(), "exact")
    out: dict[str, list[torch.Tensor]] = {"default": [], "hook": []}
    for t in range(steps):
        for key, m in (("default", default), ("hook", net)):
            m.zero_grad()
            loss_of(m, me, t).backward()
            out[key].append(flat(p.grad for p in m.parameters()))
    return out


def train_loop(name: str, steps: int, options: dict | None = None, spare: bool = False) -> torch.Tensor:
    """This project's training step (sparsecomm.train.loop.Trainer._train_step, without the
    records): backward, reduce the parameters' gradients in place, SGD unless skipped."""
    me = dist.get_rank()
    model = make_model(spare=spare)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    reducer = reducers.build(name, density=DENSITY, seed=0, **(options or {}))
    for t in range(steps):
        opt.zero_grad(set_to_none=False)
        loss_of(model, me, t).backward()
        for p in params:
            if p.grad is None:  # a parameter this batch did not reach: its gradient is zero
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        reducer.reduce(grads, out=grads)
        if not reducer.stat("skipped"):
            opt.step()
    return flat(model.parameters())


def _hook_steps(net: DDP, state: ReducerHookState, opt: torch.optim.Optimizer, first: int, last: int) -> None:
    me = dist.get_rank()
    for t in range(first, last):
        opt.zero_grad()
        loss_of(net, me, t).backward()
        if not state.skipped:
            opt.step()


def train_hook(name: str, steps: int, options: dict | None = None, spare: bool = False, scope: str = "model",
               **ddp_kwargs: Any) -> torch.Tensor:
    """The same training with DDP and the hook; checks that the hook learned the parameter
    order of ``model.parameters()`` (the test models' shapes are all distinct)."""
    model = make_model(spare=spare)
    net, state = hooked(model, name, options, scope, **ddp_kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    _hook_steps(net, state, opt, 0, steps)
    learned = state.state_dict()["parameter_shapes"]
    assert learned == [list(p.shape) for p in model.parameters()], f"hook learned the order {learned}"
    return flat(model.parameters())


def train_hook_resumed(name: str, cut: int, total: int, options: dict | None = None,
                       scope: str = "model") -> torch.Tensor:
    """Train ``cut`` steps with the hook, save model, optimizer and hook state (torch.save, then
    torch.load with weights_only=True), restore into a fresh model (other initial weights), a
    fresh DDP (whose first backward has DDP's first bucketing again) and a fresh hook state,
    and train to ``total``."""
    model = make_model()
    net, state = hooked(model, name, options, scope)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    _hook_steps(net, state, opt, 0, cut)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()}, buf)
    del net, state, opt, model
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model = make_model(seed=99)
    model.load_state_dict(saved["model"])
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    opt.load_state_dict(saved["opt"])
    net, state = hooked(model, name, options, scope)
    state.load_state_dict(saved["hook"])
    _hook_steps(net, state, opt, cut, total)
    return flat(model.parameters())


def no_sync_vs_reducer(name: str, steps: int = 3, micro: int = 2, scope: str = "model") -> dict[str, list[torch.Tensor]]:
    """Gradient accumulation: ``micro`` backward passes, all but the last under ``no_sync()``,
    against this project's reducer fed the accumulated gradients."""
    me = dist.get_rank()
    model = make_model()
    plain = copy.deepcopy(model)
    net, _ = hooked(model, name, scope=scope)
    reducer = reducers.build(name, density=DENSITY, seed=0)
    out: dict[str, list[torch.Tensor]] = {"hook": [], "reducer": []}
    for t in range(steps):
        net.zero_grad()
        with net.no_sync():
            for m in range(micro - 1):
                loss_of(net, me, t, m).backward()
        loss_of(net, me, t, micro - 1).backward()
        out["hook"].append(flat(p.grad for p in model.parameters()))
        plain.zero_grad()
        for m in range(micro):
            loss_of(plain, me, t, m).backward()
        grads = [p.grad for p in plain.parameters()]
        reducer.reduce(grads, out=grads)
        out["reducer"].append(flat(grads))
    return out


# ------------------------------------------------------------------------ what must fail
def nonfinite(policy: str, steps: int = 3, name: str = "exdyna", scope: str = "model") -> dict[str, Any]:
    """A NaN loss on rank 1 at step 1: ``skip`` zeroes that step's gradients on every rank and
    says so in ``state.skipped``; ``raise`` raises on every rank."""
    me = dist.get_rank()
    model = make_model()
    net, state = hooked(model, name, {"nonfinite": policy}, scope)
    seen = []

    def run() -> None:
        for t in range(steps):
            net.zero_grad()
            loss = loss_of(net, me, t)
            (loss * float("nan") if (me, t) == (1, 1) else loss).backward()
            seen.append({"skipped": state.skipped, "zero": all(not p.grad.any() for p in model.parameters())})

    return {**outcome_in_step(run), "steps": seen}


def sparse_gradients() -> dict[str, Any]:
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(12, 2))
    net, _ = hooked(model, "exdyna")
    return outcome_in_step(lambda: net(torch.tensor([[1, 2, 3]])).sum().backward())


class _TwoDtypes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(12, 4), nn.Linear(4, 4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).double())


def mixed_dtypes() -> dict[str, Any]:
    net, _ = hooked(_TwoDtypes(), "topk")
    return outcome_in_step(lambda: net(torch.randn(2, 12)).sum().backward())


def other_model(ranks: list[int], name: str = "exdyna", scope: str = "model") -> dict[str, Any]:
    """One hook state on model A for two steps; then ``ranks`` move it to model B (same shapes,
    never seen by the state) while the other ranks stay on A."""
    me = dist.get_rank()
    a = make_model()
    net_a, state = hooked(a, name, scope=scope)
    for t in range(2):
        loss_of(net_a, me, t).backward()
    net_b = DDP(make_model(), bucket_cap_mb=BUCKET_MB)  # every rank builds B (DDP's constructor is a collective)
    net_b.register_comm_hook(state, reducer_hook)
    net = net_b if me in ranks else net_a
    return outcome_in_step(lambda: loss_of(net, me, 2).backward())


# ------------------------------------------------------------------------- bucket scope
def buckets_vs_references(names: list[str], steps: int = 3) -> dict[str, Any]:
    """For each method in bucket scope, with ``find_unused_parameters`` (DDP's first buckets,
    several, are kept: no rebuild): per step, the averages the hook leaves, this worker's local
    gradients (an un-wrapped copy of the model), its residuals by parameter, and the average of
    a reducer of the method built here for each bucket (the bucket's seed) and fed that
    bucket's local gradients; and the buckets (positions, seed, describe)."""
    me = dist.get_rank()
    out = {}
    for name in names:
        model = make_model()
        plain = copy.deepcopy(model)
        net, state = hooked(model, name, scope="bucket", find_unused_parameters=True)
        own: dict[tuple[int, ...], reducers.Reducer] = {}
        record: dict[str, Any] = {"hook": [], "local": [], "residual": [], "own": []}
        for t in range(steps):
            net.zero_grad()
            loss_of(net, me, t).backward()
            record["hook"].append(flat(p.grad for p in model.parameters()))
            plain.zero_grad()
            loss_of(plain, me, t).backward()
            local = [p.grad.clone() for p in plain.parameters()]
            record["local"].append(flat(local))
            record["residual"].append(flat(state.engine.residual) if state.engine.residual else None)
            mine = flat(local).clone() * 0
            offsets = [0]
            for g in local:
                offsets.append(offsets[-1] + g.numel())
            for positions, reducer in state.engine.last_units:
                if positions not in own:
                    own[positions] = reducers.build(name, density=DENSITY, seed=reducer.seed)
                grads = [local[p].clone() for p in positions]
                own[positions].reduce(grads, out=grads)
                for p, g in zip(positions, grads):
                    mine[offsets[p]:offsets[p + 1]] = g.reshape(-1)
            record["own"].append(mine)
        record["buckets"] = [{"positions": list(positions), "seed": reducer.seed, "describe": reducer.describe()}
                             for positions, reducer in state.engine.last_units]
        record["shapes"] = [list(p.shape) for p in model.parameters()]
        record["scope"] = state.scope
        out[name] = record
    return out


def bucket_vs_model(names: list[str], steps: int = 4, **ddp_kwargs: Any) -> dict[str, Any]:
    """Each method's averages in bucket scope and in model scope, step by step, across DDP's
    rebuild of its buckets after the first iteration."""
    me = dist.get_rank()
    out = {}
    for name in names:
        got: dict[str, Any] = {}
        for scope in ("bucket", "model"):
            model = make_model()
            net, state = hooked(model, name, scope=scope, **ddp_kwargs)
            avgs = []
            for t in range(steps):
                net.zero_grad()
                loss_of(net, me, t).backward()
                avgs.append(flat(p.grad for p in model.parameters()))
            got[scope] = avgs
            got[scope + "_units"] = [positions for positions, _ in state.engine.last_units]
        out[name] = got
    return out


def auto_scope_training(names: list[str], steps: int = 20) -> dict[str, Any]:
    """Each method trains ``steps`` SGD steps in its auto scope; at the last step the inputs of
    the conservation identity: this worker's x = g + m (g from an un-wrapped copy of the model
    at the same weights), its new residual and the average."""
    me = dist.get_rank()
    out = {}
    for name in names:
        model = make_model()
        net, state = hooked(model, name, scope="auto")
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.0 if name == "dgc" else MOMENTUM)
        state.begin_epoch(0, LR, 1.0)
        for t in range(steps - 1):
            opt.zero_grad()
            loss_of(net, me, t).backward()
            if not state.skipped:
                opt.step()
        plain = copy.deepcopy(model)
        plain.zero_grad()
        loss_of(plain, me, steps - 1).backward()
        before = state.engine.residual
        g = flat(p.grad for p in plain.parameters())
        x = g + flat(before) if before else g
        opt.zero_grad()
        loss_of(net, me, steps - 1).backward()
        avg = flat(p.grad for p in model.parameters())
        after = state.engine.residual
        out[name] = {"scope": state.scope, "params": flat(model.parameters()), "x": x, "avg": avg,
                     "residual": flat(after) if after else torch.zeros_like(x),
                     "conserves": state.engine.conserves, "density": state.stats["density"],
                     "buckets": len(state.engine.last_units)}
    return out


def wrong_rank_state(how: str) -> dict[str, Any]:
    """Every rank trains 2 steps and saves its hook state; then every rank loads rank 0's into a
    fresh state, by ``load_state_dict`` (``how="load"``: a collective, refused on every rank at
    once) or by unpickling rank 0's state (``how="pickle"``: no collective; refused on every
    rank at the next step's first bucket). Then one more backward."""
    me = dist.get_rank()
    model = make_model()
    net, state = hooked(model, "topk", scope="bucket")
    for t in range(2):
        loss_of(net, me, t).backward()
    saved = state.state_dict()
    pickled = pickle.dumps(state)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (saved, pickled))
    net2 = DDP(make_model(), bucket_cap_mb=BUCKET_MB)
    phases: dict[str, Any] = {}

    def load() -> None:
        if how == "load":
            fresh = ReducerHookState("topk", density=DENSITY, seed=0, scope="bucket")
            fresh.load_state_dict(everyone[0][0])
        else:
            fresh = pickle.loads(everyone[0][1])
        net2.register_comm_hook(fresh, reducer_hook)
        phases["loaded"] = True
        loss_of(net2, me, 2).backward()

    return {**outcome_in_step(load), **phases}
