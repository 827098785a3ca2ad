"""Virtual workers: W logical workers in one process, exchanging through one shared world.

``world = VirtualWorld(W)`` holds the collectives in progress; ``world.communicator(r)`` is
worker r's :class:`~sparsecomm.reducers.comm.communicator.Communicator` (rank r of W). Reducers built on
these are the ordinary reducers, unchanged, each with its own state and residual::

    world = VirtualWorld(4)
    rs = [reducers.build("exdyna", density=0.01, group=world.communicator(r)) for r in range(4)]
    averages = world.run(lambda r: rs[r].reduce(grads[r]))

**How a step runs.** :meth:`VirtualWorld.run` calls ``fn(rank)`` for every rank, each in a
thread of its own, but hands a baton around so that exactly one runs at a time: a worker
runs until it waits for a collective that not every worker has joined, then the next
runnable worker (in rank order) goes on. The last worker to join a collective completes it
and its waiters become runnable. So each worker's selection runs alone (its ``t_select`` is
its own, as on a dedicated core), the schedule is deterministic, and a collective that some
worker never joins is reported at once, naming who waits where, instead of hanging. (A step
written as a generator would need every method rewritten; threads running freely would
interleave the workers' timings and leave the schedule to the operating system.) Threads
are started once per world and reused. ``world.busy[r]`` is the time rank r ran in the last
run: its own host work, hand-overs included (about 30 to 60 microseconds each here).

**Semantics are those of real processes**: the n-th collective of every worker is one
collective, and kinds, sizes, dtypes and broadcast roots must agree (otherwise every waiter
gets a :class:`VirtualWorldError` naming them, where gloo would fail or hang); all-reduce
adds in gloo's ring order (:func:`ring_sum`), so results are bit-identical to gloo
processes; point-to-point sends are buffered (a send never waits for its receive); byte
counters are the base class's, the same figures as with processes. An all-gather's result
is one tensor shared by every worker, read-only (W private copies of a W-row table would
cost W^2 rows); a worker that writes into it is caught at the end of the run.

What it does not model: time on a network. ``t_comm`` counts the time a worker waited
for the others' turns, not a transfer.
"""
from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from typing import Any, Callable, Sequence, TypeVar

import torch

from .communicator import Communicator, Pending

__all__ = ["VirtualWorld", "VirtualCommunicator", "VirtualWorldError", "ring_sum", "ring_chunk"]

T = TypeVar("T")

_MAX_SEGMENT_BYTES = 1 << 20  # gloo's AllreduceOptions::kMaxSegmentSize (PyTorch leaves it)
_STACK_BYTES = 64 << 20       # how much of the inputs ring_sum stacks at once


class VirtualWorldError(RuntimeError):
    """Virtual workers that cannot go on: a collective some worker never joins, collectives
    that do not match, or a world left unusable by such a failure."""


