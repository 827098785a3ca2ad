"""Communicators: the only place reducers touch ``torch.distributed``.

A reducer gets its collectives (all-reduce, all-gather, broadcast, all-to-all) from a
:class:`Communicator`. The default wraps a ``torch.distributed`` process group (gloo on
CPU tensors, NCCL on CUDA tensors); :class:`SoloCommunicator` serves a single worker
without any process group. Other implementations (for example simulated workers in one
process) only need the three ``_``-prefixed primitives.

Every collective is counted, per worker, in two ways (docs/reducers.md, *Metrics*):

``bytes_sent``
    bytes this worker handed to the collective (for a broadcast: the root's payload,
    nothing for the receivers). With one worker the collective is the identity, but the
    payload a method hands over is still counted, so figures compare across worker counts.
``bytes_wire``
    an estimate of the bytes that reach this worker over the network under ring
    algorithms: all-reduce of n bytes ``2(P-1)/P * n``; reduce-scatter of n bytes
    ``(P-1)/P * n``; all-gather of n bytes per worker ``(P-1) * n``; broadcast of n bytes ``n`` on every receiver, 0 on the root; a point-to-point
    message of n bytes ``n`` on its receiver; an all-to-all: the bytes this worker receives
    from the others (exact, not an estimate: each part travels once, sender to receiver).

The ``*_async`` forms start a collective and return a :class:`Pending`; collectives must be
started in the same order on every worker.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Communicator", "Pending", "ProcessGroupCommunicator", "SoloCommunicator", "make_communicator"]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class Pending:
    """A collective in flight: ``wait()`` blocks until it is done and returns its result."""

    def __init__(self, result: torch.Tensor, work: Any = None) -> None:
        self._result = result
        self._work = work

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._result


class Communicator:
    """Blocking collectives over ``size`` workers, with per-step byte counters."""

    def __init__(self, rank: int, size: int) -> None:
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"invalid rank {rank} for a world of size {size}")
        self.rank = rank
        self.size = size
        self.bytes_sent = 0
        self.bytes_wire = 0.0

    def reset_counters(self) -> None:
        self.bytes_sent = 0
        self.bytes_wire = 0.0

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all workers, in place; every worker gets identical bits."""
        return self.all_reduce_async_(tensor).wait()

    def all_reduce_async_(self, tensor: torch.Tensor) -> Pending:
        n = _nbytes(tensor)
        self.bytes_sent += n
        self.bytes_wire += 2.0 * (self.size - 1) / self.size * n
        work = self._all_reduce(tensor) if self.size > 1 and tensor.numel() > 0 else None
        return Pending(tensor, work)

    def reduce_scatter_(self, out: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
        """Sum the flat ``tensor`` (``size`` equal slices) over all workers and write this
        worker's slice of the sum into ``out``; returns ``out``."""
        if tensor.numel() != self.size * out.numel():
            raise ValueError(f"reduce_scatter_: input of {tensor.numel()} elements is not {self.size} slices "
                             f"of the output's {out.numel()}")
        n = _nbytes(tensor)
        self.bytes_sent += n
        self.bytes_wire += (self.size - 1) / self.size * n
        if self.size == 1:
            return out.copy_(tensor.view(-1))
        if out.numel() > 0:
            self._reduce_scatter(out, tensor.contiguous().view(-1))
        return out

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Gather equal-shaped tensors from all workers into a new ``[size, *shape]`` tensor."""
        return self.all_gather_async(tensor).wait()

    def all_gather_async(self, tensor: torch.Tensor) -> Pending:
        n = _nbytes(tensor)
        self.bytes_sent += n
        self.bytes_wire += float((self.size - 1) * n)
        tensor = tensor.contiguous()
        if self.size == 1:
            return Pending(tensor.unsqueeze(0).clone())
        out = torch.empty((self.size * tensor.numel(),), dtype=tensor.dtype, device=tensor.device)
        work = self._all_gather(out, tensor.view(-1)) if tensor.numel() > 0 else None
        return Pending(out.view(self.size, *tensor.shape), work)

    def all_to_all(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        """:meth:`all_to_all_async`, waited for."""
        return self.all_to_all_async(tensor, send_counts, recv_counts).wait()

    def all_to_all_async(self, tensor: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> Pending:
        """Send the consecutive parts of the flat ``tensor`` (``send_counts[r]`` elements for
        worker r) to their workers; the result (when waited for) is what the others sent here,
        in worker order (``recv_counts[r]`` elements from worker r), as one new flat tensor;
        ``tensor`` must stay unchanged until then. A collective: every
        worker calls it, with counts that agree (worker w's ``send_counts[r]`` is worker r's
        ``recv_counts[w]``), even when it sends and receives nothing. ``bytes_sent``: the whole
        ``tensor``; ``bytes_wire``: the bytes received from the others (this worker's own part,
        if any, is copied, not counted)."""
        if len(send_counts) != self.size or len(recv_counts) != self.size or sum(send_counts) != tensor.numel():
            raise ValueError(f"all_to_all: {len(send_counts)} send and {len(recv_counts)} receive counts for "
                             f"{self.size} workers, {sum(send_counts)} elements to send of {tensor.numel()}")
        tensor = tensor.contiguous().view(-1)
        self.bytes_sent += _nbytes(tensor)
        size = tensor.element_size()
        self.bytes_wire += float(size * (sum(recv_counts) - recv_counts[self.rank]))
        out = torch.empty(sum(recv_counts), dtype=tensor.dtype, device=tensor.device)
        if self.size == 1:
            return Pending(out.copy_(tensor))
        return Pending(out, self._all_to_all(out, tensor, list(send_counts), list(recv_counts)))

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Send ``tensor`` to worker ``dst`` (which calls :meth:`recv_`)."""
        self._check_peer(dst)
        self.bytes_sent += _nbytes(tensor)
        if tensor.numel() > 0:
            self._exchange(tensor.contiguous(), None, dst)

    def recv_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Receive into ``tensor`` what worker ``src`` sends."""
        self._check_peer(src)
        self.bytes_wire += float(_nbytes(tensor))
        if tensor.numel() > 0:
            self._exchange(None, tensor, src)
        return tensor

    def exchange(self, tensor: torch.Tensor, peer: int) -> torch.Tensor:
        """Swap equal-shaped tensors with worker ``peer`` (which calls it with ours)."""
        self._check_peer(peer)
        n = _nbytes(tensor)
        self.bytes_sent += n
        self.bytes_wire += float(n)
        out = torch.empty_like(tensor)
        if tensor.numel() > 0:
            self._exchange(tensor.contiguous(), out, peer)
        return out

    def _check_peer(self, peer: int) -> None:
        if not 0 <= peer < self.size or peer == self.rank:
            raise ValueError(f"peer {peer} is not another worker of a world of size {self.size} (this is {self.rank})")

    def broadcast_(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Overwrite ``tensor`` on every worker with the copy held by worker ``src``."""
        if not 0 <= src < self.size:
            raise ValueError(f"broadcast source {src} is outside the world of size {self.size}")
        n = _nbytes(tensor)
        if self.rank == src:
            self.bytes_sent += n
        elif self.size > 1:
            self.bytes_wire += float(n)
        if self.size > 1 and tensor.numel() > 0:
            self._broadcast(tensor, src)
        return tensor

    # Primitives implemented by subclasses; only called with size > 1 and non-empty tensors.
    # _all_reduce and _all_gather start the collective and return an object with wait() (or None
    # when already done).
    def _all_reduce(self, tensor: torch.Tensor) -> Any:
        raise NotImplementedError

    def _all_gather(self, out: torch.Tensor, tensor: torch.Tensor) -> Any:
        raise NotImplementedError

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        raise NotImplementedError

    def _reduce_scatter(self, out: torch.Tensor, tensor: torch.Tensor) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no reduce-scatter")

    def _all_to_all(self, out: torch.Tensor, tensor: torch.Tensor, send_counts: list[int],
                    recv_counts: list[int]) -> Any:
        """Called with size > 1 on every worker, empty tensors included; returns the collective's
        work handle while it is in flight, or None once done."""
        raise NotImplementedError(f"{type(self).__name__} has no all-to-all")

    def _exchange(self, send: torch.Tensor | None, recv: torch.Tensor | None, peer: int) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SoloCommunicator(Communicator):
    """One worker, no process group: every collective is the identity."""

    def __init__(self) -> None:
        super().__init__(0, 1)


_all_gather_flat = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor")
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or getattr(dist, "reduce_scatter_tensor")


class ProcessGroupCommunicator(Communicator):
    """Collectives of a ``torch.distributed`` process group (``None``: the default group)."""

    def __init__(self, group: Any = None) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialized; pass group=None without a "
                               "process group for a single worker, or call init_process_group first")
        self.group = group
        super().__init__(dist.get_rank(group), dist.get_world_size(group))
        self._global_ranks = [dist.get_global_rank(group, r) if group is not None else r
                              for r in range(self.size)]

    def _all_reduce(self, tensor: torch.Tensor) -> Any:
        return dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group, async_op=True)

    def _all_gather(self, out: torch.Tensor, tensor: torch.Tensor) -> Any:
        return _all_gather_flat(out, tensor, group=self.group, async_op=True)

    def _broadcast(self, tensor: torch.Tensor, src: int) -> None:
        dist.broadcast(tensor, src=self._global_ranks[src], group=self.group)

    def _reduce_scatter(self, out: torch.Tensor, tensor: torch.Tensor) -> None:
        _reduce_scatter_flat(out, tensor, op=dist.ReduceOp.SUM, group=self.group)

    def _all_to_all(self, out: torch.Tensor, tensor: torch.Tensor, send_counts: list[int],
                    recv_counts: list[int]) -> Any:
        return dist.all_to_all_single(out, tensor, recv_counts, send_counts, group=self.group, async_op=True)

    def _exchange(self, send: torch.Tensor | None, recv: torch.Tensor | None, peer: int) -> None:
        ops = []
        if send is not None:
            ops.append(dist.P2POp(dist.isend, send, self._global_ranks[peer], self.group))
        if recv is not None:
            ops.append(dist.P2POp(dist.irecv, recv, self._global_ranks[peer], self.group))
        for work in dist.batch_isend_irecv(ops):
            work.wait()

    def __getstate__(self) -> dict:
        raise TypeError("a communicator holds a process group and cannot be pickled; "
                        "save the reducer's state_dict() instead")


def make_communicator(group: Any = None) -> Communicator:
    """The communicator for ``group``: a :class:`Communicator` is used as is; ``None`` means the
    default process group when one is initialized, else a single worker."""
    if isinstance(group, Communicator):
        return group
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return SoloCommunicator()
    return ProcessGroupCommunicator(group)
