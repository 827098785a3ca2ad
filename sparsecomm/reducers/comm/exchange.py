"""How selected values travel between workers (docs/reducers.md, *Exchange schemes*).

Every step opens with a *handshake*: one all-gather of a small float64 row per worker
(layout fingerprint, status flags, the count of selected coordinates and method-specific
extras). It is what lets every rank take the same decision before any size-dependent
collective: raise together when layouts differ or a gradient is not finite, skip together,
and size padded all-gathers from the counts. The schemes below then move the payload:

* :func:`dense_allreduce_mean` -- the ``exact`` baseline, one flat all-reduce;
* :func:`sparse_gather_sum` -- everyone's (index, value) pairs, padded to the largest count,
  scatter-added in rank order (also in two halves: :func:`start_pairs_gather` starts the
  all-gather, :meth:`PairsInFlight.add_into` finishes it, so a method can overlap it with
  backward); :func:`routed_gather_sum` sends each pair only to the worker that owns its
  position (:class:`Owners`: FSDP's shards) by one all-to-all;
* :func:`union_allreduce` -- indices are all-gathered, then every worker all-reduces its own
  values at the union of everyone's indices;
* :func:`allreduce_at` -- all-reduce at positions every worker already agrees on; with
  :class:`Owners`, each value sent only to its position's owner by one all-to-all and summed
  there in rank order (:func:`routed_sum_at`);
* :func:`gather_decoded_mean` -- every worker's encoded row (quantized codes, 16-bit values)
  all-gathered a window at a time (:func:`gather_in_windows`), decoded and added in rank
  order; with :class:`Owners`, each owner's part of every row sent to it only, by one
  all-to-all per window (:func:`routed_windows`), and decoded by it alone.

Every exchange of positions and values travels in one format (:func:`pack`): each part
padded to the same count, widest element type first. Padding is zero-initialised, counted as
sent, and sliced off before it can reach a result.
Sums are formed in a fixed order, so ``avg`` is bit-identical on every rank.
"""
from __future__ import annotations

import collections

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from .bitpack import unpack_bits
from .communicator import Communicator, Pending
from ..layout import Layout

__all__ = [
    "LayoutMismatchError", "NonFiniteGradientError", "SkipStep", "Header", "handshake",
    "gather_counts", "dense_allreduce_mean", "sparse_gather_sum", "Owners", "routed_gather_sum", "to_owners",
    "union_allreduce", "allreduce_at", "routed_sum_at", "union_of", "pack", "unpack", "packed_count",
    "start_pairs_gather", "PairsInFlight",
    "gather_decoded_mean", "Encoded", "gather_in_windows", "RowBytes", "windows", "table_limit", "chunks",
    "HeadSpan", "by_owner", "merged", "Run", "runs", "routed_windows", "encoded_windows",
]

_STATUS_LAYOUT_CHANGED = 1.0
_FIELDS = 6  # fingerprint, d, tensors, layout status, non-finite flag, count


class LayoutMismatchError(ValueError):
    """Gradients differ between ranks, or changed since the first step."""


class NonFiniteGradientError(FloatingPointError):
    """A compensated gradient holds NaN or Inf and the policy is ``nonfinite="raise"``."""


class SkipStep(Exception):
    """Raised inside a step that every rank abandons (``nonfinite="skip"``)."""

    def __init__(self, ranks: list[int]) -> None:
        super().__init__(f"non-finite gradient on rank(s) {ranks}")
        self.ranks = ranks


@dataclass
class Header:
    """What the handshake told every rank: per-rank counts and method extras (host tensors)."""

    counts: list[int]
    extras: torch.Tensor  # float64 [P, E]


def handshake(comm: Communicator, layout: Layout, *, finite: torch.Tensor | bool, count: int | torch.Tensor = 0,
              extras: Sequence[float | torch.Tensor] = (), problem: str | None = None,
              nonfinite: str = "raise") -> Header:
    """Exchange one row per worker and raise, on every rank alike, if the step cannot go on."""
    device = layout.device
    not_finite = torch.logical_not(torch.as_tensor(finite, device=device))
    parts = [layout.fingerprint, layout.numel, len(layout.shapes),
             _STATUS_LAYOUT_CHANGED if problem else 0.0, not_finite, count, *extras]
    row = torch.stack([torch.as_tensor(p, device=device).to(torch.float64).reshape(()) for p in parts])
    table = comm.all_gather(row).cpu()
    if problem is not None:
        raise LayoutMismatchError(f"rank {comm.rank}: {problem} (layout of the first step: {layout.describe()})")
    changed = [r for r in range(comm.size) if table[r, 3] == _STATUS_LAYOUT_CHANGED]
    if changed:
        raise LayoutMismatchError(f"rank(s) {changed} fed gradients whose layout changed since the first step; "
                                  f"every rank must reduce the same tensors in the same order")
    if (table[:, 0] != table[0, 0]).any():
        rows = "; ".join(f"rank {r}: {int(table[r, 2])} tensors, {int(table[r, 1])} elements, "
                         f"fingerprint {int(table[r, 0]):x}" for r in range(comm.size))
        raise LayoutMismatchError(f"gradient layouts differ between ranks ({rows}); every rank must reduce "
                                  f"tensors of the same shapes and dtype in the same order")
    bad = [r for r in range(comm.size) if table[r, 4] != 0]
    if bad:
        if nonfinite == "skip":
            raise SkipStep(bad)
        raise NonFiniteGradientError(
            f"non-finite values (NaN or Inf) in the compensated gradient on rank(s) {bad}; nothing was "
            f"exchanged and no residual was changed. Build the reducer with nonfinite='skip' to skip such "
            f"steps (counted in stats['skipped_steps']) instead")
    return Header(counts=[int(c) for c in table[:, 5].tolist()], extras=table[:, _FIELDS:])


