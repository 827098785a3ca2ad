"""Quantizers: every coordinate travels, in a few bits (QSGD, TernGrad, scaled sign with error
feedback, sign with majority vote).

Common to the family: each worker encodes its compensated vector x into one byte row (scales
first, then bit-packed codes, see :mod:`~sparsecomm.reducers.comm.bitpack`), the rows are
all-gathered a window at a time, and every rank decodes them and adds them in rank order
(:func:`~sparsecomm.reducers.comm.exchange.gather_decoded_mean`, range by range, so no decoded
temporary is larger than a range and no gathered table larger than a window), so the average
is bit-identical everywhere and ``bytes_sent`` is the packed row itself.

Routed (:meth:`~sparsecomm.reducers.base.Reducer.route_to`, FSDP2; every method of the family):
each worker sends each owner only the groups of codes that cover the owner's coordinates, and
the scales of the head they need (QSGD: their buckets' norms; EF-SignSGD and signSGD: their
tensors' scales), by one all-to-all per window
(:func:`~sparsecomm.reducers.comm.exchange.routed_windows`); each owner decodes only its own
coordinates, from every worker in rank order, bit for bit as unrouted, and the rest of the
average stays 0. Each worker still decodes its own row everywhere, so the residual is the
same. ``bytes_sent`` is then what this worker hands to the all-to-alls, ``bytes_wire`` what it
receives; stats ``routed`` and ``shard_density`` (1: every owned coordinate gets a value).

Error feedback: ``efsignsgd`` keeps ``x - q`` as its residual, q being this worker's own
decoded row, so nothing is lost. ``qsgd`` and ``terngrad`` are unbiased (E q = x) and, as in
their papers, keep no residual whatever ``error_feedback`` says (like ``exact``): error
feedback needs a compressor whose error is smaller than the signal, and theirs is not at
these bit widths (their variance exceeds ||x||^2), so a residual grows without bound (QSGD
with 7 levels, 512-buckets: residual norm x 4e4 in 200 steps on Gaussian gradients). Their
average is the mean of what the workers hold in expectation only, so the conservation
identity does not apply to them (``conserves`` is False); the tests check the expectation
instead. ``signsgd`` is a vote (see there).

Scales and codes are computed in float32 (float64 for float64 gradients); decoded values are
rounded once to the gradient's dtype. ``density`` is not used: every coordinate gets a value
(``density`` = 1); ``payload_ratio`` is the bytes of the row over the bytes of the dense
gradient, ``bits_per_coordinate`` the same in bits.

Stochastic rounding draws one uniform number per coordinate from a generator on the
gradients' device seeded with ``seed * 65537 + rank``: each worker has its own stream (the
rounding noise of different workers is independent, so it averages out), reproducible and
saved in the state. CPU and CUDA streams of one seed differ.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import Any, Callable

import torch

from ...validate import choice, number, positive_int
from ..base import ReduceCall, Reducer
from ..comm.bitpack import code_width, pack_bits, packed_bytes
from ..comm.exchange import (DECODE_CHUNK, Encoded, Header, chunks, encoded_windows, gather_decoded_mean,
                             release, table_limit)
from ..layout import Layout
from ..registry import register

__all__ = ["QuantizedReducer", "QSGD", "TernGrad", "EFSignSGD", "SignSGD", "stream_seed", "per_tensor",
           "mean_magnitudes"]


def stream_seed(seed: int, rank: int) -> int:
    """The seed of worker ``rank``'s rounding stream."""
    return seed * 65_537 + rank


def per_tensor(x: torch.Tensor, layout: Layout, fn: Callable[[torch.Tensor], torch.Tensor],
               dtype: torch.dtype) -> torch.Tensor:
    """``fn`` of every tensor's segment of the flat ``x`` (0 for empty tensors), stacked on x's
    device without a host round-trip."""
    out = torch.zeros(len(layout.shapes), dtype=dtype, device=x.device)
    for i, (a, b) in enumerate(layout.segments):
        if b > a:
            out[i] = fn(x[a:b])
    return out


