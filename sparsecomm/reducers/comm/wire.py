"""Wire formats of the sparse exchanges: how the (index, value) pairs of the sparse methods
travel, and how far that is from the information floor.

Two options, on every method built on :class:`~sparsecomm.reducers.methods.sparse_base.SparseReducer`
(``topk``, ``global_topk``, ``thresh``, ``sage``, ``accordion``, ``legacy``) and on the
partitioned ones (``micro``, ``exdyna``):

``values``
    ``"full"`` (default): values travel in the gradients' own dtype, as before. ``"fp16"`` /
    ``"bf16"``: each value is rounded to 16 bits before it travels (clamped to the format's
    largest finite value first, so nothing becomes infinite). What a worker *sent* is the
    rounded value, so its residual keeps ``x - rounded`` at those positions (exact: the
    difference of a float32 value and its own rounding is a float32 number), and the
    conservation identity holds as with full values. Under union all-reduce the 16-bit values
    are all-gathered (not all-reduced: a 16-bit sum would round at every hop) and summed in
    float32 in rank order; ``bytes_sent`` is the same as an all-reduce of them, the ring
    estimate ``bytes_wire`` is (P - 1) n instead of 2 (P - 1)/P n.

``indices``
    ``"int32"`` (default): one int32 per position (int64 when d >= 2**31), as before.
    ``"bitmap"``: one bit per position of the span a worker selects from (the whole vector,
    or its partition for ``micro``/``exdyna``). ``"delta"``: the sorted positions in
    Elias-Fano form: the low ``L = floor(log2(span / n))`` bits of each position at fixed
    width, and the gaps between the high parts in unary (``n + span / 2**L`` bits), about
    ``2 + log2(span / n)`` bits per position, at most 2 bits above log2 C(span, n) / n.
    ``"auto"``: whichever of the three is smallest for this step's largest count ``n``.
    Every parameter (``n``: the largest count of any worker, from the handshake; the span: the
    largest partition) is known to every rank before the exchange, so all rows have one length
    and every rank decodes the same positions. Positions travel sorted; the values travel in
    that order.

The bytes counted by the communicator are those of the encoded rows, padding included.
:func:`floor_bits` is the information floor a step is compared with (``wire_floor_bytes``
in the stats; ``bytes_sent / wire_floor_bytes`` is the ratio bench/reducers.py reports).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ...validate import choice
from .bitpack import pack_bits, unpack_bits
from .communicator import Communicator
from .exchange import Owners, allreduce_at, pack, routed_sum_at, union_of, unpack

__all__ = ["VALUE_FORMATS", "INDEX_FORMATS", "WireFormat", "floor_bits", "index_bytes", "encode_positions",
           "decode_positions", "gather_pairs", "union_pairs"]

VALUE_FORMATS = ("full", "fp16", "bf16")
INDEX_FORMATS = ("int32", "bitmap", "delta", "auto")
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def floor_bits(span: int, k: int, values: int, value_bits: int) -> float:
    """log2 C(span, k) (which k-subset of the span was chosen) plus ``values * value_bits``."""
    if k <= 0 or k >= span:
        return float(values * value_bits)
    ln = math.lgamma(span + 1) - math.lgamma(k + 1) - math.lgamma(span - k + 1)
    return ln / math.log(2) + values * value_bits


def _low_width(n: int, span: int) -> int:
    """Elias-Fano's low-bit width for n positions below ``span``."""
    return max(0, (span // n).bit_length() - 1) if n and span > n else 0


def index_bytes(kind: str, n: int, span: int, itemsize: int = 4) -> int:
    """Bytes of ``n`` positions below ``span`` in format ``kind`` (``int32``: ``itemsize`` each)."""
    if n == 0:
        return 0
    if kind == "int32":
        return n * itemsize
    if kind == "bitmap":
        return (span + 7) // 8
    if kind == "delta":
        low = _low_width(n, span)
        return (n * low + 7) // 8 + (n + ((span - 1) >> low) + 1 + 7) // 8
    raise ValueError(f"unknown index format {kind!r}")


def _pack_fixed(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Codes of ``width`` bits (any width), least significant bit first, one bit stream."""
    if width == 0 or codes.numel() == 0:
        return torch.empty(0, dtype=torch.uint8, device=codes.device)
    shifts = torch.arange(width, device=codes.device)
    bits = (codes.to(torch.int64).unsqueeze(1) >> shifts).bitwise_and_(1).to(torch.uint8)
    return pack_bits(bits.view(-1), 1)


def _unpack_fixed(data: torch.Tensor, n: int, width: int) -> torch.Tensor:
    if width == 0 or n == 0:
        return torch.zeros(n, dtype=torch.int64, device=data.device)
    shifts = torch.arange(width, device=data.device)
    bits = unpack_bits(data, n * width, 1).view(n, width).to(torch.int64)
    return (bits << shifts).sum(1)


def _bitset(positions: torch.Tensor, length: int) -> torch.Tensor:
    mask = torch.zeros(length, dtype=torch.uint8, device=positions.device)
    mask[positions] = 1
    return pack_bits(mask, 1)


def encode_positions(positions: torch.Tensor, kind: str, n: int, span: int) -> torch.Tensor:
    """``positions`` (sorted, distinct, in ``[0, span)``, at most ``n`` of them) as
    ``index_bytes(kind, n, span)`` bytes; ``kind`` is ``bitmap`` or ``delta``."""
    size = index_bytes(kind, n, span)
    positions = positions.to(torch.int64)
    if kind == "bitmap":
        return _bitset(positions, span)[:size] if n else positions.new_empty(0, dtype=torch.uint8)
    if kind != "delta":
        raise ValueError(f"encode_positions: {kind!r} is not bitmap or delta")
    if n == 0:
        return torch.empty(0, dtype=torch.uint8, device=positions.device)
    low = _low_width(n, span)
    lows = _pack_fixed(positions & ((1 << low) - 1), low)
    low_bytes = (n * low + 7) // 8
    lows = torch.cat([lows, lows.new_zeros(low_bytes - lows.numel())])
    high = (positions >> low) + torch.arange(positions.numel(), device=positions.device)
    return torch.cat([lows, _bitset(high, n + ((span - 1) >> low) + 1)])


def decode_positions(data: torch.Tensor, count: int, kind: str, n: int, span: int) -> torch.Tensor:
    """The ``count`` sorted positions (int64) encoded by :func:`encode_positions`."""
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=data.device)
    if kind == "bitmap":
        return torch.nonzero(unpack_bits(data, span, 1)).view(-1)[:count]
    low = _low_width(n, span)
    low_bytes = (n * low + 7) // 8
    lows = _unpack_fixed(data[:low_bytes], count, low)
    ones = torch.nonzero(unpack_bits(data[low_bytes:], n + ((span - 1) >> low) + 1, 1)).view(-1)[:count]
    high = ones - torch.arange(count, device=data.device)
    return (high << low) | lows


class WireFormat:
    """The ``values`` and ``indices`` options of a sparse method (see the module docstring)."""

    def __init__(self, values: str = "full", indices: str = "int32") -> None:
        self.values = choice("values", values, VALUE_FORMATS)
        self.indices = choice("indices", indices, INDEX_FORMATS)

    @property
    def default(self) -> bool:
        return self.values == "full" and self.indices == "int32"

    def options(self) -> dict[str, Any]:
        """The options that differ from the default: a reducer's ``options()`` (and so its saved
        states and run records) stay what they were before these options existed."""
        return {k: v for k, v in (("values", self.values), ("indices", self.indices))
                if v != {"values": "full", "indices": "int32"}[k]}

    def value_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return _HALF.get(self.values, dtype)

    def value_bits(self, dtype: torch.dtype) -> int:
        return self.value_dtype(dtype).itemsize * 8

    def encode_values(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(what travels, what is kept)``: the values as sent, and ``v`` minus their decoded
        form (None when nothing is lost)."""
        wire = self.value_dtype(v.dtype)
        if wire == v.dtype:
            return v, None
        big = torch.finfo(wire).max
        sent = (v.clamp(-big, big) if big < torch.finfo(v.dtype).max else v).to(wire)
        return sent, v - sent.to(v.dtype)

    def index_kind(self, n: int, span: int, itemsize: int = 4) -> str:
        """The format positions travel in for the largest count ``n`` (``auto`` resolved)."""
        if self.indices != "auto":
            return self.indices
        return min(("int32", "delta", "bitmap"), key=lambda k: index_bytes(k, n, span, itemsize))


def _spans(spans: Sequence[tuple[int, int]] | None, size: int, d: int) -> list[tuple[int, int]]:
    return [(0, d)] * size if spans is None else list(spans)


def _align(row: torch.Tensor, unit: int) -> torch.Tensor:
    extra = -row.numel() % unit
    return torch.cat([row, row.new_zeros(extra)]) if extra else row


def gather_pairs(comm: Communicator, x: torch.Tensor, idx: torch.Tensor, counts: Sequence[int], avg: torch.Tensor,
                 fmt: WireFormat, spans: Sequence[tuple[int, int]] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sparse gather-sum in format ``fmt``: every worker's pairs all-gathered in one row each,
    added into the zeroed ``avg`` in rank order, divided by P. ``spans``: the range each rank
    selects from (default the whole vector). Returns ``(avg, union, sent positions, kept)``:
    this worker's residual at the sent positions is ``kept`` (None: zero)."""
    n = max(counts) if counts else 0
    if n == 0:
        return avg, idx[:0], idx[:0], None
    spans = _spans(spans, comm.size, x.numel())
    width = max(b - a for a, b in spans)
    kind = fmt.index_kind(n, width, idx.element_size())
    if kind != "int32":
        idx = torch.sort(idx).values
    sent, kept = fmt.encode_values(x[idx])
    vdtype = sent.dtype
    if kind == "int32":
        row = pack([idx, sent], n)
    else:
        values = torch.zeros(n, dtype=vdtype, device=x.device)
        values[:sent.numel()] = sent
        start = spans[comm.rank][0]
        row = _align(torch.cat([values.view(torch.uint8), encode_positions(idx - start, kind, n, width)]),
                     vdtype.itemsize)
    table = comm.all_gather(row)
    received = []
    for w, c in enumerate(counts):
        if not c:
            continue
        if kind == "int32":
            iw, vw = unpack(table[w], n, c, (idx.dtype, vdtype))
        else:
            vw = table[w][:n * vdtype.itemsize].view(vdtype)[:c]
            iw = decode_positions(table[w][n * vdtype.itemsize:], c, kind, n, width).add_(spans[w][0])
        avg.index_add_(0, iw, vw.to(avg.dtype))
        received.append(iw)
    union = union_of([r.to(idx.dtype) for r in received], avg.numel())
    if comm.size > 1 and union.numel():
        avg[union] = avg[union] / comm.size
    return avg, union, idx, kept


def union_pairs(comm: Communicator, x: torch.Tensor, idx: torch.Tensor, counts: Sequence[int], avg: torch.Tensor,
                fmt: WireFormat, spans: Sequence[tuple[int, int]] | None = None, disjoint: bool = False,
                owners: Owners | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Union all-reduce in format ``fmt``: positions all-gathered (encoded), then everyone's
    values at the union: all-reduced at full width, or, as 16-bit values, all-gathered and
    summed in float32 in rank order. Returns ``(avg, union, kept)``: this worker's residual at
    the union is ``kept`` (None: zero). ``owners`` (several workers): the positions still reach
    everyone, the values (full or 16-bit) only their owners (:func:`~.exchange.routed_sum_at`),
    which sum them in rank order: ``avg`` is filled at this worker's owned positions only, bit
    for bit the 16-bit all-gather's sum there (full values: see :func:`~.exchange.allreduce_at`)."""
    n = max(counts) if counts else 0
    if n == 0:
        return avg, idx[:0], None
    spans = _spans(spans, comm.size, x.numel())
    width = max(b - a for a, b in spans)
    kind = fmt.index_kind(n, width, idx.element_size())
    if kind == "int32":
        table = comm.all_gather(pack([idx], n))
        received = [unpack(table[w], n, c, (idx.dtype,))[0] for w, c in enumerate(counts) if c]
    else:
        start = spans[comm.rank][0]
        table = comm.all_gather(encode_positions(torch.sort(idx).values - start, kind, n, width))
        received = [decode_positions(table[w], c, kind, n, width).add_(spans[w][0]).to(idx.dtype)
                    for w, c in enumerate(counts) if c]
    union = torch.cat(received) if disjoint else union_of(received, x.numel())
    sent, kept = fmt.encode_values(x[union])
    if kept is None:
        return allreduce_at(comm, x, union, avg, owners), union, None
    if owners is not None and comm.size > 1:
        routed_sum_at(comm, sent, union, avg, owners)
        return avg, union, kept
    rows = comm.all_gather(sent)
    total = rows[0].to(avg.dtype)
    for w in range(1, comm.size):
        total += rows[w].to(avg.dtype)
    avg[union] = total / comm.size if comm.size > 1 else total
    return avg, union, kept