def gather_counts(comm: Communicator, count: int, device: torch.device) -> list[int]:
    """Every worker's count (one small all-gather), for a step whose handshake came before
    its selection."""
    table = comm.all_gather(torch.tensor([count], dtype=torch.int64, device=device))
    return [int(c) for c in table.view(-1).tolist()]


def dense_allreduce_mean(comm: Communicator, flat: torch.Tensor) -> torch.Tensor:
    """Average ``flat`` over workers in place with one all-reduce."""
    comm.all_reduce_(flat)
    if comm.size > 1:
        flat.div_(comm.size)
    return flat


def _order(dtypes: Sequence[torch.dtype]) -> list[int]:
    """Parts are laid out widest element type first (stable), so that every part starts at an
    offset that is a multiple of its own element size."""
    return sorted(range(len(dtypes)), key=lambda i: -dtypes[i].itemsize)


def packed_count(dtypes: Sequence[torch.dtype], n: int) -> int:
    """``n``, rounded up (only where needed) so that a row of parts of ``n`` elements each is a
    multiple of the widest element size: rows stacked by an all-gather then stay aligned too.
    (int32 positions with float32 values never need padding; with float64 values n is even.)"""
    row, widest = sum(dt.itemsize for dt in dtypes), max((dt.itemsize for dt in dtypes), default=1)
    while (n * row) % widest:
        n += 1
    return n


def pack(parts: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """One byte row holding each 1-D part padded with zeros to ``packed_count(n)`` elements:
    the one wire format of every exchange of (index, value) pairs or index lists."""
    dtypes = [p.dtype for p in parts]
    n = packed_count(dtypes, n)
    device = parts[0].device
    sizes = [n * dt.itemsize for dt in dtypes]
    if all(p.numel() == n for p in parts):  # no padding: one concatenation
        return torch.cat([parts[i].contiguous().view(torch.uint8) for i in _order(dtypes)])
    row = torch.zeros(sum(sizes), dtype=torch.uint8, device=device)
    at = 0
    for i in _order(dtypes):
        row[at:at + sizes[i]].view(dtypes[i])[:parts[i].numel()] = parts[i]
        at += sizes[i]
    return row


def unpack(row: torch.Tensor, n: int, count: int, dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
    """The first ``count`` elements of each part of a row made by :func:`pack` (views), in the
    order of ``dtypes``."""
    n = packed_count(dtypes, n)
    out: list[torch.Tensor] = [torch.empty(0)] * len(dtypes)
    at = 0
    for i in _order(dtypes):
        size = n * dtypes[i].itemsize
        out[i] = row[at:at + size].view(dtypes[i])[:count]
        at += size
    return out


def union_of(indices: Sequence[torch.Tensor], d: int) -> torch.Tensor:
    """Sorted distinct positions of the concatenated ``indices`` (a vector of length ``d``)."""
    cat = torch.cat(list(indices)) if len(indices) != 1 else indices[0]
    if len(indices) == 1 and bool((cat[1:] > cat[:-1]).all()):  # one worker's sorted selection: itself
        return cat
    if cat.numel() * 16 < d:
        return torch.unique(cat)
    mask = torch.zeros(d, dtype=torch.bool, device=cat.device)
    mask[cat] = True
    positions = torch.nonzero(mask).view(-1)
    del mask  # d bytes, not held while the positions are narrowed
    return positions.to(cat.dtype)


class PairsInFlight:
    """Every worker's (index, value) pairs on their way (an all-gather started by
    :func:`start_pairs_gather`); :meth:`add_into` finishes the sparse gather-sum."""

    def __init__(self, comm: Communicator, pending: Pending | None, n: int, dtypes: tuple[torch.dtype, torch.dtype],
                 row: torch.Tensor | None = None):
        self.comm, self._pending, self.n, self.dtypes = comm, pending, n, dtypes
        self._row = row  # this worker's packed row, released once the gather is done (see release)

    def add_into(self, avg: torch.Tensor, counts: Sequence[int] | None = None) -> torch.Tensor:
        """Wait, add every worker's pairs into ``avg`` in rank order, divide by P where any
        arrived; returns the union of the positions. ``counts``: pairs per worker (default:
        every worker sent ``n``)."""
        if self._pending is None:
            return torch.empty(0, dtype=self.dtypes[0], device=avg.device)
        table = self._pending.wait()
        self._pending = None
        received = []
        for w, c in enumerate([self.n] * self.comm.size if counts is None else counts):
            if c:
                iw, vw = unpack(table[w], self.n, c, self.dtypes)
                avg.index_add_(0, iw, vw)  # int32 positions as they are (no int64 copy)
                received.append(iw)
        self._row = release(self._row)
        union = union_of(received, avg.numel()) if received else torch.empty(0, dtype=self.dtypes[0],
                                                                              device=avg.device)
        del table, received  # the gathered rows go before the division (unless the union is a view of them)
        if self.comm.size > 1 and union.numel():
            put_at(avg, union, avg.index_select(0, union).div_(self.comm.size))
        return union

    def wait(self) -> None:
        """Let the collective finish without using it (a step abandoned mid-way)."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        self._row = release(self._row)


def start_pairs_gather(comm: Communicator, idx: torch.Tensor, values: torch.Tensor, n: int) -> PairsInFlight:
    """Start the all-gather of this worker's (index, value) pairs, padded to ``n`` (the
    largest count of any worker; the same ``n`` on every worker)."""
    if not n:
        return PairsInFlight(comm, None, n, (idx.dtype, values.dtype))
    row = pack([idx, values], n)
    return PairsInFlight(comm, comm.all_gather_async(row), n, (idx.dtype, values.dtype), row)


def sparse_gather_sum(comm: Communicator, x: torch.Tensor, idx: torch.Tensor, counts: list[int],
                      avg: torch.Tensor, values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse gather-sum: all-gather every worker's (index, value) pairs, add them in rank
    order into the zeroed ``avg``, divide by P. Returns ``(avg, union of all indices)``.
    ``values``: ``x[idx]`` when the caller has it already (not gathered again)."""
    n = max(counts) if counts else 0
    if n == 0:
        return avg, idx[:0]
    return avg, start_pairs_gather(comm, idx, x[idx] if values is None else values, n).add_into(avg, counts)


class Owners:
    """Which worker needs which coordinates of the flat average: consecutive ``(start, end,
    worker)`` ranges tiling ``[0, d)`` (empty ones dropped). Every worker holds the same
    description, so each can tell where any position goes. FSDP (:mod:`sparsecomm.fsdp`): per
    parameter, rank r owns its dim-0 rows ``[r rows, (r + 1) rows)``."""

    def __init__(self, ranges: Sequence[tuple[int, int, int]], size: int) -> None:
        kept = [(int(a), int(b), int(w)) for a, b, w in ranges if b > a]
        end = 0
        for a, b, w in kept:
            if a != end or not 0 <= w < size:
                raise ValueError(f"Owners: ranges must tile [0, d) in order with workers in [0, {size}); "
                                 f"got ({a}, {b}, {w}) after {end}")
            end = b
        self.ranges, self.size, self.d = kept, int(size), end
        self._starts = torch.tensor([a for a, _, _ in kept], dtype=torch.int64)
        self._workers = torch.tensor([w for _, _, w in kept], dtype=torch.int64)
        self._on: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def owned(self, worker: int) -> list[tuple[int, int]]:
        """The ranges ``worker`` owns, in order."""
        return [(a, b) for a, b, w in self.ranges if w == worker]

    def numel(self, worker: int) -> int:
        return sum(b - a for a, b in self.owned(worker))

    def of(self, positions: torch.Tensor) -> torch.Tensor:
        """The owner (int64) of each position (all in ``[0, d)``)."""
        key = (positions.device, positions.dtype)
        if key not in self._on:
            self._on[key] = (self._starts.to(positions.device, positions.dtype), self._workers.to(positions.device))
        starts, workers = self._on[key]
        return workers[torch.searchsorted(starts, positions, right=True).sub_(1)]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Owners) and (self.ranges, self.size) == (other.ranges, other.size)

    def __repr__(self) -> str:
        return f"Owners({len(self.ranges)} ranges over {self.d} coordinates, {self.size} workers)"


