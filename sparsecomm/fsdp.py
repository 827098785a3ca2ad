"""Any sparsecomm method as the reduce-scatter of FSDP2 (``torch.distributed.fsdp.fully_shard``).

    from sparsecomm.fsdp import register_reducer, shard_children
    shard_children(model, mesh)              # or fully_shard on each block, then on the model
    state = register_reducer(model, "exdyna", density=0.01)   # any method of reducers.available()
    ... train; state.stats, state.skipped; torch.save(state.state_dict(), f"reducers-{rank}.pt")

FSDP2 calls its reduce-scatter once per FSDP module (a parameter group: the parameters that
``fully_shard`` on that module manages and no inner ``fully_shard`` took) per backward, with
that module's unsharded gradients flattened into one input of ``world_size`` equal slices
(slice r: every parameter's dim-0 rows that rank r owns, padded to a multiple of the world
size) and this rank's slice as the output, op AVG (SUM around pre- and post-divisions for
float16 gradients). :func:`register_reducer` gives every FSDP module under the model its own
:class:`ModuleReduceScatter` and its own reducer, so each module's residual, thresholds and
method state are its own:

1. the input is read back into the module's gradients in parameter order with their true
   shapes (padding dropped), one flat vector of the module's ``d`` elements;
2. the module's reducer averages it over the ranks exactly as the project's training loop
   would, residual included (its collectives are the method's own: what travels is what the
   method sends, not a reduce-scatter);
3. this rank's rows of the average are written to the output (padding rows zero).

Every rank thus holds the shard of the same average the method computes, and the
conservation identity of error feedback holds per module.

Routing (``route=True``, the default; docs/reducers.md, *FSDP2*, *Routing to the owner*): each
module's reducer is told which rank owns which coordinates (:meth:`ModuleReduceScatter._owners`,
``Reducer.route_to``), and a method whose pairs travel by sparse gather-sum (topk,
global_topk, thresh, sage, legacy, accordion's gather-sum steps, dgc's compressed tensors;
default wire format) sends each pair only to its owner by one all-to-all (after an all-gather
of the per-owner counts), or all-gathers them where that moves no more bytes at the step's
counts; the quantisers (qsgd, terngrad, efsignsgd, signsgd) and the casts (fp16, bf16 with
``exchange="gather"``) send each owner only its part of their encoded rows (with the scales
it needs), one all-to-all per window, and the owner alone decodes it. The shard is bit for
bit the unrouted one. The methods whose values went by all-reduce at positions everyone
learns or knows (the union exchange of exdyna, micro, deft and of ``exchange="union"``;
randomk, cltk, gtopk) still share the positions but send each owner only its values there,
one all-to-all, summed by the owner in rank order: bit for bit the unrouted shard with 2
ranks, within float rounding with more (the all-reduce sums in gloo's order), residual and
method state as unrouted. The reducer's average is filled only in this rank's rows (the rest
left 0, never read), and for the sparse gather-sum its ``density`` is a lower bound
(``shard_density`` exact). The other methods ignore the owners: every rank receives their
whole average and keeps its rows. ``exact`` is FSDP's own
reduce-scatter (a sum over the process group, divided as FSDP asks), with no reducer.

What this costs and changes (docs/reducers.md, *FSDP2*): each rank keeps one unsharded
residual per module (the residual of error feedback is the full gradient's size, not the
shard's) and a flat buffer of the module's gradient during the call; methods that select over
the whole model (exdyna, micro, sage, global_topk, gtopk, cltk, deft, omgs, agtf) select over
each module's gradient, with the module's share of the density each. Not routed: omgs and
agtf (their pairs' all-gathers overlap backward), powersgd and fp16/bf16 with
``exchange="allreduce"`` (sums the backend forms over every coordinate), dgc's dense 1-d
tensors, accordion's dense step, and the sparse gather-sum in a wire format other than the
default.

Refused in one line at registration: modules with a 2-D mesh (HSDP) or a replicate mesh,
parameters sharded on a dimension other than 0, several parameter groups on one module.
Refused in one line at the first backward, on every rank before any collective: a reduce op
other than AVG and SUM (``PREMUL_SUM``: a gradient divide factor).
"""
from __future__ import annotations

