"""The workers a training process runs: itself as one rank of a job, or W virtual workers.

Both give the training loop the same calls: each held worker's batches, its forward and
backward, the reduce that leaves the average in the model's flat gradient, and each held
worker's state for its checkpoint file. With :class:`VirtualWorkers`, W logical workers
share one model replica (every one sees the same parameters) and train one after another,
each with its own shard, batch, reducer and residual, dropout stream and normalisation
statistics (what a real worker keeps to itself), exchanging through one
:class:`~sparsecomm.reducers.comm.virtual.VirtualWorld`; the results are those of W processes,
bit for bit.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import reducers
from ..config import ConfigError
from ..reducers.comm.virtual import VirtualWorld
from ..units import si

__all__ = ["ProcessWorker", "VirtualWorkers", "memory_estimate", "kept_bytes", "available_memory",
           "bound_allocator_if_tight", "bound_host_allocator", "fits_in_memory", "rng_state", "set_rng_state"]

log = logging.getLogger(__name__)

_RANK_SEED = 7919  # worker r's dropout stream starts from seed + 7919 (r + 1)


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seeded_state(seed: int, rank: int, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(seed + _RANK_SEED * (rank + 1))
    return rng_state(device)


class ProcessWorker:
    """This process is one worker (rank ``job.rank`` of ``job.world``)."""

    def __init__(self, cfg: Any, job: Any, task: Any, params: list[torch.nn.Parameter],
                 grads: list[torch.Tensor], build_reducer: Callable[[Any], reducers.Reducer]) -> None:
        self.job, self.task, self.grads = job, task, grads
        self.count = job.world
        self.reducer = build_reducer(None)
        set_rng_state(_seeded_state(cfg.seed, job.rank, job.device), job.device)

    def steps_per_epoch(self) -> int:
        return self.task.steps_per_epoch()

    def attach(self, model: torch.nn.Module) -> None:
        self.reducer.attach(model)

    def begin_epoch(self, epoch: int, lr: float, epochs: float) -> None:
        self.task.begin_epoch(epoch)
        self.reducer.begin_epoch(epoch, lr, epochs)

    def batches(self, epoch: int, start: int) -> Iterator[list[Any]]:
        for batch in self.task.batches(epoch, start):
            yield [batch]

    def backward(self, model: torch.nn.Module, batches: list[Any], flat_grad: torch.Tensor,
                 sync: Callable[[], None]) -> tuple[torch.Tensor, int, float, float]:
        """Forward and backward of each held worker: (summed loss, workers, rank 0's forward and
        backward seconds)."""
        self._zero_grads(model, flat_grad)
        sync()
        t0 = time.perf_counter()
        loss = self.task.loss(model, batches[0])
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        return loss.detach(), 1, t1 - t0, time.perf_counter() - t1

    def _zero_grads(self, model: torch.nn.Module, flat_grad: torch.Tensor) -> None:
        flat_grad.zero_()

    def reduce(self, flat_grad: torch.Tensor) -> None:
        self.reducer.reduce(self.grads, out=self.grads)

    def state(self) -> list[dict[str, Any]]:
        """What this process's checkpoint file keeps for its worker."""
        return [{"reducer": self.reducer.state_dict(), "task": self.task.state_dict(),
                 "rng": rng_state(self.job.device)}]

    def load_state(self, states: list[dict[str, Any]]) -> None:
        [state] = states
        self.reducer.load_state_dict(state["reducer"])
        self.task.load_state_dict(state["task"])
        set_rng_state(state["rng"], self.job.device)

    def describe(self) -> dict[str, Any]:
        return self.reducer.describe()


