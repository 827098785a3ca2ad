"""Joining the job's process group and choosing this process's device.

The launcher (``run.sh``, ``torchrun``, SLURM or MPI through ``run.sh``) exports the
torchrun variables ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; without ``WORLD_SIZE`` the process runs alone, with no process group. A
process alone may simulate W virtual workers (``join(virtual=W)``).
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .launcher import detect

__all__ = ["Job", "join", "leave", "lost_ranks", "multiprocess_launch", "virtual_conflict"]

log = logging.getLogger(__name__)


@dataclass
class Job:
    """This process's place in the job: rank, world size (processes), local rank and device;
    ``virtual``: the logical workers this one process simulates (0: it is one worker)."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    virtual: int = 0

    @property
    def workers(self) -> int:
        """Workers training together: the virtual ones of this process, else the processes."""
        return self.virtual or self.world

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank (a collective)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def all(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on every rank (a collective)."""
        return not self.any(not flag)

    def max(self, value: float) -> float:
        """The largest ``value`` over ranks (a collective; identical on every rank)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t.item())

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks, in float64 (a collective; identical on every rank)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()


def _env_int(name: str, default: int | None = None) -> int | None:
    text = os.environ.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not an integer") from None


def multiprocess_launch() -> tuple[str, int] | None:
    """(launcher, process count) when the environment says this process is one of several
    started together, else None."""
    launcher = detect(os.environ, os.getppid())
    if launcher is None or not launcher.world.isdigit() or int(launcher.world) < 2:
        return None
    return launcher.name, int(launcher.world)


def launch_record() -> dict[str, str]:
    """What a run's records keep of the launcher that started it: its name, this process's rank,
    the world size, and the key of its job where it names one."""
    launcher = detect(os.environ, os.getppid())
    if launcher is None:
        return {}
    return {"name": launcher.name, "rank": launcher.rank, "world_size": launcher.world,
            **({"job": launcher.job_key} if launcher.job_key else {})}


_watchdog = None


def join(device: str = "auto", timeout_s: float = 1800.0, watchdog: bool = False, virtual: int = 0) -> Job:
    """Join the process group described by the environment (or run alone) and pick a device:
    with CUDA, GPU ``LOCAL_RANK`` and NCCL; otherwise the CPU and gloo. A process group that
    is already initialised is used as it is. With ``watchdog``, a lost rank stops every rank
    within ``SPARSECOMM_HEARTBEAT_TIMEOUT`` seconds (default 30; see :mod:`.watchdog`).
    ``virtual`` = W: this process alone simulates W workers (refused in a launch of several)."""
    if virtual:
        launch = multiprocess_launch()
        if launch is not None or (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            name, count = launch or ("init_process_group", dist.get_world_size())
            raise ValueError(virtual_conflict(virtual, name, count))
    if dist.is_available() and dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
        local_rank = _env_int("LOCAL_RANK", rank)
    else:
        world = _env_int("WORLD_SIZE", 1)
        rank = _env_int("RANK", 0)
        local_rank = _env_int("LOCAL_RANK", 0)
    assert world is not None and rank is not None and local_rank is not None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} is out of range for WORLD_SIZE={world}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but no CUDA device is visible")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {count} CUDA device(s) are visible on this node")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        for var in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(var):
                raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set; start the job with run.sh or torchrun")
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        log.info("rank %d/%d joined (%s, %s)", rank, world, backend, dev)
    if watchdog and world > 1:
        _start_watchdog(rank, world)
    return Job(rank=rank, world=world, local_rank=local_rank, device=dev, virtual=virtual)


def virtual_conflict(virtual: int, launcher: str, count: int) -> str:
    """The one line that refuses virtual workers inside a launch of ``count`` processes."""
    return (f"--virtual-workers {virtual} simulates {virtual} workers in one process, but this process is one of "
            f"{count} started by {launcher}: for virtual workers start a single process (python -m sparsecomm.train "
            f"... --virtual-workers {virtual}); for {count} real workers drop --virtual-workers")


def _start_watchdog(rank: int, world: int) -> None:
    global _watchdog
    from .watchdog import Watchdog

    timeout = float(os.environ.get("SPARSECOMM_HEARTBEAT_TIMEOUT", "30"))
    interval = float(os.environ.get("SPARSECOMM_HEARTBEAT_INTERVAL", str(min(2.0, timeout / 5))))
    store = dist.distributed_c10d._get_default_store()
    _watchdog = Watchdog(store, rank, world, interval=interval, timeout=timeout).start()


def lost_ranks() -> list[int] | None:
    """Which ranks stopped beating (see :meth:`Watchdog.lost_ranks`); [] without a watchdog,
    None when the job's store is unreachable (rank 0 or the launcher is gone)."""
    return [] if _watchdog is None else _watchdog.lost_ranks()


def leave() -> None:
    """Stop the watchdog (marking this rank done) and leave the process group."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