def ring_chunk(numel: int, element_size: int, size: int) -> int:
    """Elements per chunk of gloo's ring all-reduce of ``numel`` elements over ``size``
    ranks: chunk c (elements ``[c L, (c + 1) L)``) ends up reduced on rank c."""
    total = numel * element_size
    max_bytes = element_size * max(1, _MAX_SEGMENT_BYTES // element_size)
    segments = max(-(-total // max_bytes), 2 * size)
    segments = -(-segments // size) * size
    segment_bytes = -(-(-(-total // segments)) // element_size) * element_size
    return segments // size * segment_bytes // element_size


def ring_sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The element-wise sum of equal-shaped tensors (one per rank, in rank order), added in the
    order of gloo's ring all-reduce (``gloo/allreduce.cc``): an element of chunk c (see
    :func:`ring_chunk`) starts from rank c - 1's value and adds ranks c - 2, c - 3, ... down
    to c (mod P), each addition rounded in the dtype. This reproduces ``dist.all_reduce`` of
    gloo bit for bit (tested against 2, 3 and 4 processes, float16 to float64)."""
    P, first = len(tensors), tensors[0]
    if P == 1 or first.numel() == 0:
        return first.clone()
    flat = [t.reshape(-1) for t in tensors]
    n, size = first.numel(), first.element_size()
    L = ring_chunk(n, size, P)
    out = torch.empty(n, dtype=first.dtype, device=first.device)
    chunks = -(-n // L)
    per_block = max(1, _STACK_BYTES // (P * L * size))
    for c0 in range(0, chunks, per_block):
        c1 = min(c0 + per_block, chunks)
        lo, hi = c0 * L, min(c1 * L, n)
        C = c1 - c0
        rows = torch.zeros(P, C * L, dtype=first.dtype, device=first.device)
        for r in range(P):
            rows[r, :hi - lo] = flat[r][lo:hi]
        rows = rows.view(P * C, L)  # row r * C + j: rank r's part of chunk c0 + j
        chunk = torch.arange(c0, c1, device=first.device)
        local = torch.arange(C, device=first.device)
        acc = rows.index_select(0, (chunk - 1) % P * C + local)
        for k in range(2, P + 1):
            acc += rows.index_select(0, (chunk - k) % P * C + local)
        out[lo:hi] = acc.view(-1)[:hi - lo]
    return out.view(first.shape)


class _Collective:
    """One collective: who joined with what, and its outcome once the last one joined."""

    __slots__ = ("seq", "kind", "joined", "entries", "src", "table", "done", "error", "waiters")

    def __init__(self, seq: int, kind: str, size: int) -> None:
        self.seq, self.kind = seq, kind
        self.joined: list[tuple[int, str, str]] = []  # (rank, kind, signature)
        self.entries: list[torch.Tensor | None] = [None] * size
        self.src: int | None = None
        self.table: torch.Tensor | None = None  # an all-gather's shared result
        self.done = False
        self.error: str | None = None
        self.waiters: list[int] = []

    def describe(self, size: int) -> str:
        return f"{self.kind} #{self.seq} ({len(self.joined)} of {size} joined)"


class _Waiting:
    """What a started collective hands back: ``wait()`` blocks the calling worker until done."""

    def __init__(self, world: "VirtualWorld", op: _Collective) -> None:
        self.world, self.op = world, op

    def wait(self) -> None:
        op = self.op
        self.world._wait_until(lambda: op.done, op.waiters, lambda: op.describe(self.world.size))
        if op.error is not None:
            raise VirtualWorldError(op.error)


class _Task:
    """A rank's thread and what it is doing now."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.go = threading.Semaphore(0)
        self.fn: Callable[[int], Any] | None = None
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished = True
        self.waiting: Callable[[], str] | None = None
        self.thread: threading.Thread | None = None


class VirtualWorld:
    """``size`` logical workers in this process: their communicators (of class
    ``communicator``, a :class:`VirtualCommunicator` by default) and their scheduler."""

    def __init__(self, size: int, communicator: type["VirtualCommunicator"] | None = None) -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"a virtual world needs a worker count >= 1, got {size!r}")
        self.size = size
        self._joined = [0] * size                      # collectives each rank has started
        self._open: dict[int, _Collective] = {}       # collectives not yet joined by everyone
        self._mail: dict[tuple[int, int], deque[torch.Tensor]] = {}
        self._mail_waiters: dict[tuple[int, int], list[int]] = {}
        self._shared: list[tuple[_Collective, int]] = []  # all-gather tables and their versions
        self._tasks: list[_Task] = []
        self._local = threading.local()
        self._back = threading.Semaphore(0)
        self._ready: deque[int] = deque()
        self._running = False
        self._aborting: str | None = None
        self._broken: str | None = None
        self.busy = [0.0] * size  # seconds each rank ran during the last run (its own work, no waiting)
        self._comms = [(communicator or VirtualCommunicator)(self, r) for r in range(size)]
        weakref.finalize(self, _stop_threads, self._tasks)

    def communicator(self, rank: int) -> "VirtualCommunicator":
        """Worker ``rank``'s communicator (rank ``rank`` of ``size``)."""
        if not isinstance(rank, int) or not 0 <= rank < self.size:
            raise ValueError(f"rank {rank!r} is outside the virtual world of size {self.size}")
        return self._comms[rank]

    # ------------------------------------------------------------------------ running
    def run(self, fn: Callable[[int], T]) -> list[T]:
        """Call ``fn(rank)`` for every rank, one at a time, switching at collectives (see the
        module's docstring); the results by rank. If any rank raises, the lowest rank's
        exception is raised once every rank has finished or been stopped."""
        if self._broken is not None:
            raise VirtualWorldError(f"this virtual world is unusable after an earlier failure: {self._broken}")
        if self._running:
            raise RuntimeError("VirtualWorld.run() was called from inside a run")
        if not self._tasks:
            self._tasks.extend(_Task(r) for r in range(self.size))
        for task in self._tasks:
            task.fn, task.result, task.error, task.finished = fn, None, None, False
        self.busy = [0.0] * self.size
        self._running = True
        try:
            self._ready = deque(range(self.size))
            while self._ready:
                self._resume(self._tasks[self._ready.popleft()])
            stuck = [t for t in self._tasks if not t.finished]
            if stuck:
                self._abort(stuck)
            else:
                self._check_consistent()
        finally:
            self._running = False
            for task in self._tasks:
                task.fn = None
        results, errors = [t.result for t in self._tasks], [t.error for t in self._tasks if t.error is not None]
        for task in self._tasks:
            task.result = task.error = None
        real = [e for e in errors if not isinstance(e, _Stopped)]
        if real:
            raise real[0]
        if errors:
            raise VirtualWorldError(str(errors[0]))
        return results

    def close(self) -> None:
        """Stop the worker threads now (otherwise they stop when the world is collected)."""
        if self._running:
            raise RuntimeError("VirtualWorld.close() was called from inside a run")
        _stop_threads(self._tasks)

    def _resume(self, task: _Task) -> None:
        """Hand the baton to ``task`` and take it back when the task waits or finishes."""
        if task.thread is None:
            task.thread = threading.Thread(target=_serve, args=(task, self._back, self._local), daemon=True,
                                           name=f"virtual-worker-{task.rank}")
            task.thread.start()
        start = time.perf_counter()
        task.go.release()
        self._back.acquire()
        self.busy[task.rank] += time.perf_counter() - start

    def _wait_until(self, ready: Callable[[], bool], waiters: list[int], what: Callable[[], str]) -> None:
        """Block the calling worker until ``ready()``, letting the others run meanwhile."""
        if ready():
            return
        task: _Task | None = getattr(self._local, "task", None)
        if task is None:
            raise VirtualWorldError(f"{what()} was waited for outside VirtualWorld.run(); it completes only when "
                                    f"every worker has joined it")
        while not ready():
            if self._aborting is not None:
                raise _Stopped(self._aborting)
            waiters.append(task.rank)
            task.waiting = what
            self._back.release()
            task.go.acquire()
            task.waiting = None
        if self._aborting is not None:
            raise _Stopped(self._aborting)

    def _wake(self, waiters: list[int]) -> None:
        self._ready.extend(sorted(waiters))
        waiters.clear()

    def _abort(self, stuck: list[_Task]) -> None:
        """Some workers wait for what will never come: stop them all and mark the world broken."""
        groups: dict[str, list[int]] = {}
        for task in stuck:
            groups.setdefault(task.waiting() if task.waiting else "nothing", []).append(task.rank)
        waits = "; ".join(f"{_ranks(ranks)} wait for {what}" for what, ranks in groups.items())
        failed = [t.rank for t in self._tasks if t.finished and t.error is not None]
        done = [t.rank for t in self._tasks if t.finished and t.error is None]
        message = (f"virtual workers cannot go on: {waits}"
                   + (f"; {_ranks(failed)} raised" if failed else "")
                   + (f"; {_ranks(done)} finished" if done else ""))
        self._aborting = message
        for task in stuck:
            self._resume(task)
        self._broken = message

    def _check_consistent(self) -> None:
        """After a run: every collective complete, every all-gather table unchanged."""
        if self._open:
            op = min(self._open.values(), key=lambda o: o.seq)
            self._broken = (f"{op.kind} #{op.seq} was joined by {_ranks([r for r, _, _ in op.joined])} only; "
                            f"every worker must start the same collectives in the same order")
            raise VirtualWorldError(self._broken)
        for op, version in self._shared:
            assert op.table is not None
            if op.table._version != version:
                self._broken = (f"a worker wrote into the result of {op.kind} #{op.seq}, which all workers share; "
                                f"all-gather results are read-only (copy before changing them)")
                raise VirtualWorldError(self._broken)
        self._shared.clear()

    # -------------------------------------------------------------------- collectives
    def _join(self, rank: int, kind: str, tensor: torch.Tensor, src: int | None = None) -> _Collective:
        """Rank ``rank`` starts its next collective; the last to join completes it."""
        if self._broken is not None:
            raise VirtualWorldError(f"this virtual world is unusable after an earlier failure: {self._broken}")
        seq = self._joined[rank]
        self._joined[rank] += 1
        op = self._open.get(seq)
        if op is None:
            op = self._open[seq] = _Collective(seq, kind, self.size)
        signature = f"{tensor.numel()} x {str(tensor.dtype).replace('torch.', '')}" + \
            (f" from rank {src}" if src is not None else "")
        op.joined.append((rank, kind, signature))
        op.entries[rank] = tensor
        if kind == "all_gather" and op.kind == kind:
            if op.table is None:
                op.table = torch.empty((self.size, tensor.numel()), dtype=tensor.dtype, device=tensor.device)
            if op.table.shape[1] == tensor.numel() and op.table.dtype == tensor.dtype:
                op.table[rank].copy_(tensor)  # read now, as a transfer would
                op.entries[rank] = None
        if len(op.joined) == self.size:
            del self._open[seq]
            self._complete(op, src)
        return op

    def _complete(self, op: _Collective, src: int | None) -> None:
        kinds = {(kind, signature) for _, kind, signature in op.joined}
        if len(kinds) > 1:
            joined = sorted(op.joined)
            op.error = (f"collective #{op.seq} does not match across workers: "
                        + "; ".join(f"rank {r}: {kind} of {sig}" for r, kind, sig in joined[:8])
                        + ("; ..." if len(joined) > 8 else ""))
        elif op.kind == "all_reduce":
            entries = [t for t in op.entries if t is not None]
            total = ring_sum(entries)
            for t in entries:
                t.copy_(total)
        elif op.kind == "broadcast":
            assert src is not None
            root = op.entries[src]
            for r, t in enumerate(op.entries):
                if r != src and t is not None:
                    t.copy_(root)
        elif op.kind == "all_gather":
            assert op.table is not None
            self._shared.append((op, op.table._version))
        op.entries = []
        op.done = True
        self._wake(op.waiters)

    def _send(self, src: int, dst: int, tensor: torch.Tensor) -> None:
        self._mail.setdefault((src, dst), deque()).append(tensor.clone())
        waiters = self._mail_waiters.get((src, dst))
        if waiters:
            self._wake(waiters)

    def _recv(self, src: int, dst: int, into: torch.Tensor) -> None:
        box = self._mail.setdefault((src, dst), deque())
        self._wait_until(lambda: bool(box), self._mail_waiters.setdefault((src, dst), []),
                         lambda: f"a message from rank {src} to rank {dst}")
        message = box.popleft()
        if message.numel() != into.numel() or message.dtype != into.dtype:
            raise VirtualWorldError(f"rank {dst} receives {into.numel()} x {into.dtype} from rank {src}, which sent "
                                    f"{message.numel()} x {message.dtype}")
        into.copy_(message.view(into.shape))


def _serve(task: _Task, back: threading.Semaphore, local: threading.local) -> None:
    """A worker thread: run the task's function whenever handed the baton (no reference to the
    world, so that an unused world can be collected and its threads stopped)."""
    local.task = task
    while True:
        task.go.acquire()
        fn = task.fn
        if fn is None:
            return
        try:
            task.result = fn(task.rank)
        except BaseException as exc:  # handed to run(), which raises it in the caller
            task.error = exc
        task.fn = None
        task.finished = True
        back.release()


def _stop_threads(tasks: list[_Task]) -> None:
    for task in tasks:
        if task.thread is not None:
            task.fn = None
            task.go.release()
            task.thread.join()
    tasks.clear()


class _Stopped(VirtualWorldError):
    """Raised inside a worker stopped because the others cannot go on."""


def _ranks(ranks: list[int]) -> str:
    """'rank 3', 'ranks 0-2', 'ranks 0, 2, 5' (runs of consecutive ranks joined)."""
    ranks = sorted(ranks)
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    runs, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}-{a}" if a > start else f"{start}")
            start = b
    return "ranks " + ", ".join(runs)


class VirtualCommunicator(Communicator):
    """Worker ``rank``'s view of a :class:`VirtualWorld`."""

    def __init__(self, world: VirtualWorld, rank: int) -> None:
        super().__init__(rank, world.size)
        self.world = world

    def _all_reduce(self, tensor: torch.Tensor) -> Any:
        return _Waiting(self.world, self.world._join(self.rank, "all_reduce", tensor))

    def all_gather_async(self, tensor: torch.Tensor) -> Pending:
        """As :meth:`Communicator.all_gather_async`, but the result is one table shared by
        every worker (read-only)."""
        if self.size == 1 or tensor.numel() == 0:
            return super().all_gather_async(tensor)
        n = tensor.numel() * tensor.element_size()
        self.bytes_sent += n
        self.bytes_wire += float((self.size - 1) * n)
        op = self.world._join(self.rank, "all_gather", tensor.contiguous().view(-1))
        if op.table is None or op.table.shape[1] != tensor.numel() or op.table.dtype != tensor.dtype:
            table = torch.empty((self.size, tensor.numel()), dtype=tensor.dtype, device=tensor.device)
        else:
            table = op.table
        return Pending(table.view(self.size, *tensor.shape), _Waiting(self.world, op))

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        _Waiting(self.world, self.world._join(self.rank, "broadcast", tensor, src)).wait()

    def _all_to_all(self, out: torch.Tensor, tensor: torch.Tensor, send_counts: list[int],
                    recv_counts: list[int]) -> None:
        """Each part posted to its worker's mailbox, then each worker's part taken from it (a
        worker's own part copied)."""
        at, mine = 0, tensor[:0]
        for peer, n in enumerate(send_counts):
            if peer == self.rank:
                mine = tensor[at:at + n]
            else:
                self.world._send(self.rank, peer, tensor[at:at + n])
            at += n
        at = 0
        for peer, n in enumerate(recv_counts):
            if peer == self.rank:
                out[at:at + n].copy_(mine)
            else:
                self.world._recv(peer, self.rank, out[at:at + n])
            at += n

    def _exchange(self, send: torch.Tensor | None, recv: torch.Tensor | None, peer: int) -> None:
        if send is not None:
            self.world._send(self.rank, peer, send)
        if recv is not None:
            self.world._recv(peer, self.rank, recv)