class VirtualWorkers:
    """``job.virtual`` logical workers in this process, one after another on one model."""

    def __init__(self, cfg: Any, job: Any, task: Any, model: torch.nn.Module, params: list[torch.nn.Parameter],
                 grads: list[torch.Tensor], build_reducer: Callable[[Any], reducers.Reducer]) -> None:
        W = job.virtual
        self.job, self.count = job, W
        d = sum(p.numel() for p in params)
        dtype = params[0].dtype if params else torch.float32
        need = memory_estimate(grads, build_reducer, W)
        have = available_memory(job.device)
        if not fits_in_memory(need, have, 0.9):
            raise ConfigError(f"--virtual-workers {W}: {cfg.model} ({d:,} {str(dtype).replace('torch.', '')} "
                              f"parameters) needs about {si(need, 'B')} for {W} workers' gradients, residuals and "
                              f"reducer buffers; {si(have, 'B')} of {'GPU ' if job.device.type == 'cuda' else ''}"
                              f"memory is available")
        log.info("%d virtual workers: about %s of memory for their gradients, residuals and buffers (%s available)",
                 W, si(need, "B"), "?" if have is None else si(have, "B"))
        if not bound_allocator_if_tight(need, have, job.device, 0.9) and job.device.type == "cpu":
            log.info("the host allocator is left as it is: its heap may fragment and hold up to about %s "
                     "(%dx the estimate), which fits", si(need * _ALLOCATOR_SLACK, "B"), _ALLOCATOR_SLACK)
        self.tasks = [task.worker(r, W) for r in range(W)]
        self.world = VirtualWorld(W)
        self.reducers = [build_reducer(self.world.communicator(r)) for r in range(W)]
        self.reducer = self.reducers[0]
        layout = reducers.Layout.of(grads)
        self._flat = [torch.zeros(d, dtype=dtype, device=job.device) for _ in range(W)]
        self._grads = [layout.split(flat) for flat in self._flat]
        self._rng = [_seeded_state(cfg.seed, r, job.device) for r in range(W)]
        self._model_buffers = list(model.buffers())
        self._buffers = [[b.clone() for b in self._model_buffers] for _ in range(W)] if self._model_buffers else []
        self._params = params
        self._hooks: list[dict[int, list[Callable]]] = [{} for _ in range(W)]
        self._hooked: set[int] = set()
        self._active: int | None = None

    def steps_per_epoch(self) -> int:
        return self.tasks[0].steps_per_epoch()

    def attach(self, model: torch.nn.Module) -> None:
        """Each worker's reducer sees the model through a view whose parameter hooks fire only
        during that worker's backward."""
        views = [_WorkerModel(model, self, r) for r in range(self.count)]
        self.world.run(lambda r: self.reducers[r].attach(views[r]))

    def begin_epoch(self, epoch: int, lr: float, epochs: float) -> None:
        for task in self.tasks:
            task.begin_epoch(epoch)
        self.world.run(lambda r: self.reducers[r].begin_epoch(epoch, lr, epochs))

    def batches(self, epoch: int, start: int) -> Iterator[list[Any]]:
        for batches in zip(*(task.batches(epoch, start) for task in self.tasks)):
            yield list(batches)

    def backward(self, model: torch.nn.Module, batches: list[Any], flat_grad: torch.Tensor,
                 sync: Callable[[], None]) -> tuple[torch.Tensor, int, float, float]:
        device = self.job.device
        total = torch.zeros((), dtype=torch.float64, device=device)
        times = (0.0, 0.0)
        for r, batch in enumerate(batches):
            set_rng_state(self._rng[r], device)
            if self._buffers:
                torch._foreach_copy_(self._model_buffers, self._buffers[r])
            self._active = r
            try:
                flat_grad.zero_()
                sync()
                t0 = time.perf_counter()
                loss = self.tasks[r].loss(model, batch)
                sync()
                t1 = time.perf_counter()
                loss.backward()
                sync()
                t2 = time.perf_counter()
            finally:
                self._active = None
            self._flat[r].copy_(flat_grad)
            self._rng[r] = rng_state(device)
            if self._buffers:
                torch._foreach_copy_(self._buffers[r], self._model_buffers)
            total += loss.detach()
            if r == 0:
                times = (t1 - t0, t2 - t1)
        if self._buffers:  # the model keeps worker 0's statistics, as rank 0's model would
            torch._foreach_copy_(self._model_buffers, self._buffers[0])
        return total, len(batches), times[0], times[1]

    def reduce(self, flat_grad: torch.Tensor) -> None:
        self.world.run(lambda r: self.reducers[r].reduce(self._grads[r], out=self._grads[r]))
        flat_grad.copy_(self._flat[0])  # every worker's average is the same

    def state(self) -> list[dict[str, Any]]:
        """What worker r's checkpoint file keeps, for every r."""
        return [{"reducer": self.reducers[r].state_dict(), "task": self.tasks[r].state_dict(), "rng": self._rng[r]}
                for r in range(self.count)]

    def load_state(self, states: list[dict[str, Any]]) -> None:
        """Restore every worker; normalisation statistics restart from the saved model's, as
        every rank of a real job restarts from rank 0's model."""
        for r, state in enumerate(states):
            self.reducers[r].load_state_dict(state["reducer"])
            self.tasks[r].load_state_dict(state["task"])
            self._rng[r] = state["rng"]
        for saved in self._buffers:
            torch._foreach_copy_(saved, self._model_buffers)

    def describe(self) -> dict[str, Any]:
        return self.reducer.describe()

    # ------------------------------------------------------------ parameter hooks per worker
    def _register(self, rank: int, number: int, hook: Callable) -> Any:
        self._hooks[rank].setdefault(number, []).append(hook)
        if number not in self._hooked:
            self._hooked.add(number)
            self._params[number].register_post_accumulate_grad_hook(functools.partial(self._dispatch, number))
        return None

    def _dispatch(self, number: int, param: torch.Tensor) -> None:
        if self._active is not None:
            for hook in self._hooks[self._active].get(number, ()):
                hook(param)