def mean_magnitudes(x: torch.Tensor, layout: Layout, dtype: torch.dtype) -> torch.Tensor:
    """Every tensor's ||x||_1 / n (0 for empty tensors), in ``dtype``."""
    return per_tensor(x, layout, lambda t: torch.linalg.vector_norm(t, 1, dtype=dtype) / t.numel(), dtype)


def _bytes_of(values: torch.Tensor) -> torch.Tensor:
    return values.contiguous().view(torch.uint8)


def _values_of(row: torch.Tensor, count: int, dtype: torch.dtype, first: int = 0) -> torch.Tensor:
    """Values ``first`` to ``first + count`` of ``dtype`` at the start of a byte row (copied, so
    that a row of a gathered table need not be aligned)."""
    return row[first * dtype.itemsize:(first + count) * dtype.itemsize].clone().view(dtype)


def _scale_span(i: int, dtype: torch.dtype) -> tuple[int, int]:
    """The bytes of tensor ``i``'s scale in a head of one ``dtype`` scale per tensor."""
    return i * dtype.itemsize, (i + 1) * dtype.itemsize


def _row(head: torch.Tensor | None, d: int, width: int, device: torch.device) -> torch.Tensor:
    """An uninitialised byte row: ``head``'s bytes (scales), then room for d packed codes."""
    at = 0 if head is None else head.numel() * head.element_size()
    row = torch.empty(at + packed_bytes(d, width), dtype=torch.uint8, device=device)
    if head is not None:
        row[:at] = _bytes_of(head)
    return row


def _pack_into(row: torch.Tensor, at: int, d: int, width: int,
               codes: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """Fill ``row[at:]`` with the d codes packed (as ``pack_bits`` of all of them would), range by
    range: ``codes(a, b)`` gives codes a to b. Ranges start on multiples of 8 codes, so each
    packs into whole bytes of its own and only the last one is padded."""
    for a, b in chunks(d):
        part = pack_bits(codes(a, b), width)
        start = at + a * width // 8
        row[start:start + part.numel()] = part
    return row


class QuantizedReducer(Reducer):
    """Family base: :meth:`_prepare` (before the handshake; per-worker figures that ride on it),
    :meth:`_encode` (after it: the byte row: :meth:`_head` bytes of scales, then codes of
    ``width`` bits per coordinate) and :meth:`_decode` (a row's part back to a flat vector of
    the gradients' dtype) define a method. ``conserves``: whether the average is the mean of
    what the workers hold up to what the residuals keep (the conservation identity)."""

    uses_density = False
    conserves = True
    random_rounding = False  # True: the method draws one uniform number per coordinate
    width = 8  # bits per coordinate on the wire

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        self._generator: torch.Generator | None = None

    def _configure(self, layout: Layout) -> None:
        self._cdtype = torch.float64 if layout.dtype == torch.float64 else torch.float32
        # every tensor cut into ranges of at most DECODE_CHUNK: (start, end, tensor)
        self._pieces = [(a + s, min(a + s + DECODE_CHUNK, b), i) for i, (a, b) in enumerate(layout.segments)
                        for s in range(0, b - a, DECODE_CHUNK)]
        self._starts = [a for a, _, _ in self._pieces]  # sorted: the tensor of any coordinate
        if self.random_rounding:
            self._generator = torch.Generator(device=layout.device)
            self._generator.manual_seed(stream_seed(self.seed, self.rank))

    def _uniform(self, call: ReduceCall) -> torch.Tensor:
        """d uniform numbers on [0, 1) from this worker's stream, drawn into the step's scratch
        buffer when it has their dtype (no per-step allocation)."""
        assert self._generator is not None
        if call.layout.dtype == self._cdtype:
            return torch.rand(call.d, generator=self._generator, out=call.scratch())
        return torch.rand(call.d, generator=self._generator, dtype=self._cdtype, device=call.layout.device)

    def _prepare(self, call: ReduceCall) -> list[torch.Tensor]:
        return []

    def _encode(self, call: ReduceCall, header: Header) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, row: Encoded, a: int, b: int) -> torch.Tensor:
        """Coordinates ``[a, b)`` (one of :meth:`_ranges`) of the vector encoded in ``row``."""
        raise NotImplementedError

    def _head(self) -> int:
        """Bytes of scales at the start of every row."""
        return 0

    def _head_span(self, a: int, b: int) -> tuple[int, int]:
        """The bytes of the head that decoding coordinates ``[a, b)`` (inside one tensor) needs:
        all of it unless a method says less (what a routed exchange sends each owner)."""
        return 0, self._head()

    def _tensor_of(self, a: int) -> int:
        """The tensor that holds coordinate ``a`` (of a non-empty tensor)."""
        return self._pieces[bisect_right(self._starts, a) - 1][2]

    def _ranges(self) -> list[tuple[int, int]]:
        """The ranges :meth:`_decode` is asked for, in order: pieces of single tensors."""
        return [(a, b) for a, b, _ in self._pieces]

    def _run(self, call: ReduceCall) -> torch.Tensor:
        with call.phase("select"):
            extras = self._prepare(call)
        header = call.handshake(count=call.d, extras=extras)
        with call.phase("select"):
            row = self._encode(call, header)
        sent = row.numel()
        with call.phase("comm"):
            avg = gather_decoded_mean(self.comm, row, self._decode, call.output(), self._ranges(),
                                      residual=call.x if call.error_feedback else None, head=self._head(),
                                      width=self.width, owners=self.owners, head_span=self._head_span)
        call.commit_subtracted()
        call.counted_dense(self.owners, self.comm.size > 1)
        call.stats.update(payload_ratio=call.fraction(sent / call.layout.dtype.itemsize),
                          bits_per_coordinate=call.fraction(8.0 * sent))
        return avg

    def _method_state(self) -> dict[str, Any]:
        return {} if self._generator is None else {"generator": self._generator.get_state()}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        if self._generator is not None:
            self._generator.set_state(state["generator"])