_COUNT_BYTES = 8  # one int64 per destination in the table of counts routing needs first


def routed_gather_sum(comm: Communicator, x: torch.Tensor, idx: torch.Tensor, counts: list[int],
                      avg: torch.Tensor, owners: Owners,
                      values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The sparse gather-sum with each pair sent only to the worker that owns its position:
    ``avg`` (zeroed) gets the mean over workers at this worker's owned positions, bit for bit
    what :func:`sparse_gather_sum` puts there (the same pairs added in rank order, divided by
    P where any arrived), and stays 0 at the others. Returns ``(avg, positions of this
    worker's part that got a value (sorted), routed)``.

    Each worker splits its pairs by owner; one small all-gather gives every worker the table
    of counts (P int64 per worker) that sizes one all-to-all of positions and one of values
    (a worker's pairs for its own part do not travel). Where the all-gather of everyone's
    padded pairs moves no more bytes than that table (``n`` padded pairs x pair bytes <= 8 P,
    from the handshake's counts, so every rank decides alike), it is
    :func:`sparse_gather_sum` instead (``routed`` False; the whole average filled, the whole
    union returned). ``values``: ``x[idx]`` when the caller has it already."""
    P, me = comm.size, comm.rank
    if owners.d != avg.numel() or owners.size != P:
        raise ValueError(f"routed_gather_sum: {owners!r} for a vector of {avg.numel()} coordinates over {P} workers")
    n = max(counts) if counts else 0
    if n == 0:
        return avg, idx[:0], False
    values = x[idx] if values is None else values
    dtypes = (idx.dtype, values.dtype)
    if P == 1 or packed_count(dtypes, n) * sum(dt.itemsize for dt in dtypes) <= _COUNT_BYTES * P:
        return avg, start_pairs_gather(comm, idx, values, n).add_into(avg, counts), False
    dest = owners.of(idx)
    table = comm.all_gather(torch.bincount(dest, minlength=P)).cpu()  # [sender, receiver]
    travels = bool(table.sum() - table.diagonal().sum())  # the same on every rank
    received = []
    for iw, vw in to_owners(comm, dest, [idx, values], table[me].tolist(), table[:, me].tolist(), travels):
        if iw.numel():
            avg.index_add_(0, iw, vw)
            received.append(iw)
    union = union_of(received, avg.numel()) if received else idx[:0]
    if union.numel():
        put_at(avg, union, avg.index_select(0, union).div_(P))
    return avg, union, True


def to_owners(comm: Communicator, dest: torch.Tensor, parts: Sequence[torch.Tensor], send: list[int],
              recv: list[int], travels: bool) -> list[list[torch.Tensor]]:
    """Each element of ``parts`` (1-D, one element per entry of ``dest``) sent to the worker
    ``dest`` names, by one all-to-all per part: ``send[w]`` of this worker's elements go to w,
    ``recv[w]`` come from w (this worker's own entries: kept, not sent). ``travels``: whether
    any worker sends another anything (the same on every rank; False: no collective). Returns,
    for every worker in rank order, the elements of each part that this worker got from it
    (its own included), in the sender's order."""
    P, me = comm.size, comm.rank
    order = torch.argsort(dest, stable=True)  # by owner, each owner's elements in their order
    parts = [p.index_select(0, order) for p in parts]
    del order
    lo = sum(send[:me])
    hi = lo + send[me]
    send, recv = [0 if w == me else send[w] for w in range(P)], [0 if w == me else recv[w] for w in range(P)]
    got = [comm.all_to_all(torch.cat([p[:lo], p[hi:]]), send, recv) for p in parts] if travels else []
    out, at = [], 0
    for w in range(P):
        if w == me:
            out.append([p[lo:hi] for p in parts])
        else:
            out.append([g[at:at + recv[w]] for g in got] if recv[w] else [p[:0] for p in parts])
            at += recv[w]
    return out


def union_allreduce(comm: Communicator, x: torch.Tensor, idx: torch.Tensor, counts: list[int],
                    avg: torch.Tensor, disjoint: bool = False, extra: Sequence[torch.Tensor] = (),
                    owners: Owners | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Union all-reduce: all-gather indices, then all-reduce everyone's ``x`` at the union,
    written into the zeroed ``avg``. ``extra``: positions every worker already agrees on that
    join the union without travelling. With ``disjoint`` (exclusive partitions, no extra) the
    union is the plain concatenation in rank order. Returns ``(avg, union)``: every worker
    learns the whole union, routed or not. ``owners``: the values are summed by their owners
    only (:func:`allreduce_at`)."""
    n = max(counts) if counts else 0
    received = list(extra)
    if n:
        row = pack([idx], n)
        table = comm.all_gather(row)
        row = release(row)
        received = [unpack(table[w], n, c, (idx.dtype,))[0] for w, c in enumerate(counts) if c] + received
    if not received:
        return avg, idx[:0]
    union = torch.cat(received) if disjoint and not extra else union_of(received, x.numel())
    return allreduce_at(comm, x, union, avg, owners), union


def allreduce_at(comm: Communicator, x: torch.Tensor, positions: torch.Tensor, avg: torch.Tensor,
                 owners: Owners | None = None) -> torch.Tensor:
    """Write the mean over workers of ``x`` at ``positions`` (the same on all workers) into the
    zeroed ``avg``: one all-reduce of the values there, summed in the backend's order. With
    ``owners`` and several workers: :func:`routed_sum_at` (each value to its position's owner,
    summed in rank order, ``avg`` filled at this worker's owned positions only)."""
    values = x.index_select(0, positions)  # int32 positions as they are (no int64 copy)
    if owners is not None and comm.size > 1:
        routed_sum_at(comm, values, positions, avg, owners)
    else:
        comm.all_reduce_(values)
        put_at(avg, positions, values.div_(comm.size) if comm.size > 1 else values)
    release(values)
    return avg


def routed_sum_at(comm: Communicator, values: torch.Tensor, positions: torch.Tensor, avg: torch.Tensor,
                  owners: Owners) -> torch.Tensor:
    """The mean over workers of ``values`` (this worker's, one per entry of ``positions``, the
    same distinct positions on every worker, any order) written into the zeroed ``avg`` at the
    positions this worker owns, 0 left at the others; returns those owned positions (in the
    order of ``positions``). Each worker sends each owner its values at that owner's positions
    by one all-to-all (its own stay; no count travels: everyone knows the positions); the owner
    adds every worker's values, converted to ``avg``'s dtype, in rank order and divides by P.

    Against :func:`allreduce_at`'s all-reduce: the sum is in rank order where the all-reduce's
    is the backend's, so the two are bit-identical with 2 workers (a + b either way) and within
    float rounding with more (gloo's ring adds the chunks starting at different ranks). Against
    an all-gather of 16-bit values summed in rank order (:func:`~.wire.union_pairs`), bit for
    bit at any P. Bytes, for n positions of which this worker owns n_r: ``bytes_sent`` n - n_r
    values (the all-reduce: n), ``bytes_wire`` (P - 1) n_r (the ring's estimate: 2 (P - 1) / P
    n): (P - 1) n over all ranks, half the all-reduce's; one rank owning more than 2 / P of the
    positions receives more than the ring's estimate gives it."""
    P, me = comm.size, comm.rank
    if owners.d != avg.numel() or owners.size != P:
        raise ValueError(f"routed_sum_at: {owners!r} for a vector of {avg.numel()} coordinates over {P} workers")
    dest = owners.of(positions)
    per_owner = torch.bincount(dest, minlength=P).tolist()
    owned = positions[dest == me]
    received = to_owners(comm, dest, [values], per_owner, [per_owner[me]] * P, bool(positions.numel()))
    total = received[0][0].to(avg.dtype, copy=True)
    for (vw,) in received[1:]:
        total += vw.to(avg.dtype)
    put_at(avg, owned, total.div_(P))
    return owned


INDEX_CHUNK = 1 << 18
"""Positions converted to int64 at a time where an operator needs int64 indices
(``index_fill_``, ``index_put_``): 2 MiB, however many positions."""


def fill_at(x: torch.Tensor, positions: torch.Tensor, value: float | bool) -> torch.Tensor:
    """``x[positions] = value`` in place, converting int32 positions a piece at a time."""
    for a, b in chunks_of(positions):
        x.index_fill_(0, _long(positions[a:b]), value)
    return x


def put_at(x: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``x[positions] = values`` in place (distinct positions), converting int32 positions a
    piece at a time."""
    for a, b in chunks_of(positions):
        x[_long(positions[a:b])] = values[a:b]
    return x


def chunks_of(positions: torch.Tensor) -> list[tuple[int, int]]:
    """``(start, end)`` pieces of ``positions`` to convert to int64 at a time (int64: all at once)."""
    n = positions.numel()
    if positions.dtype == torch.int64:
        return [(0, n)] if n else []
    return chunks(n, INDEX_CHUNK)


def _long(positions: torch.Tensor) -> torch.Tensor:
    return positions if positions.dtype == torch.int64 else positions.to(torch.int64)


def release(tensor: torch.Tensor | None) -> None:
    """Free the memory of ``tensor`` (made here, sent by a finished collective) now. Gloo's
    worker thread keeps its last collective's input tensors until it runs the next one, i.e.
    into the next step, on whichever rank that thread ran: the row of (index, value) pairs
    (2x the gradient at 99% density) outlived the reduce on some ranks and not others.
    Emptying the storage releases the bytes whoever holds the tensor."""
    if tensor is not None:
        tensor.untyped_storage().resize_(0)
    return None


DECODE_CHUNK = 1 << 18
"""Coordinates decoded at a time by :func:`gather_decoded_mean` (1 MiB of float32): the
decoded temporaries stay this small however long the vector."""


def chunks(d: int, size: int = DECODE_CHUNK) -> list[tuple[int, int]]:
    """``[0, d)`` cut into consecutive ``(start, end)`` ranges of at most ``size`` (a multiple
    of 8, so that every range but the last starts and ends on a byte of packed codes)."""
    return [(a, min(a + size, d)) for a in range(0, d, size)]


TABLE_SHARE = 16
"""A gathered table of encoded rows holds at most 1/TABLE_SHARE of the gradient's bytes (1 +
IN_FLIGHT tables are alive at once: the one decoded and those on their way; gloo copies each
once more), or ``TABLE_MIN``."""
IN_FLIGHT = 2
"""Windows of a gathered row on their way at once (:func:`gather_in_windows`). With one, the
link idles while each window's collective starts: on 2 hosts joined by 100 Mbit/s a 16-bit
row of 2.4 MB in three windows took 1.47x the time of one all-reduce of it; with two, the
same as the all-reduce (docs/benchmarks.md, *Our 16-bit casts against PyTorch's*)."""
TABLE_MIN = 1 << 21
"""Tables of up to 2 MiB are allowed whatever the gradient's size: a small model's rows travel
in one all-gather or a few."""


@dataclass
class Encoded:
    """The part of one worker's encoded row in hand: its ``head`` (whole, e.g. per-tensor
    scales) and the ``body`` bytes that hold coordinates ``start`` onwards, ``width`` bits per
    coordinate (packed codes, :mod:`.bitpack`, or 16-bit values), ``start`` a multiple of 8."""

    head: torch.Tensor
    body: torch.Tensor
    start: int
    width: int

    def codes(self, a: int, b: int) -> torch.Tensor:
        """The packed codes of coordinates ``[a, b)`` (uint8)."""
        a, b = a - self.start, b - self.start
        a0 = a - a % 8  # groups of eight codes start on a byte
        return unpack_bits(self.body[a0 * self.width // 8:], b - a0, self.width)[a - a0:]

    def values(self, a: int, b: int, dtype: torch.dtype) -> torch.Tensor:
        """Coordinates ``[a, b)`` of a body of ``dtype`` values (a view)."""
        n = dtype.itemsize
        return self.body[(a - self.start) * n:(b - self.start) * n].view(dtype)


def table_limit(d: int, itemsize: int) -> int:
    """The most bytes one gathered table may hold, for a gradient of ``d`` elements of
    ``itemsize`` bytes: the larger of 1/TABLE_SHARE of it and TABLE_MIN."""
    return max(d * itemsize // TABLE_SHARE, TABLE_MIN)


def windows(ranges: Sequence[tuple[int, int]], head: int, width: int, size: int,
            limit: int) -> list[tuple[int, int, int, int, int]]:
    """Consecutive groups of ``ranges`` whose part of a row of ``size`` bytes (``head`` bytes,
    then ``width`` bits per coordinate, packed eight codes to ``width`` bytes) holds at most
    ``limit`` bytes where it can. A window ends where a range starts, preferably on a multiple
    of 8 coordinates (whole groups of codes: consecutive windows share no byte); where none came
    in time, at the last range start (the next window then starts at the group that holds it,
    so at most ``width`` bytes travel twice). Each is ``(first, last, lo, hi, start)``: ranges
    ``first`` to ``last - 1``, bytes ``[lo, hi)`` of the row, ``start`` the coordinate whose
    code is at byte ``lo`` (0 for the first window, which holds the head)."""
    out: list[tuple[int, int, int, int, int]] = []
    first, lo, start = 0, 0, 0
    whole = some = None  # the last range of this window that may start the next: on a group / anywhere
    for i, (a, b) in enumerate(ranges):
        if i > first:
            some = i
            if a % 8 == 0:
                whole = i
        if some is not None and head + (b * width + 7) // 8 - lo > limit:
            cut = whole if whole is not None else some
            at = ranges[cut][0]
            group = at - at % 8
            out.append((first, cut, lo, head + (at * width + 7) // 8, start))
            first, lo, start, whole, some = cut, head + group * width // 8, group, None, None
    if ranges:
        out.append((first, len(ranges), lo, size, start))
    return out


RowBytes = Callable[[int, int], torch.Tensor]
"""Bytes ``[lo, hi)`` of a row encoded on demand (a uint8 tensor of ``hi - lo`` bytes)."""


def in_flight(count: int, start: Callable[[int], Any], finish: Callable[[Any], Any]) -> Iterator[Any]:
    """``finish(start(j))`` for j in ``range(count)``, in order, with :data:`IN_FLIGHT` started
    ahead: item j is finished before item j + IN_FLIGHT is started, and handed over after it.
    The windowed exchanges' pipeline (:func:`gather_in_windows`, :func:`routed_windows`)."""
    pending = collections.deque(start(j) for j in range(min(IN_FLIGHT, count)))
    for j in range(count):
        done = finish(pending.popleft())
        if j + IN_FLIGHT < count:
            pending.append(start(j + IN_FLIGHT))
        yield done
        del done  # the caller is done with it: its table may go before the next wait


def gather_in_windows(comm: Communicator, row: torch.Tensor | RowBytes, head: int, width: int,
                      ranges: Sequence[tuple[int, int]], limit: int | None = None,
                      size: int | None = None) -> Iterator[tuple[Sequence[tuple[int, int]], list[Encoded]]]:
    """All-gather every worker's encoded ``row`` (the same length everywhere: ``head`` bytes,
    then ``width`` bits per coordinate of the ranges' vector) a window of ``ranges`` at a time
    (:func:`windows`, at most ``limit`` bytes of the table each; default :func:`table_limit`
    of a float32 vector as long), :data:`IN_FLIGHT` windows' all-gathers on their way while
    the current one is handed over. Yields ``(ranges of the window, every worker's Encoded part)``; the list of
    parts is emptied when the next window is asked for, so that its table can go.

    ``row``: the encoded row (1-D, any element type: its bytes travel), or a function giving
    its bytes ``[lo, hi)`` (:data:`RowBytes`), called for each window just before it is sent,
    with ``size``, the row's length in bytes: then the whole row never exists at once.

    What travels is the row itself, in one all-gather per window: the bytes of one all-gather
    of the whole row (plus at most ``width`` bytes for each window that :func:`windows` had to
    start inside a group of codes), with the table never larger than a window where the ranges
    allow it (the whole row's table is P rows, P/2 times the gradient for 16-bit rows)."""
    d = ranges[-1][1] if ranges else 0
    limit = table_limit(d, 4) if limit is None else limit  # callers pass their gradient's
    if isinstance(row, torch.Tensor):
        data = row.view(torch.uint8)  # its bytes, whatever its element type
        size, part = data.numel(), (lambda lo, hi: data[lo:hi])
    else:
        assert size is not None, "a row given as a function needs its size"
        part = row
    plan = windows(ranges, head, width, size, max(1, limit // comm.size))
    heads: torch.Tensor | None = None

    def send(j: int) -> tuple[Pending, torch.Tensor]:
        sent = part(plan[j][2], plan[j][3])
        return comm.all_gather_async(sent), sent

    def finish(started: tuple[Pending, torch.Tensor]) -> torch.Tensor:
        table = started[0].wait()
        if not isinstance(row, torch.Tensor):
            release(started[1])  # gloo keeps a collective's input until its next one
        return table

    for (first, last, lo, hi, start), table in zip(plan, in_flight(len(plan), send, finish)):
        if heads is None:
            heads = table[:, :head].clone()
            body = table[:, head:]
        else:
            body = table
        parts = [Encoded(heads[w], body[w], start, width) for w in range(comm.size)]
        yield ranges[first:last], parts
        parts.clear()  # the caller's list too: the table goes now (it may be shared: not released)
        del table, body


HeadSpan = Callable[[int, int], tuple[int, int]]
"""Bytes ``[lo, hi)`` of a row's head that decoding its coordinates ``[a, b)`` needs."""


def by_owner(ranges: Sequence[tuple[int, int]], owners: Owners) -> list[tuple[int, int, int]]:
    """``ranges`` (covering ``[0, d)`` in order) cut where the owner changes: ``(start, end,
    owner)`` in order, each inside one range and one owner's part."""
    out, own, j = [], owners.ranges, 0
    for a, b in ranges:
        while a < b:
            while own[j][1] <= a:
                j += 1
            end = min(b, own[j][1])
            out.append((a, end, own[j][2]))
            a = end
    return out


def merged(spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of byte spans ``(lo, hi)`` as sorted disjoint spans (empty ones dropped)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(s for s in spans if s[1] > s[0]):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


@dataclass
class Run:
    """Consecutive cut ranges of one window, ``first`` to ``last - 1``, that one worker,
    ``owner``, owns; their codes are the row's bytes ``[lo, hi)``, which start with the group
    of eight codes that holds the first range's start (coordinate ``start``, a multiple of 8)."""

    owner: int
    first: int
    last: int
    start: int
    lo: int
    hi: int


def runs(cut: Sequence[tuple[int, int, int]], first: int, last: int, head: int, width: int) -> list[Run]:
    """The :class:`Run` s of cut ranges ``first`` to ``last - 1`` (one window)."""
    out: list[Run] = []
    for i in range(first, last):
        a, b, w = cut[i]
        if out and out[-1].owner == w:
            out[-1].last, out[-1].hi = i + 1, head + (b * width + 7) // 8
        else:
            start = a - a % 8
            out.append(Run(w, i, i + 1, start, head + start * width // 8, head + (b * width + 7) // 8))
    return out


def routed_windows(comm: Communicator, row: torch.Tensor | RowBytes, head: int, width: int,
                   ranges: Sequence[tuple[int, int]], owners: Owners, head_span: HeadSpan | None = None,
                   limit: int | None = None,
                   size: int | None = None) -> Iterator[tuple[Sequence[tuple[int, int]], list, bool]]:
    """:func:`gather_in_windows` with each worker's row sent to each owner only where it covers
    the owner's coordinates (:class:`Owners`), by one all-to-all per window. The windows are
    those of the all-gather (of the ranges cut where the owner changes, :func:`by_owner`); in a
    window, each worker sends each other owner the bytes of that owner's runs (:func:`runs`:
    whole groups of eight codes, so a group cut by an owner boundary goes to both) and, in the
    first window, the bytes of its head that ``head_span`` says the owner's coordinates need
    (default: the whole head). What a worker sends and receives follows from the owners alone:
    no count travels, and a worker's own runs do not travel.

    Yields ``(ranges, parts, owned)`` run by run, every run of every window in order. ``owned``:
    the run is this worker's; ``parts`` then holds every worker's :class:`Encoded` part of it
    (a head is a full-length copy holding the bytes received, zero elsewhere). For the other
    runs ``parts`` holds this worker's own part only (None for the others), from which it can
    still decode its own vector (its residual). The list is emptied when the next run is asked
    for. A window's table (the bytes this worker receives) is at most (P - 1) / P of
    :func:`gather_in_windows`'s, the same windows' bound; as there, :data:`IN_FLIGHT` windows'
    all-to-alls are on their way while one is handed over."""
    P, me = comm.size, comm.rank
    d = ranges[-1][1] if ranges else 0
    limit = table_limit(d, 4) if limit is None else limit
    if isinstance(row, torch.Tensor):
        data = row.view(torch.uint8)
        size, part = data.numel(), (lambda lo, hi: data[lo:hi])
    else:
        assert size is not None, "a row given as a function needs its size"
        part = row
    cut = by_owner(ranges, owners)
    span = head_span or (lambda a, b: (0, head))
    needs = [merged([span(a, b) for a, b, w in cut if w == owner]) for owner in range(P)]
    heads: list[torch.Tensor] = []
    plan = windows([(a, b) for a, b, _ in cut], head, width, size, max(1, limit // P))

    def start(j: int) -> tuple[torch.Tensor, int, list[Run], RunsInFlight]:
        first, last, lo, hi, _ = plan[j]
        mine = part(lo, hi)
        if j == 0:
            heads[:] = [mine[:head].clone() if w == me else torch.zeros(head, dtype=torch.uint8, device=mine.device)
                        for w in range(P)]
        window = runs(cut, first, last, head, width)
        return mine, lo, window, _start_runs(comm, mine, lo, window, needs if j == 0 else None)

    def finish(started: tuple[torch.Tensor, int, list[Run], RunsInFlight]) -> tuple:
        mine, lo, window, runs_in_flight = started
        return mine, lo, window, runs_in_flight.finish(heads)

    for mine, lo, window, bodies in in_flight(len(plan), start, finish):
        for run in window:
            parts: list[Encoded | None] = [None] * P
            if run.owner == me:
                parts = [Encoded(heads[w], body, run.start, width) for w, body in enumerate(bodies.pop(0))]
            parts[me] = Encoded(heads[me], mine[run.lo - lo:run.hi - lo], run.start, width)
            yield [(a, b) for a, b, _ in cut[run.first:run.last]], parts, run.owner == me
            parts.clear()
        if not isinstance(row, torch.Tensor):
            release(mine)


@dataclass
class RunsInFlight:
    """One window's all-to-all on its way (:func:`_start_runs`): what arrives, and where."""

    pending: Pending
    sent: torch.Tensor
    own: list[int]
    needs: list[tuple[int, int]]
    me: int
    size: int

    def finish(self, heads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Wait for the window; the head spans it brought go into ``heads``. Returns, for each
        of this worker's own runs, every worker's bytes of it (its own: empty)."""
        got = self.pending.wait()
        release(self.sent)
        bodies: list[list[torch.Tensor]] = [[got[:0]] * self.size for _ in self.own]
        at = 0
        for w in range(self.size):
            if w == self.me:
                continue
            for a, b in self.needs:
                heads[w][a:b] = got[at:at + b - a]
                at += b - a
            for i, n in enumerate(self.own):
                bodies[i][w] = got[at:at + n]
                at += n
        return bodies


def _start_runs(comm: Communicator, mine: torch.Tensor, lo: int, window: list[Run],
                needs: list[list[tuple[int, int]]] | None) -> RunsInFlight:
    """Start one window's all-to-all (:func:`routed_windows`): to each other owner, this
    worker's bytes of its runs in ``mine`` (the row's bytes from ``lo``), after the head spans
    ``needs`` of that owner (the first window only; None after)."""
    P, me = comm.size, comm.rank
    pieces: list[list[torch.Tensor]] = [[] for _ in range(P)]
    for w in range(P):
        if w != me:
            pieces[w] += [mine[a:b] for a, b in (needs[w] if needs is not None else [])]
            pieces[w] += [mine[run.lo - lo:run.hi - lo] for run in window if run.owner == w]
    send = [sum(p.numel() for p in pieces[w]) for w in range(P)]
    own = [run.hi - run.lo for run in window if run.owner == me]
    mine_needs = needs[me] if needs is not None else []
    expect = sum(own) + sum(b - a for a, b in mine_needs)
    recv = [0 if w == me else expect for w in range(P)]
    flat = torch.cat([p for w in range(P) for p in pieces[w]] or [mine[:0]])
    return RunsInFlight(comm.all_to_all_async(flat, send, recv), flat, own, mine_needs, me, P)


def encoded_windows(comm: Communicator, row: torch.Tensor | RowBytes, head: int, width: int,
                    ranges: Sequence[tuple[int, int]], limit: int | None = None, size: int | None = None,
                    owners: Owners | None = None,
                    head_span: HeadSpan | None = None) -> Iterator[tuple[Sequence[tuple[int, int]], list, bool]]:
    """Every worker's encoded row, as ``(ranges, parts, owned)`` (see :func:`routed_windows`):
    routed to the owners where ``owners`` is given and there are several workers, else
    all-gathered (:func:`gather_in_windows`; every range then this worker's to decode)."""
    if owners is not None and comm.size > 1:
        if owners.d != (ranges[-1][1] if ranges else 0) or owners.size != comm.size:
            raise ValueError(f"routed exchange: {owners!r} for {len(ranges)} ranges over {comm.size} workers")
        yield from routed_windows(comm, row, head, width, ranges, owners, head_span, limit, size)
        return
    for window, parts in gather_in_windows(comm, row, head, width, ranges, limit, size):
        yield window, parts, True


def gather_decoded_mean(comm: Communicator, row: torch.Tensor | RowBytes,
                        decode: Callable[[Encoded, int, int], torch.Tensor], avg: torch.Tensor,
                        ranges: Sequence[tuple[int, int]] | None = None, residual: torch.Tensor | None = None,
                        *, head: int = 0, width: int = 8, limit: int | None = None,
                        size: int | None = None, owners: Owners | None = None,
                        head_span: HeadSpan | None = None) -> torch.Tensor:
    """Dense gather-sum of encoded rows: all-gather this worker's ``row`` (the same length on
    every worker; ``head`` bytes, then ``width`` bits per coordinate), add every worker's
    decoded vector into the zeroed ``avg`` in rank order, and divide by P. Every rank forms
    the same sums in the same order, so ``avg`` is bit-identical everywhere; what travels is
    the encoded row.

    ``decode(part, start, end)``: coordinates ``[start, end)`` of a worker's vector from its
    :class:`Encoded` part, decoded to ``avg``'s dtype. The vector is decoded range by range
    (``ranges``, covering ``[0, d)`` in order; default :func:`chunks`), all workers' rows for
    one range before the next, so no decoded temporary is larger than a range; the rows are
    gathered a window of ranges at a time (:func:`gather_in_windows`), so beyond ``row`` and
    ``avg`` the largest memory is 1 + :data:`IN_FLIGHT` windows' tables. ``residual``: this worker's compensated
    vector x, from which its own decoded vector q (what the others received from it) is
    subtracted in place, leaving the error-feedback residual x - q. ``row`` (a tensor or a
    function with ``size``, as for :func:`gather_in_windows`) is released (its storage
    emptied) once sent. Returns ``avg``.

    ``owners`` (several workers): routed (:func:`routed_windows`): each worker decodes only
    the coordinates it owns, from every worker's part of them, and ``avg`` holds the mean
    there, bit for bit, 0 elsewhere. ``decode`` is then also asked for sub-ranges of
    ``ranges`` (cut where the owner changes), and ``head_span(start, end)`` says which head
    bytes those coordinates need. The residual is the same: each worker decodes its own row
    everywhere, locally."""
    ranges = chunks(avg.numel()) if ranges is None else ranges
    limit = table_limit(avg.numel(), avg.element_size()) if limit is None else limit
    for window, parts, owned in encoded_windows(comm, row, head, width, ranges, limit, size, owners, head_span):
        for a, b in window:
            if owned:
                _add_decoded(avg[a:b], parts, decode, a, b, comm.rank, residual)
            elif residual is not None:
                residual[a:b].sub_(decode(parts[comm.rank], a, b))
    if isinstance(row, torch.Tensor):
        release(row)
    return avg


def _add_decoded(part: torch.Tensor, parts: list[Encoded], decode: Callable[[Encoded, int, int], torch.Tensor],
                 a: int, b: int, me: int, residual: torch.Tensor | None) -> None:
    """``part`` (coordinates ``[a, b)`` of the zeroed average) := the mean of every worker's
    decoded ``parts``, added in rank order; this worker's own decoded part subtracted from
    ``residual`` where given."""
    for w, encoded in enumerate(parts):
        decoded = decode(encoded, a, b)
        part.add_(decoded)
        if residual is not None and w == me:
            residual[a:b].sub_(decoded)
    if len(parts) > 1:
        part.div_(len(parts))