class _WorkerModel:
    """The model as one virtual worker's reducer sees it in ``attach``: its parameters'
    post-accumulate-grad hooks are that worker's alone; everything else is the model's."""

    def __init__(self, model: torch.nn.Module, workers: VirtualWorkers, rank: int) -> None:
        self._model, self._workers, self._rank = model, workers, rank

    def parameters(self, recurse: bool = True) -> Iterator[Any]:
        for name, p in self.named_parameters(recurse=recurse):
            yield p

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, Any]]:
        numbers = {id(p): i for i, p in enumerate(self._workers._params)}
        for name, p in self._model.named_parameters(*args, **kwargs):
            yield name, (_WorkerParameter(p, self._workers, self._rank, numbers[id(p)]) if id(p) in numbers else p)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


class _WorkerParameter:
    """A parameter as one virtual worker sees it: hooks registered on it are that worker's."""

    def __init__(self, param: torch.nn.Parameter, workers: VirtualWorkers, rank: int, number: int) -> None:
        self._param, self._workers, self._rank, self._number = param, workers, rank, number

    def register_post_accumulate_grad_hook(self, hook: Callable) -> None:
        self._workers._register(self._rank, self._number, hook)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._param, name)


# ------------------------------------------------------------------------------- memory
def memory_estimate(grads: list[torch.Tensor], build_reducer: Callable[[Any], reducers.Reducer], workers: int,
                    gradients_held: bool = True) -> int:
    """Bytes that ``workers`` virtual workers keep: each a copy of the gradient (unless
    ``gradients_held`` is false: the caller reads them from elsewhere, e.g. a memory-mapped
    file) and what its reducer keeps between steps (residual, spare and scratch buffers, method
    state), measured on one reducer that reduces zeros of the gradients' layout once, alone."""
    probe = build_reducer(reducers.SoloCommunicator())
    layout = reducers.Layout.of(grads)
    zeros = layout.split(torch.zeros(layout.numel, dtype=layout.dtype, device=layout.device))
    probe.reduce(zeros, out=zeros)  # as the loop reduces: views of one flat buffer, in place
    gradient = sum(g.numel() * g.element_size() for g in grads) if gradients_held else 0
    return workers * (gradient + kept_bytes(probe))