@register
class QSGD(QuantizedReducer):
    """QSGD (Alistarh, Grubic, Li, Tomioka & Vojnovic, NeurIPS 2017): stochastic rounding to
    ``levels`` (s) levels of a bucket's L2 norm. For a bucket v (``bucket_size`` consecutive
    coordinates of one tensor; the whole tensor when ``bucket_size`` is None) and r_i =
    |v_i| s / ||v||_2, the level is floor(r_i) + 1 with probability r_i - floor(r_i), else
    floor(r_i), and the value sent is ||v||_2 sgn(v_i) level / s: unbiased, E q = v.

    Wire format per worker: the buckets' norms (float32, float64 for float64 gradients), then
    one fixed-width code per coordinate, the signed level offset by s, ``sgn(v_i) level + s``
    in [0, 2 s], of ceil(log2(2 s + 1)) bits: 4 bits with the default s = 7 (``levels`` from 1
    to 127, codes of at most 8 bits). The paper's Elias coding of the levels is not used: a
    fixed width keeps every worker's row the same length, so one all-gather moves them without
    padding or a count exchange. Buckets never cross tensor boundaries; a tensor's last bucket
    may be shorter. A bucket whose norm is 0 sends level 0 everywhere. A level can only exceed
    s through float rounding of the norm; it is clamped to s."""

    name = "qsgd"
    per_tensor = True  # norms of buckets inside a tensor; codes per coordinate
    summary = "stochastic rounding to s levels of each bucket's norm, packed codes (QSGD; unbiased, no residual)"
    random_rounding = True
    compensates = False
    conserves = False  # unbiased: the mean of what the workers hold in expectation only

    def __init__(self, *, levels: int = 7, bucket_size: int | None = 512, **common: Any) -> None:
        self.levels = positive_int("levels", levels, "quantization levels s, at most 127")
        if self.levels > 127:
            raise ValueError(f"levels must be at most 127 (codes of at most 8 bits), got {levels!r}")
        self.bucket_size = None if bucket_size is None else positive_int(
            "bucket_size", bucket_size, "coordinates per norm, or None for one norm per tensor")
        self.width = code_width(2 * self.levels)
        super().__init__(**common)

    def options(self) -> dict[str, Any]:
        return {"levels": self.levels, "bucket_size": self.bucket_size}

    def _configure(self, layout: Layout) -> None:
        super()._configure(layout)
        self._plan = []  # per tensor: (start, full buckets, bucket size, tail length, first bucket)
        buckets = 0
        for a, b in layout.segments:
            n = b - a
            size = self.bucket_size or max(n, 1)
            full, tail = divmod(n, size)
            self._plan.append((a, full, size, tail, buckets))
            buckets += full + (1 if tail else 0)
        self._buckets = buckets
        # the plan in ranges of at most DECODE_CHUNK coordinates (or one bucket):
        # (start, end, first bucket, whole buckets in it; 0 for a tensor's short last bucket)
        self._bucket_pieces = []
        for a, full, size, tail, j in self._plan:
            rows = max(1, DECODE_CHUNK // size)
            for r in range(0, full, rows):
                n = min(rows, full - r)
                self._bucket_pieces.append((a + r * size, a + (r + n) * size, j + r, n))
            if tail:
                self._bucket_pieces.append((a + full * size, a + full * size + tail, j + full, 0))
        self._piece_at = {p[0]: p for p in self._bucket_pieces}

    def _ranges(self) -> list[tuple[int, int]]:
        return [(a, b) for a, b, _, _ in self._bucket_pieces]

    def _norms(self, x: torch.Tensor) -> torch.Tensor:
        norms = torch.zeros(self._buckets, dtype=self._cdtype, device=x.device)
        for a, full, size, tail, j in self._plan:
            if full:
                norms[j:j + full] = torch.linalg.vector_norm(x[a:a + full * size].view(full, size), dim=1,
                                                             dtype=self._cdtype)
            if tail:
                norms[j + full] = torch.linalg.vector_norm(x[a + full * size:a + full * size + tail],
                                                           dtype=self._cdtype)
        return norms

    def _encode(self, call: ReduceCall, header: Header) -> torch.Tensor:
        x, s, cdtype = call.x, self.levels, self._cdtype
        norms = self._norms(x)
        inverse = torch.where(norms > 0, s / norms, torch.zeros_like(norms))
        u = self._uniform(call)
        codes = torch.empty(call.d, dtype=torch.uint8, device=x.device)
        for a, b, j, rows in self._bucket_pieces:  # a few buckets at a time: small temporaries
            r = x[a:b].abs().to(cdtype)  # |v_i| s / ||v||
            if rows:
                r.view(rows, -1).mul_(inverse[j:j + rows, None])
            else:
                r.mul_(inverse[j])
            level = torch.floor(r)
            up = u[a:b] < r.sub_(level)  # with probability r - floor(r)
            level = level.add_(up).clamp_(max=s)
            codes[a:b] = torch.copysign(level, x[a:b].to(cdtype)).add_(s)
        row = _row(norms, call.d, self.width, x.device)
        return _pack_into(row, self._buckets * cdtype.itemsize, call.d, self.width, lambda a, b: codes[a:b])

    def _head(self) -> int:
        return self._buckets * self._cdtype.itemsize

    def _buckets_of(self, a: int, b: int) -> tuple[int, torch.Tensor | None]:
        """The first bucket of coordinates ``[a, b)`` (inside one tensor) and how many of
        them each of its buckets holds (None where the range is one of :meth:`_ranges`:
        whole buckets, or a tensor's short last one)."""
        piece = self._piece_at.get(a)
        if piece is not None and piece[1] == b:
            return piece[2], None
        start, _, size, _, j = self._plan[self._tensor_of(a)]
        first, last = (a - start) // size, (b - 1 - start) // size
        edges = torch.arange(first + 1, last + 1, dtype=torch.int64) * size + start
        counts = torch.diff(torch.cat([torch.tensor([a]), edges, torch.tensor([b])]))
        return j + first, counts

    def _head_span(self, a: int, b: int) -> tuple[int, int]:
        first, counts = self._buckets_of(a, b)
        n = (self._piece_at[a][3] or 1) if counts is None else counts.numel()
        return first * self._cdtype.itemsize, (first + n) * self._cdtype.itemsize

    def _decode(self, row: Encoded, a: int, b: int) -> torch.Tensor:
        cdtype = self._cdtype
        j, counts = self._buckets_of(a, b)
        values = row.codes(a, b).to(cdtype).sub_(self.levels)
        if counts is not None:  # part of a piece (routed): each coordinate times its bucket's scale
            scale = _values_of(row.head, counts.numel(), cdtype, first=j) / self.levels
            return values.mul_(torch.repeat_interleave(scale, counts.to(scale.device))).to(self.layout.dtype)
        rows = self._piece_at[a][3]
        scale = _values_of(row.head, max(rows, 1), cdtype, first=j) / self.levels
        if rows:
            values.view(rows, -1).mul_(scale[:, None])
        else:
            values.mul_(scale[0])
        return values.to(self.layout.dtype)


@register
class TernGrad(QuantizedReducer):
    """TernGrad (Wen, Xu, Yan, Wu, Wang, Chen & Li, NeurIPS 2017): per tensor ("layer"), each
    coordinate becomes s * sign(g_i) * b_i with b_i ~ Bernoulli(|g_i| / s): unbiased, E q = g.

    The paper's three techniques, as in its code: *gradient clipping* (``clip``, c = 2.5;
    None turns it off): g_i is clipped to [-c sigma, c sigma], sigma the standard deviation of
    the tensor's coordinates (mean-centred, divided by n); *scaler sharing*: s = max over
    workers of each worker's max |g| of the clipped tensor (the paper's s_t = ||g||_inf, taken
    after clipping), exchanged on the step's handshake (one float per tensor per worker), so
    all workers use the same s; *ternary encoding*: sign(g) b + 1 in {0, 1, 2}, 2 bits per
    coordinate, four to a byte. b_i is drawn as ``u_i s < |g_i|`` with u_i uniform on [0, 1)
    (their code's form).

    Clipping makes the quantizer biased (the paper accepts that): the clipped-off part is lost,
    as is the rounding noise (no residual, see the module)."""

    name = "terngrad"
    per_tensor = True  # clipping and the shared scaler are per tensor
    summary = "stochastic ternary levels {-s, 0, s}, shared per-tensor scaler, clipping (TernGrad; no residual)"
    width = 2
    random_rounding = True
    compensates = False
    conserves = False  # unbiased (up to clipping): the mean of what the workers hold in expectation only

    def __init__(self, *, clip: float | None = 2.5, **common: Any) -> None:
        self.clip = None if clip is None else number(
            "clip", clip, 0.0, low_open=True, meaning="a multiple of the standard deviation, or None")
        super().__init__(**common)
        self._bound: torch.Tensor | None = None

    def options(self) -> dict[str, Any]:
        return {"clip": self.clip}

    def _clipped(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Tensor i's segment (or a piece of it) of x, in the compute dtype, clipped (a new
        tensor; x is left alone)."""
        g = x.to(self._cdtype)
        if self._bound is None:
            return g
        return torch.clamp(g, -self._bound[i], self._bound[i])

    def _prepare(self, call: ReduceCall) -> list[torch.Tensor]:
        layout, cdtype, x = call.layout, self._cdtype, call.x
        self._bound = None
        if self.clip is not None:
            self._bound = per_tensor(x, layout, lambda t: torch.std(t.to(cdtype), correction=0),
                                     cdtype).mul_(self.clip)
        # max |g| of the clipped tensor: max min(|x_i|, bound) = min(max |x_i|, bound), exactly
        top = per_tensor(x, layout, lambda t: torch.linalg.vector_norm(t.to(cdtype), float("inf")), cdtype)
        if self._bound is not None:
            top = torch.minimum(top, self._bound)
        return list(top.unbind())

    def _encode(self, call: ReduceCall, header: Header) -> torch.Tensor:
        x, L = call.x, len(call.layout.shapes)
        self._scaler = header.extras[:, :L].amax(dim=0).to(self._cdtype).to(x.device) if L else \
            torch.zeros(0, dtype=self._cdtype, device=x.device)
        u = self._uniform(call)
        codes = torch.empty(call.d, dtype=torch.uint8, device=x.device)
        for a, b, i in self._pieces:
            g = self._clipped(x[a:b], i)
            keep = u[a:b].mul_(self._scaler[i]) < g.abs()  # u s < |g|
            codes[a:b] = torch.sign(g).mul_(keep).add_(1)  # sign(g) b + 1
        return _pack_into(_row(None, call.d, 2, x.device), 0, call.d, 2, lambda a, b: codes[a:b])

    def _decode(self, row: Encoded, a: int, b: int) -> torch.Tensor:
        values = row.codes(a, b).to(self._cdtype).sub_(1).mul_(self._scaler[self._tensor_of(a)])
        return values.to(self.layout.dtype)

    def _end_step(self) -> None:
        self._bound = None


@register
class EFSignSGD(QuantizedReducer):
    """Scaled sign with error feedback, EF-SignSGD (Karimireddy, Rebjock, Stich & Jaggi, ICML
    2019): per tensor, q = (||x||_1 / n) sign(x), x = g + e the error-compensated gradient,
    and the new error e = x - q. Here the sign and the scale are taken per tensor (the paper
    states the operator for one vector), and the average is the mean of the workers' q (the
    paper analyses one worker). The error is kept in gradient units (the optimizer applies the
    learning rate afterwards), while the paper's is in parameter units (p = lr g + e); the two
    agree while the learning rate is constant.

    Wire format per worker: one scale per tensor (float32; float64 for float64 gradients), then
    one bit per coordinate (1 for x_i < 0). A zero coordinate is sent as +scale (one bit
    cannot say 0); error feedback keeps the difference, and a tensor that is all zeros has
    scale 0 and sends zeros."""

    name = "efsignsgd"
    per_tensor = True  # each tensor's scale is its own
    summary = "per-tensor scaled sign (||x||_1/n) with error feedback, 1 bit per coordinate (EF-SignSGD)"
    width = 1

    def _encode(self, call: ReduceCall, header: Header) -> torch.Tensor:
        x = call.x
        scales = mean_magnitudes(x, call.layout, self._cdtype)
        row = _row(scales, call.d, 1, x.device)
        return _pack_into(row, scales.numel() * scales.element_size(), call.d, 1, lambda a, b: x[a:b] < 0)

    def _head(self) -> int:
        return len(self.layout.shapes) * self._cdtype.itemsize

    def _head_span(self, a: int, b: int) -> tuple[int, int]:
        return _scale_span(self._tensor_of(a), self._cdtype)

    def _decode(self, row: Encoded, a: int, b: int) -> torch.Tensor:
        scale = _values_of(row.head, 1, self._cdtype, first=self._tensor_of(a))[0]
        bits = row.codes(a, b)
        return bits.to(self._cdtype).mul_(-2).add_(1).mul_(scale).to(self.layout.dtype)


@register
class SignSGD(QuantizedReducer):
    """signSGD with majority vote (Bernstein, Wang, Azizzadenesheli & Anandkumar, ICML 2018;
    and ICLR 2019 for the vote's fault tolerance): each worker sends sign(g), one bit per
    coordinate, and the update is the sign of the sum of the workers' signs, the majority
    vote: +1 or -1, 0 on a tie (an even worker count).

    **The result is a vote, not an average**, so the conservation identity does not apply
    (``conserves`` is False): P times the vote is not the sum of what the workers hold, and
    the method keeps no residual (signSGD has no error feedback; ``efsignsgd`` is the one
    with it). A zero coordinate votes +1 (one bit cannot say 0).

    ``scale``: ``"l1"`` (default) multiplies the vote in each tensor by the mean over workers
    of their ||g||_1 / n (one float32 per tensor per worker on the wire), so the update has
    the gradient's magnitude, learning rates tuned for SGD stay meaningful, and a zero
    gradient gives a zero update; ``"none"`` returns the bare vote, the paper's update, to be
    used with a learning rate suited to sign updates (every coordinate moves by the full
    rate). Signum's
    momentum (the sign of a momentum) is not part of it: momentum in the optimizer acts on the
    votes. Stats: ``tie_fraction``, the fraction of coordinates whose vote was 0 (of this
    rank's owned coordinates when routed).

    The vote is per coordinate (the scales per tensor), so it routes (``route_to``): each
    owner counts the votes on its own coordinates only, with the scales of its tensors."""

    name = "signsgd"
    per_tensor = True  # a vote per coordinate, each tensor's scale its own
    summary = "sign of the workers' 1-bit sign votes (majority vote; not an average, no residual)"
    compensates = False
    conserves = False  # a vote, not an average: the conservation identity does not apply
    width = 1

    def __init__(self, *, scale: str = "l1", **common: Any) -> None:
        self.scale = choice("scale", scale, ("l1", "none"))
        super().__init__(**common)

    def options(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def _run(self, call: ReduceCall) -> torch.Tensor:
        layout, x, L, cdtype = call.layout, call.x, len(call.layout.shapes), self._cdtype
        call.handshake(count=call.d)
        with call.phase("select"):
            scales = mean_magnitudes(x, layout, cdtype) if self.scale == "l1" else None
            at = 0 if scales is None else L * cdtype.itemsize
            row = _pack_into(_row(scales, call.d, 1, x.device), at, call.d, 1, lambda a, b: x[a:b] < 0)
        with call.phase("comm"):
            P, sent = self.comm.size, row.numel()
            scale: torch.Tensor | None = None
            avg = call.output()
            ties = torch.zeros((), dtype=torch.int64, device=x.device)
            voted = 0
            for window, parts, owned in encoded_windows(self.comm, row, at, 1, self._ranges(),
                                                        table_limit(call.d, layout.dtype.itemsize),
                                                        owners=self.owners, head_span=self._head_span):
                if not owned:  # another worker's coordinates (routed): no residual to keep
                    continue
                if self.scale == "l1" and scale is None:
                    scale = torch.zeros(L, dtype=cdtype, device=x.device)
                    for w in range(P):  # rank order
                        scale.add_(_values_of(parts[w].head, L, cdtype))
                    scale.div_(P)
                for a, b in window:  # range by range: small temporaries
                    votes = self._votes(parts, a, b)
                    result = torch.sign(votes).to(cdtype)
                    if scale is not None:
                        result.mul_(scale[self._tensor_of(a)])
                    avg[a:b].copy_(result)
                    ties.add_((votes == 0).sum())
                    voted += b - a
            release(row)
        call.counted_dense(self.owners, P > 1)
        call.stats.update(payload_ratio=call.fraction(sent / layout.dtype.itemsize),
                          bits_per_coordinate=call.fraction(8.0 * sent),
                          tie_fraction=ties / voted if voted else 0.0)
        return avg

    def _head_span(self, a: int, b: int) -> tuple[int, int]:
        return _scale_span(self._tensor_of(a), self._cdtype) if self.scale == "l1" else (0, 0)

    @staticmethod
    def _votes(parts: list[Encoded], a: int, b: int) -> torch.Tensor:
        """The sum of every worker's +-1 votes on coordinates ``[a, b)`` (int32), added in rank
        order."""
        negative = torch.zeros(b - a, dtype=torch.int32, device=parts[0].body.device)  # workers voting -1
        for part in parts:
            negative.add_(part.codes(a, b))
        return negative.mul_(-2).add_(len(parts))
