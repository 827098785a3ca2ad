"""This process as one rank of a sharded job (``parallel=fsdp``): the model split with FSDP2's
``fully_shard`` (:func:`sparsecomm.fsdp.shard_children`), the run's method as the reduce-scatter
of every unit (:func:`sparsecomm.fsdp.register_reducer`), and this rank's shards of the model
and optimizer in its own checkpoint file.

:class:`ShardedWorker` gives the training loop the calls of
:class:`~sparsecomm.train.workers.ProcessWorker`; the reduce happens inside backward, so its
``reduce`` does nothing, and the loop reads the method's measurements from
:class:`ShardedReducer`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .. import reducers
from ..fsdp import FSDPReducerState, register_reducer, shard_children
from .workers import ProcessWorker

__all__ = ["ShardedWorker", "ShardedReducer", "shard_model", "local_shards", "load_model_shards",
           "load_optimizer_shards"]


def shard_model(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """``model`` as FSDP units over a 1-D mesh of every rank: one unit per child (tied weights
    stay with the root)."""
    from torch.distributed.device_mesh import init_device_mesh

    return shard_children(model, mesh=init_device_mesh(device.type, (world,)))


class ShardedReducer:
    """The run's method over every FSDP unit, as the training loop and
    :class:`~sparsecomm.train.workers.ProcessWorker` use a reducer: its name, options,
    ``stat``/``stats`` of the last backward, target density, epochs, state and description."""

    def __init__(self, state: FSDPReducerState, applies_momentum: bool) -> None:
        self.state = state
        self.name = state.method
        self.applies_momentum = applies_momentum

    def options(self) -> dict[str, Any]:
        return dict(self.state.options)

    @property
    def stats(self) -> dict[str, Any]:
        return self.state.stats

    def stat(self, key: str, default: Any = None) -> Any:
        return self.state.stat(key, default)

    @property
    def target_density(self) -> float:
        return float(self.state.stat("target_density", self.state.density))

    def attach(self, model: nn.Module) -> None:
        """Nothing: a method's own hooks (OMGS's and AGTF's overlap) are not set under FSDP."""

    def begin_epoch(self, epoch: int, lr: float, epochs: float) -> None:
        self.state.begin_epoch(epoch, lr, epochs)

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state)

    def describe(self) -> dict[str, Any]:
        return {"parallel": "fsdp", "units": {name: rs.numel for name, rs in self.state.modules.items()},
                **self.state.describe()}


class ShardedWorker(ProcessWorker):
    """This process is rank ``job.rank`` of ``job.world``, holding its shards of ``model``
    (already sharded with :func:`shard_model`); the method reduces inside backward."""

    def __init__(self, cfg: Any, job: Any, task: Any, model: nn.Module,
                 build_reducer: Callable[[Any], Any]) -> None:
        rc = cfg.reducer

        def sharded(group: Any) -> ShardedReducer:
            method = build_reducer(reducers.SoloCommunicator())  # checks the options; does it apply momentum?
            state = register_reducer(model, rc.name, density=rc.density, error_feedback=rc.error_feedback,
                                     seed=cfg.seed, sync_timing=cfg.records.profile, **rc.options)
            return ShardedReducer(state, method.applies_momentum)

        super().__init__(cfg, job, task, [], [], sharded)

    def _zero_grads(self, model: nn.Module, flat_grad: Any) -> None:
        model.zero_grad(set_to_none=True)  # FSDP accumulates into sharded gradients that exist

    def reduce(self, flat_grad: Any) -> None:
        """Nothing: the units were reduced inside backward."""

    @contextlib.contextmanager
    def whole_model(self, model: nn.Module) -> Iterator[None]:
        """Every unit's parameters gathered while the block runs (an evaluation whose ranks
        run different numbers of forward passes would otherwise wait in FSDP's all-gathers)."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        groups = [m._get_fsdp_state()._fsdp_param_group for m in units]
        resharding = [g is not None and g.post_forward_mesh_info is not None for g in groups]
        for m in units:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for m, reshard in zip(units, resharding):
                m.set_reshard_after_forward(reshard, recurse=False)
                m.reshard()


def local_shards(state: dict[str, Any]) -> dict[str, Any]:
    """A model's or optimizer's state dict with each DTensor as this rank's local shard."""
    from torch.distributed.tensor import DTensor

    def plain(value: Any) -> Any:
        if isinstance(value, DTensor):
            return value.to_local().detach().clone()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(state)


def load_model_shards(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Copy this rank's saved shards (and buffers) into ``model``'s parameters."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for key, value in model.state_dict().items():
            target = value.to_local() if isinstance(value, DTensor) else value
            target.copy_(saved[key])


def load_optimizer_shards(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load an optimizer state saved with :func:`local_shards`: each per-parameter tensor made a
    DTensor again, laid out like its parameter."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, values in saved["state"].items():
        p = params[int(index)]
        state[index] = {k: DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                        if isinstance(v, torch.Tensor) and isinstance(p, DTensor) and v.dim() > 0 else v
                        for k, v in values.items()}
    optimizer.load_state_dict({**saved, "state": state})