_MMAP_THRESHOLD = 1 << 20  # bytes: blocks from this size up are mapped alone and unmapped when freed
_ALLOCATOR_SLACK = 4       # how far glibc's default heap can grow past the live bytes here (see below)
_bounded = False


def fits_in_memory(need: int, have: int | None, share: float) -> bool:
    """Whether ``need`` bytes fit in ``share`` of ``have`` (unknown ``have``: assumed to fit)."""
    return have is None or need <= share * have


def bound_allocator_if_tight(need: int, have: int | None, device: torch.device, share: float) -> bool:
    """Bound the host allocator (:func:`bound_host_allocator`) when ``need`` bytes on the host
    could, with the default allocator's fragmentation, outgrow ``share`` of ``have``. Returns
    whether it is bounded (now or by an earlier call)."""
    if device.type == "cpu" and have is not None and need * _ALLOCATOR_SLACK > share * have:
        return bound_host_allocator()
    return _bounded


def bound_host_allocator() -> bool:
    """Have glibc's malloc map every block of 1 MiB or more on its own and return it to the
    system when freed (``mallopt(M_MMAP_THRESHOLD, 1 MiB)``, which also stops glibc raising
    that threshold by itself). Returns whether the allocator is bounded (False off glibc).

    Why: W virtual workers free and reallocate gradient-sized temporaries in W threads one
    after another. With glibc's default, which after the first free serves blocks of up to
    32 MiB from the heap, the heap fragmented and the process's resident memory rose far past
    the live bytes: the MNIST CNN with top-k at 64 workers held 2.0 GB against 1.2 GB live, and
    at 256 workers SAGE was killed at 17.6 GB against 4.9 GB live. Bounded, both stay within 2%
    of :func:`memory_estimate` (tests/test_virtual.py). The price is a page fault per page of
    each large temporary: a worker's host time rose by up to 1.3 to 1.5 times for top-k at
    32 workers here, so it is applied only when memory would be tight, and logged."""
    global _bounded
    if _bounded:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        ok = bool(name and "libc.so" in name and hasattr(libc, "mallopt") and libc.mallopt(-3, _MMAP_THRESHOLD))
    except OSError:
        ok = False
    if ok:
        _bounded = True
        log.info("memory is tight for the virtual workers: blocks of %d KiB or more are now mapped alone and "
                 "returned to the system when freed (glibc's M_MMAP_THRESHOLD); large temporaries cost page faults",
                 _MMAP_THRESHOLD >> 10)
    else:
        log.warning("memory is tight for the virtual workers and this C library's allocator cannot be bounded; "
                    "its heap may grow past the estimate")
    return ok


def kept_bytes(obj: Any) -> int:
    """Bytes of the tensor storages reachable from ``obj`` through attributes, lists, tuples and
    dicts (each storage counted once; modules outside sparsecomm are not entered)."""
    seen_objects: set[int] = set()
    storages: dict[int, int] = {}
    todo = [obj]
    while todo:
        item = todo.pop()
        if id(item) in seen_objects:
            continue
        seen_objects.add(id(item))
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            todo.extend(item)
        elif type(item).__module__.startswith("sparsecomm") and hasattr(item, "__dict__"):
            todo.extend(vars(item).values())
    return sum(storages.values())


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on ``device``: the GPU's free memory, or the host's
    available memory (``MemAvailable``, lowered to the cgroup's limit when one is set);
    None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free if free is not None else int(limit), int(limit) - used)
    except (OSError, ValueError):
        pass
    if free is None and hasattr(os, "sysconf"):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            pass
    return free