import logging
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter

from . import reducers
from .reducers import Communicator, LayoutMismatchError, ProcessGroupCommunicator, Reducer
from .reducers.base import setting_differences
from .reducers.comm.exchange import Owners

__all__ = ["register_reducer", "shard_children", "FSDPReducerState", "ModuleReduceScatter", "STATE_FORMAT"]

log = logging.getLogger(__name__)

STATE_FORMAT = "sparsecomm.fsdp_reducer/1"

_SUMMED = ("bytes_sent", "bytes_wire", "t_select", "t_comm")
_WEIGHTED = ("density", "local_density", "target_density")


def register_reducer(model: nn.Module, method: str, density: float = 0.001, *, error_feedback: bool = True,
                     seed: int = 0, route: bool = True, **options: Any) -> "FSDPReducerState":
    """Make ``method`` the reduce-scatter of every FSDP module under ``model`` (``fully_shard``
    already applied); returns the state that holds their reducers. ``density``,
    ``error_feedback``, ``seed`` and ``options`` are those of :func:`sparsecomm.reducers.build`,
    checked here (bad values raise its ValueError), before any training. ``route``: send each
    selected pair only to the rank owning its shard, where the method can (the same shards
    bit for bit; False: every rank receives the whole average, as before).

    Memory: each module's reducer keeps its residual (one unsharded gradient of the module, in
    ``residual_dtype``: e.g. "bfloat16" for half of it, the rounding lost to error feedback)
    and method state between backward passes; its other buffers are dropped after every call
    (``keep_buffers`` is False here unless given: no value changes, one allocation per call)."""
    state = FSDPReducerState(method, density, error_feedback=error_feedback, seed=seed, route=route, **options)
    state._attach(model)
    return state


def shard_children(model: nn.Module, mesh: Any = None, **fsdp_options: Any) -> nn.Module:
    """``fully_shard`` on each direct child of ``model`` that holds parameters none of its
    siblings shares (tied weights stay with the root), then on ``model``: one FSDP unit per
    child, the root's unit holding the rest. A container without a forward of its own
    (``nn.ModuleList``, ``nn.ModuleDict``) is not a unit: its children are, by the same rule.
    ``mesh``: a 1-D device mesh (None: FSDP's default, the world on this device type);
    ``fsdp_options``: ``fully_shard``'s keywords."""
    from torch.distributed.fsdp import fully_shard

    for unit in _units(model):
        fully_shard(unit, mesh=mesh, **fsdp_options)
    fully_shard(model, mesh=mesh, **fsdp_options)
    return model


def _units(parent: nn.Module) -> list[nn.Module]:
    """The children of ``parent`` that can be FSDP units (see :func:`shard_children`)."""
    holders: dict[int, int] = {}
    for child in parent.children():
        for p in child.parameters():
            holders[id(p)] = holders.get(id(p), 0) + 1
    units = []
    for child in parent.children():
        params = list(child.parameters())
        if not params or any(holders[id(p)] > 1 for p in params):
            continue
        units += _units(child) if type(child).forward is nn.Module.forward else [child]
    return units


