"""A pool of real worker processes joined in one gloo process group, reused across tests.

Spawning a process and importing torch costs seconds, so each world size gets one
:class:`Cluster` for the whole session; tests send it a module-level function and get one
result per rank back. A function that hangs (a collective one rank never joins) hits the
process group's timeout inside the workers or the cluster's own deadline here; either way the
test fails with the ranks' tracebacks and the cluster is replaced.
"""
from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Outcome:
    rank: int
    ok: bool
    value: Any = None
    error_type: str = ""
    error: str = ""
    trace: str = ""


class WorkerError(AssertionError):
    pass


def _pack(value: Any) -> bytes:
    """Results travel as torch.save bytes (tensors by value, no shared-memory handles)."""
    import torch

    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


def _unpack(data: bytes) -> Any:
    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _worker(rank: int, size: int, port: int, inbox: Any, outbox: Any) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    outbox.put(Outcome(rank, True, "ready"))
    while True:
        job = inbox.get()
        if job is None:
            break
        fn, args, kwargs = job
        try:
            outbox.put(Outcome(rank, True, _pack(fn(*args, **kwargs))))
        except BaseException as exc:  # reported to the test, which decides
            outbox.put(Outcome(rank, False, None, type(exc).__name__, str(exc), traceback.format_exc()))
    dist.destroy_process_group()


def outcome_in_step(fn: Callable[[], Any]) -> dict[str, Any]:
    """For a worker function that must fail alike on every rank: run ``fn``, report its
    exception (type and message, or None), then prove the group is still in step (no rank left
    inside a collective): an all-reduce of the rank that every rank must join."""
    import torch
    import torch.distributed as dist

    try:
        fn()
        error = None
    except Exception as exc:  # reported to the test
        error = (type(exc).__name__, str(exc))
    x = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(x)
    return {"error": error, "group_alive": float(x) == dist.get_world_size() * (dist.get_world_size() + 1) / 2}


class Cluster:
    """``size`` spawned processes, each rank of one gloo group, running jobs on request."""

    def __init__(self, size: int, start_timeout: float = 180.0) -> None:
        ctx = mp.get_context("spawn")
        self.size = size
        port = free_port()
        self._inboxes = [ctx.Queue() for _ in range(size)]
        self._outbox = ctx.Queue()
        self._procs = [ctx.Process(target=_worker, args=(r, size, port, self._inboxes[r], self._outbox), daemon=True)
                       for r in range(size)]
        for p in self._procs:
            p.start()
        self._collect(start_timeout)

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def _collect(self, timeout: float) -> list[Outcome]:
        got: dict[int, Outcome] = {}
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
        while len(got) < self.size:
            left = (deadline - datetime.datetime.now()).total_seconds()
            try:
                out = self._outbox.get(timeout=min(1.0, max(0.1, left)))
            except queue.Empty:
                if left <= 0 or not self.alive:
                    self.close()
                    missing = sorted(set(range(self.size)) - set(got))
                    raise WorkerError(f"ranks {missing} of a {self.size}-process cluster did not answer "
                                      f"within {timeout:.0f}s")
                continue
            if out.ok and isinstance(out.value, bytes):
                out.value = _unpack(out.value)
            got[out.rank] = out
        return [got[r] for r in range(self.size)]

    def outcomes(self, fn: Callable, *args: Any, timeout: float = 240.0, **kwargs: Any) -> list[Outcome]:
        """Run ``fn(*args, **kwargs)`` on every rank; one :class:`Outcome` per rank."""
        for box in self._inboxes:
            box.put((fn, args, kwargs))
        outs = self._collect(timeout)
        if len({o.ok for o in outs}) > 1:  # ranks disagreed: the group may be out of step
            self.close()
        return outs

    def run(self, fn: Callable, *args: Any, timeout: float = 240.0, **kwargs: Any) -> list[Any]:
        """Run ``fn`` on every rank and return the results by rank; any failure raises."""
        outs = self.outcomes(fn, *args, timeout=timeout, **kwargs)
        failed = [o for o in outs if not o.ok]
        if failed:
            raise WorkerError("\n".join(f"--- rank {o.rank}: {o.error_type}: {o.error}\n{o.trace}" for o in failed))
        return [o.value for o in outs]

    def close(self) -> None:
        for box in self._inboxes:
            try:
                box.put(None)
            except Exception:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


class Clusters:
    """One live cluster per world size, created on first use."""

    def __init__(self) -> None:
        self._by_size: dict[int, Cluster] = {}

    def __call__(self, size: int) -> Cluster:
        c = self._by_size.get(size)
        if c is None or not c.alive:
            c = self._by_size[size] = Cluster(size)
        return c

    def close(self) -> None:
        for c in self._by_size.values():
            c.close()
        self._by_size.clear()