class ModuleReduceScatter(ReduceScatter):
    """The reduce-scatter of one FSDP module: its gradient through ``reducer`` (None: FSDP's
    own reduce-scatter, for ``exact``) over ``comm``, this rank's rows of the average kept.
    ``shapes``: the module's trainable parameters' shapes in FSDP's order."""

    def __init__(self, name: str, shapes: list[torch.Size], comm: Communicator, reducer: Reducer | None,
                 route: bool = True) -> None:
        self.name = name
        self.shapes = [torch.Size(s) for s in shapes]
        self.comm = comm
        self.reducer = reducer
        self.exact_stats: dict[str, Any] = {}
        world = comm.size
        self._rows = [-(-s[0] // world) for s in self.shapes]            # rows of each parameter per rank
        self._row_numel = [s[1:].numel() for s in self.shapes]
        self.shard_numel = sum(r * n for r, n in zip(self._rows, self._row_numel))
        self.numel = sum(s.numel() for s in self.shapes)
        self.owners = self._owners()
        if route and reducer is not None:
            reducer.route_to(self.owners)

    def _owners(self) -> Owners:
        """Which rank owns which coordinates of the module's flat gradient: per parameter,
        rank r its dim-0 rows ``[r rows, (r + 1) rows)`` (fewer, or none, past the end)."""
        world, ranges, at = self.comm.size, [], 0
        for shape, rows, row_numel in zip(self.shapes, self._rows, self._row_numel):
            for r in range(world):
                first, last = min(r * rows, shape[0]), min((r + 1) * rows, shape[0])
                ranges.append((at + first * row_numel, at + last * row_numel, r))
            at += shape.numel()
        return Owners(ranges, world)

    def allocate(self, size: Any, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: Any, async_op: bool = False) -> None:
        world = self.comm.size
        if op == dist.ReduceOp.AVG:
            scale = 1
        elif op == dist.ReduceOp.SUM:
            scale = world
        else:
            raise ValueError(f"sparsecomm.fsdp: module {self.name!r}: FSDP asks for reduce op {op}; a sparsecomm "
                             f"reduce-scatter serves AVG and SUM only (no gradient divide factor)")
        if input_tensor.numel() != world * self.shard_numel or output_tensor.numel() != self.shard_numel:
            raise LayoutMismatchError(
                f"sparsecomm.fsdp: module {self.name!r}: FSDP's reduce-scatter input has {input_tensor.numel()} "
                f"elements, not the {world} x {self.shard_numel} of its registered parameters {list(map(list, self.shapes))}")
        if self.reducer is None:
            self.comm.reset_counters()
            self.comm.reduce_scatter_(output_tensor, input_tensor)
            if scale == 1:
                output_tensor.div_(world)
            self.exact_stats = {"step": self.exact_stats.get("step", -1) + 1, "density": 1.0, "local_density": 1.0, "target_density": 1.0, "skipped": False,
                                "bytes_sent": self.comm.bytes_sent, "bytes_wire": self.comm.bytes_wire,
                                "residual_norm": 0.0}
            return None
        grads = self._unshard(input_tensor)
        self.reducer.reduce(grads, out=grads)
        self._keep_rows(grads, output_tensor)
        if scale != 1:
            output_tensor.mul_(scale)
        return None

    def _unshard(self, input_tensor: torch.Tensor) -> list[torch.Tensor]:
        """The module's gradients with their true shapes, as views of one new flat vector."""
        world = self.comm.size
        slices = input_tensor.view(world, self.shard_numel)
        flat = torch.empty(self.numel, dtype=input_tensor.dtype, device=input_tensor.device)
        grads, at, col = [], 0, 0
        for shape, rows, row_numel in zip(self.shapes, self._rows, self._row_numel):
            width, n = rows * row_numel, shape.numel()
            padded = slices[:, col:col + width].reshape(-1)
            flat[at:at + n].copy_(padded[:n])
            grads.append(flat[at:at + n].view(shape))
            at, col = at + n, col + width
        return grads

    def _keep_rows(self, grads: list[torch.Tensor], output_tensor: torch.Tensor) -> None:
        """Write this rank's rows of each averaged gradient into ``output_tensor``, zero past the
        end. Reads only this rank's rows (:attr:`owners`): a routing reducer fills no others."""
        rank = self.comm.rank
        col = 0
        for g, rows, row_numel in zip(grads, self._rows, self._row_numel):
            width = rows * row_numel
            first = min(rank * rows, g.shape[0])
            last = min(first + rows, g.shape[0])
            held = (last - first) * row_numel
            if held:
                output_tensor[col:col + held].copy_(g[first:last].reshape(-1))
            if held < width:
                output_tensor[col + held:col + width].zero_()
            col += width

    def stat(self, key: str, default: Any = None) -> Any:
        """One of the last call's measurements (the reducer's, or those of ``exact``)."""
        return self.exact_stats.get(key, default) if self.reducer is None else self.reducer.stat(key, default)


class FSDPReducerState:
    """The reduce-scatters :func:`register_reducer` set on a model's FSDP modules, by module
    name (``modules``: the qualified name under the model, ``"(root)"`` for the model), and
    what a training loop reads from them: ``stats`` and ``stat`` (the last backward's
    measurements, summed or size-weighted over modules), ``skipped`` (some module's
    ``nonfinite="skip"`` zeroed its gradient: skip the optimizer step), ``begin_epoch``,
    ``describe``, ``residual_bytes``, and ``state_dict`` / ``load_state_dict`` (this rank's
    residuals and method states, refusing another rank's, another method's or another
    model's)."""

    def __init__(self, method: str, density: float = 0.001, *, error_feedback: bool = True, seed: int = 0,
                 route: bool = True, **options: Any) -> None:
        if "group" in options:
            raise ValueError("register_reducer takes each module's process group from its FSDP mesh; drop group=")
        reducers.build(method, density=density, error_feedback=error_feedback, seed=seed,
                       group=reducers.SoloCommunicator(), **options)  # bad input fails here, not mid-backward
        self.method = method
        self.density = density
        self.error_feedback = error_feedback
        self.seed = seed
        self.route = bool(route)  # not a setting: a state saved routed resumes unrouted and back
        self.options = dict(options)
        self.modules: dict[str, ModuleReduceScatter] = {}
        self.rank = 0
        self.world_size = 1

    # ------------------------------------------------------------------ what users call
    @property
    def stats(self) -> dict[str, Any]:
        """The last backward's measurements over all modules: bytes and times summed, densities
        weighted by each module's size, ``residual_norm`` over all residuals, ``skipped`` if
        any module skipped, ``modules`` (how many reduced); where methods route their pairs to
        the shard's owner, ``shard_density`` (weighted by the coordinates each module's shard owns) and ``routed``
        (how many modules sent theirs by all-to-all); empty before the first backward."""
        if not self.stat("modules"):
            return {}
        out = {key: self.stat(key) for key in (*_SUMMED, *_WEIGHTED, "residual_norm", "skipped", "modules")}
        if self.stat("shard_density") is not None:
            out.update(shard_density=self.stat("shard_density"), routed=self.stat("routed"))
        return out

    def stat(self, key: str, default: Any = None) -> Any:
        """One of :attr:`stats`, computing only that one (``residual_norm`` costs a pass over
        every residual; the others are free)."""
        done = [rs for rs in self.modules.values() if rs.stat("step", None) is not None]
        if key == "modules":
            return len(done)
        if not done:
            return default
        if key in _SUMMED:
            return sum(rs.stat(key, 0.0) for rs in done)
        if key in _WEIGHTED:
            return sum(rs.numel * rs.stat(key, 0.0) for rs in done) / (sum(rs.numel for rs in done) or 1)
        if key == "residual_norm":
            return sum(float(rs.stat(key, 0.0)) ** 2 for rs in done) ** 0.5
        if key == "skipped":
            return any(rs.stat(key, False) for rs in done)
        if key in ("shard_density", "routed"):  # modules whose method routes its pairs (route_to)
            routing = [rs for rs in done if rs.stat("shard_density") is not None]
            if not routing:
                return default
            if key == "routed":  # how many of them sent their pairs by all-to-all this backward
                return sum(bool(rs.stat("routed", False)) for rs in routing)
            owned = [rs.owners.numel(rs.comm.rank) for rs in routing]
            return sum(n * rs.stat(key) for n, rs in zip(owned, routing)) / (sum(owned) or 1)
        return default

    @property
    def skipped(self) -> bool:
        return bool(self.stat("skipped", False))

    def begin_epoch(self, epoch: int, lr: float, epochs: float) -> None:
        """Pass the training context to every module's reducer (see ``Reducer.begin_epoch``)."""
        for rs in self.modules.values():
            if rs.reducer is not None:
                rs.reducer.begin_epoch(epoch, lr, epochs)

    def describe(self) -> dict[str, Any]:
        return {name: rs.reducer.describe() for name, rs in self.modules.items()
                if rs.reducer is not None and rs.reducer.describe()}

    def residual_bytes(self) -> int:
        """The bytes this rank's residuals hold (allocated after each module's first backward)."""
        return sum(t.numel() * t.element_size() for rs in self.modules.values()
                   if rs.reducer is not None and rs.reducer.workspace.feedback.enabled for t in rs.reducer.residual)

    def state_dict(self) -> dict[str, Any]:
        """This rank's reducer states (residuals included), by module, with the modules' shapes."""
        return {"format": STATE_FORMAT, **self._settings(), "rank": self.rank, "world_size": self.world_size,
                "modules": {name: {"shapes": [list(s) for s in rs.shapes],
                                   "reducer": None if rs.reducer is None else rs.reducer.state_dict()}
                            for name, rs in self.modules.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` of this rank, the same settings and the same model;
        takes effect at the next backward."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a sparsecomm FSDP reducer state (expected format {STATE_FORMAT!r})")
        wrong = setting_differences(state, {**self._settings(), "rank": self.rank, "world_size": self.world_size},
                                   "state")
        if wrong:
            raise ValueError("FSDP reducer state does not match this one (" + "; ".join(wrong) + ")")
        shapes = {name: [list(s) for s in rs.shapes] for name, rs in self.modules.items()}
        saved = {name: m.get("shapes") for name, m in state["modules"].items()}
        if saved != shapes:
            raise ValueError(f"FSDP reducer state is another model's: saved modules {_outline(saved)}, "
                             f"this model {_outline(shapes)}")
        for name, rs in self.modules.items():
            if rs.reducer is not None:
                rs.reducer.load_state_dict(state["modules"][name]["reducer"])

    def _settings(self) -> dict[str, Any]:
        return {"method": self.method, "density": self.density, "error_feedback": self.error_feedback,
                "seed": self.seed, "options": self.options}

    # ------------------------------------------------------------------ registration
    def _attach(self, model: nn.Module) -> None:
        found = [(name or "(root)", m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
        if not found:
            raise ValueError(f"register_reducer: no module of the {type(model).__name__} is an FSDP module "
                             f"(apply fully_shard first)")
        plans = [plan for plan in (_plan(name, m) for name, m in found) if plan is not None]
        for name, module, shapes, group in plans:
            comm = ProcessGroupCommunicator(group)
            reducer = None if self.method == "exact" else reducers.build(
                self.method, density=self.density, error_feedback=self.error_feedback, seed=self.seed,
                group=comm, **{"keep_buffers": False, **self.options})
            self.modules[name] = ModuleReduceScatter(name, shapes, comm, reducer, self.route)
            module.set_reduce_scatter_unused_params(True, recurse=False)  # every step, every parameter
            module.set_custom_reduce_scatter(self.modules[name])
            self.rank, self.world_size = comm.rank, comm.size
        log.debug("sparsecomm.fsdp: %s on %d FSDP modules", self.method, len(self.modules))


def _plan(name: str, module: FSDPModule) -> tuple[str, FSDPModule, list[torch.Size], Any] | None:
    """A module's trainable parameter shapes and reduce-scatter group, or None when it manages
    no parameters; raises for what a sparsecomm reduce-scatter cannot serve."""
    from torch.distributed.fsdp._fully_shard._fsdp_common import DDPMeshInfo, FSDPMeshInfo

    groups = module._get_fsdp_state()._fsdp_param_groups
    if not groups:
        return None
    if len(groups) > 1:
        raise ValueError(f"register_reducer: FSDP module {name!r} has {len(groups)} parameter groups (a per-parameter "
                         f"mesh); one reduce-scatter serves one group")
    group = groups[0]
    info = group.mesh_info
    if isinstance(info, DDPMeshInfo) or not isinstance(info, FSDPMeshInfo) or info.mesh.ndim != 1:
        raise ValueError(f"register_reducer: FSDP module {name!r} has a {info.mesh.ndim}-D mesh "
                         f"{tuple(info.mesh.shape)} ({type(info).__name__}); only a 1-D sharding mesh is supported "
                         f"(HSDP's replicate dimension would all-reduce outside the method)")
    params = [p for p in group.fsdp_params if p.sharded_param.requires_grad]
    bad = [p._param_fqn for p in params if p.fsdp_placement.dim != 0]
    if bad:
        raise ValueError(f"register_reducer: FSDP module {name!r} shards {bad} on a dimension other than 0; "
                         f"only Shard(0) is supported")
    if not params:
        return None
    return name, module, [p._orig_size for p in params], info.shard_process_group


def _outline(shapes: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{n}: {len(s or [])} tensors" for n, s in shapes.items()) + "}"
