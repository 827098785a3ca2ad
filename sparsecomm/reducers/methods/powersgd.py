"""PowerSGD: a rank-r approximation of every matrix-shaped gradient by one step of power iteration."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ...validate import boolean, choice, nonnegative_int, positive_int
from ..base import ReduceCall, Reducer
from ..layout import Layout
from ..registry import register

RESIDUALS = ("local", "mean")
_HALF = (torch.float16, torch.bfloat16)


def orthogonalize_(p: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt on the columns of ``p`` in place (``[n, r]``, or a batch ``[B, n, r]`` of
    matrices treated independently): column i is normalised, then projected out of the columns
    after it (modified Gram-Schmidt, as in the authors' code). Deterministic: the same input
    gives the same bits on every rank.

    The authors' code divides by the norm and turns a zero column into NaN; here a column
    that is zero (or becomes exactly zero after projection) stays zero. Each column is first
    divided by its largest magnitude so that its squared norm can neither underflow nor
    overflow."""
    batched = p if p.dim() == 3 else p.unsqueeze(0)
    tiny = torch.finfo(p.dtype).tiny
    r = batched.shape[2]
    for i in range(r):
        col = batched[:, :, i:i + 1]
        col.div_(col.abs().amax(dim=1, keepdim=True).clamp_min(tiny))
        col.div_(torch.linalg.vector_norm(col, dim=1, keepdim=True).clamp_min(tiny))
        if i + 1 < r:
            rest = batched[:, :, i + 1:]
            rest.sub_(col * (col * rest).sum(dim=1, keepdim=True))
    return p


@dataclass(frozen=True)
class _Matrix:
    """One compressed tensor: flat segment [a, b) viewed as n x m, rank r, and where its P
    ([n, r]) and Q live in the packed factor buffers. Q is stored transposed ([r, m], rows
    contiguous): the products M Q, M^T P and P Q^T are then two to five times faster on CPU
    than with Q as [m, r] (they read M once, row by row)."""
    tensor: int
    a: int
    b: int
    n: int
    m: int
    r: int
    p_at: int
    q_at: int


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(n, m)`` of a tensor viewed as ``shape[0] x rest``, or None for 0-d and 1-d tensors."""
    if len(shape) < 2:
        return None
    n = shape[0]
    m = 1
    for s in shape[1:]:
        m *= s
    return n, m


def compressed_rank(shape: tuple[int, ...], rank: int) -> int:
    """The rank a tensor is compressed with, or 0 when it is sent uncompressed: 1-d tensors,
    and matrices where ``r (n + m) >= n m`` with ``r = min(rank, n, m)`` (the factors would
    not be smaller than the matrix)."""
    nm = matrix_view(shape)
    if nm is None:
        return 0
    n, m = nm
    r = min(rank, n, m)
    return r if r * (n + m) < n * m else 0


@register
class PowerSGD(Reducer):
    """PowerSGD (Vogels, Karimireddy & Jaggi, NeurIPS 2019), rank ``rank``.

    Every tensor is viewed as a matrix M (``shape[0] x rest``) of the compensated gradient
    x = g + m. Per step, for all compressed matrices at once:

    1. P = M Q on every worker; one all-reduce of all P's, packed flat (the uncompressed
       tensors ride in the same buffer, so one collective carries both);
    2. P is orthogonalised (Gram-Schmidt, :func:`orthogonalize_`); every rank holds the same
       summed P, so every rank gets the same P-hat (the paper all-reduces the mean; the sum
       differs from it by the worker count, a factor that orthogonalisation removes);
    3. Q = M^T P-hat; one all-reduce of all Q's, packed, divided by the worker count;
    4. avg = P-hat Q^T (bit-identical on every rank); the uncompressed tensors' average is
       their all-reduced sum divided by the worker count.

    Q is kept between steps (warm start, the authors' ``reuse_query``; ``warm_start=False``
    draws a fresh Q every step). The first Q of each matrix is ``randn(m, r)`` from a CPU
    generator seeded with ``seed``, drawn per matrix in tensor order, the same on every rank.
    If a column of the kept Q is exactly zero (a gradient that was exactly zero), that column
    restarts from its first draw, instead of staying zero for ever.

    Error feedback. ``residual="local"`` (default) follows the paper (Algorithm 2, "memorize
    local errors") and the authors' experiment code: each worker keeps M - P-hat Q_w^T with
    its own Q_w = M^T P-hat, before Q is averaged. ``residual="mean"`` keeps M - avg (the
    approximation built from the averaged Q), as the later ``powersgd`` package and PyTorch's
    DDP hook do. Both satisfy the conservation identity (sum of residuals + P avg = sum of x);
    they differ only in how the part inside span(P-hat) is split between workers.
    Uncompressed tensors leave no residual.

    Which tensors are compressed: 1-d (and 0-d) tensors, and matrices where r (n + m) >= n m
    with r = min(rank, n, m), are all-reduced uncompressed. For the first ``start_iter``
    steps everything is all-reduced uncompressed in the gradient's dtype and the residual is
    cleared (the later package's ``start_compressing_after_num_steps``; the paper's code
    compresses from the first step, hence the default 0).

    Precision. For float16/bfloat16 gradients the residual (and so x = g + m) is kept in
    float32 (``wide_residual``; ``residual`` is then float32): unlike a sparsifier's,
    PowerSGD's residual is dense and often several times larger than the gradient, and
    storing it in 16 bits would round away the low bits of g at the scale of m at every step
    and break the conservation identity by as much. The factors are computed and sent in
    float32 too (a Gram-Schmidt in 16 bits loses most of its digits, and CPU half matmuls are
    slow), and the uncompressed tensors travel in float32 inside the P buffer;
    ``payload_ratio`` counts those bytes as they are. avg is rounded once to the gradient's
    dtype; with ``residual="local"`` that rounding is added to each worker's residual at
    compressed matrices, so conservation holds to float32 rounding there. float32 and float64
    gradients keep everything in their own dtype.

    Stats: ``density`` and ``local_density`` are 1 (every coordinate of avg gets a value;
    the ``density`` argument is not used), ``payload_ratio`` = bytes of P, Q and uncompressed
    values sent / bytes of the dense gradient, ``compressed_fraction`` = fraction of the d
    coordinates in compressed matrices, ``warmup`` = the step was uncompressed (start_iter).
    """

    name = "powersgd"
    per_tensor = True  # each matrix is approximated on its own (its own Q); 1-d tensors sent whole
    summary = "rank-r power-iteration approximation per matrix, warm-started (PowerSGD)"
    uses_density = False
    wide_residual = True

    def __init__(self, *, rank: int = 2, warm_start: bool = True, start_iter: int = 0, residual: str = "local",
                 **common: Any) -> None:
        self.rank_option = positive_int("rank", rank)
        self.warm_start = boolean("warm_start", warm_start)
        self.start_iter = nonnegative_int("start_iter", start_iter, "steps sent uncompressed first")
        self.residual_rule = choice("residual", residual, RESIDUALS)
        super().__init__(**common)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._matrices: list[_Matrix] = []
        self._matrix_of: dict[int, _Matrix] = {}
        self._consumed = False  # the current Q has been used by a step (warm_start=False redraws)

    def options(self) -> dict[str, Any]:
        return {"rank": self.rank_option, "warm_start": self.warm_start, "start_iter": self.start_iter,
                "residual": self.residual_rule}

    # ------------------------------------------------------------------------ set-up
    def _configure(self, layout: Layout) -> None:
        device = layout.device
        self._fdtype = layout.dtype if layout.dtype in (torch.float32, torch.float64) else torch.float32
        found = []
        dense: list[torch.Tensor] = []
        for i, (shape, (a, b)) in enumerate(zip(layout.shapes, layout.segments)):
            r = compressed_rank(shape, self.rank_option)
            if r:
                n, m = matrix_view(shape)  # type: ignore[misc]
                found.append((i, a, b, n, m, r))
            elif b > a:
                dense.append(torch.arange(a, b, dtype=torch.int64))
        # P's of the same [n, r] shape sit side by side so that they are orthogonalised as one batch.
        by_shape: dict[tuple[int, int], list[tuple]] = {}
        for entry in found:
            by_shape.setdefault((entry[3], entry[5]), []).append(entry)
        self._batches: list[tuple[int, int, int, int]] = []  # (p_at, count, n, r)
        p_at = 0
        placed: dict[int, int] = {}
        for (n, r), entries in by_shape.items():
            self._batches.append((p_at, len(entries), n, r))
            for entry in entries:
                placed[entry[0]] = p_at
                p_at += n * r
        q_at = 0
        self._matrices = []
        for i, a, b, n, m, r in found:  # tensor order
            self._matrices.append(_Matrix(i, a, b, n, m, r, placed[i], q_at))
            q_at += m * r
        self._matrix_of = {mat.tensor: mat for mat in self._matrices}
        self._dense_at = p_at
        self._dense_idx = (torch.cat(dense) if dense else torch.empty(0, dtype=torch.int64)).to(device)
        self._p = torch.zeros(p_at + self._dense_idx.numel(), dtype=self._fdtype, device=device)
        self._q = torch.zeros(q_at, dtype=self._fdtype, device=device)
        # The first Q of every matrix, drawn in tensor order from a generator seeded with `seed`.
        self._generator = torch.Generator().manual_seed(self.seed)
        self._q_init = self._draw()
        self._q.copy_(self._q_init)
        self._consumed = False
        # Column number of every element of the packed Q (for restarting columns that are zero).
        cols = [torch.arange(mat.r, dtype=torch.int64).repeat_interleave(mat.m) + sum(x.r for x in self._matrices[:j])
                for j, mat in enumerate(self._matrices)]
        self._columns = (torch.cat(cols) if cols else torch.empty(0, dtype=torch.int64)).to(device)
        self._ncols = sum(mat.r for mat in self._matrices)
        self._approx = None if self._fdtype == layout.dtype else torch.empty(layout.numel, dtype=self._fdtype,
                                                                              device=device)
        self._compressed = sum(mat.n * mat.m for mat in self._matrices)

    def _draw(self) -> torch.Tensor:
        parts = [torch.randn((mat.m, mat.r), generator=self._generator).t().reshape(-1) for mat in self._matrices]
        flat = torch.cat(parts) if parts else torch.empty(0)
        return flat.to(self._fdtype).to(self._q.device)

    # ------------------------------------------------------------------------ the step
    def _run(self, call: ReduceCall) -> torch.Tensor:
        d = call.d
        if call.index < self.start_iter:
            return self._uncompressed(call)
        call.handshake(count=self._p.numel() + self._q.numel())
        x, comm, W = call.x, self.comm, self.comm.size
        P, Q = self._p, self._q
        with call.phase("select"):
            xf = x  # float32 for 16-bit gradients (wide_residual)
            if not self.warm_start and self._consumed:
                Q.copy_(self._draw())
            elif self.warm_start and self._ncols:
                # restart columns that are exactly zero from their first draw
                top = torch.zeros(self._ncols, dtype=Q.dtype, device=Q.device)
                top.scatter_reduce_(0, self._columns, Q.abs(), "amax")
                torch.where(top[self._columns] == 0, self._q_init, Q, out=Q)
            for mat in self._matrices:
                torch.matmul(xf[mat.a:mat.b].view(mat.n, mat.m), self._qv(mat).t(), out=self._pv(mat))
            if self._dense_idx.numel():
                torch.index_select(xf, 0, self._dense_idx, out=P[self._dense_at:])
        with call.phase("comm"):
            comm.all_reduce_(P)
        with call.phase("select"):
            for p_at, count, n, r in self._batches:
                orthogonalize_(P[p_at:p_at + count * n * r].view(count, n, r))
            for mat in self._matrices:  # Q_w^T = P-hat^T M (local, overwrites the kept Q)
                torch.matmul(self._pv(mat).t(), xf[mat.a:mat.b].view(mat.n, mat.m), out=self._qv(mat))
            approx = None
            if call.error_feedback:
                approx = call.scratch() if self._approx is None else self._approx
                if self.residual_rule == "local":
                    for mat in self._matrices:
                        torch.matmul(self._pv(mat), self._qv(mat), out=approx[mat.a:mat.b].view(mat.n, mat.m))
                if self._dense_idx.numel():  # sent exactly: no residual
                    approx[self._dense_idx] = xf[self._dense_idx]
        with call.phase("comm"):
            comm.all_reduce_(Q)
            if W > 1:
                Q.div_(W)
            avg = call.output()
            for mat in self._matrices:
                target = avg[mat.a:mat.b].view(mat.n, mat.m)
                if avg.dtype == self._fdtype:
                    torch.matmul(self._pv(mat), self._qv(mat), out=target)
                else:
                    exact = self._pv(mat) @ self._qv(mat)
                    target.copy_(exact)
                    if approx is not None and self.residual_rule == "local":
                        # keep the rounding of avg to 16 bits in the residual (conservation)
                        approx[mat.a:mat.b].view(mat.n, mat.m).add_(target.to(exact.dtype) - exact)
            if self._dense_idx.numel():
                dense = P[self._dense_at:]
                avg[self._dense_idx] = (dense / W if W > 1 else dense).to(avg.dtype)
        self._consumed = True
        if approx is not None and self.residual_rule == "mean":
            for mat in self._matrices:
                approx[mat.a:mat.b] = avg[mat.a:mat.b]
        call.commit_dense(approx if approx is not None else x)
        sent = (P.numel() + Q.numel()) * P.element_size()
        call.counted(selected=d, received=d)
        call.stats.update(payload_ratio=call.fraction(sent / call.layout.dtype.itemsize),
                          compressed_fraction=call.fraction(self._compressed), warmup=False)
        return avg

    def _uncompressed(self, call: ReduceCall) -> torch.Tensor:
        """The first ``start_iter`` steps: a dense all-reduce of everything; no residual."""
        call.handshake(count=call.d)
        with call.phase("comm"):
            avg = call.output().copy_(call.x)
            self.comm.all_reduce_(avg)
            if self.comm.size > 1:
                avg.div_(self.comm.size)
        call.commit_all()
        call.counted(selected=call.d, received=call.d)
        call.stats.update(payload_ratio=call.fraction(call.d), compressed_fraction=call.fraction(self._compressed),
                          warmup=True)
        return avg

    def _pv(self, mat: _Matrix) -> torch.Tensor:
        return self._p[mat.p_at:mat.p_at + mat.n * mat.r].view(mat.n, mat.r)

    def _qv(self, mat: _Matrix) -> torch.Tensor:
        """Q^T, ``[r, m]``."""
        return self._q[mat.q_at:mat.q_at + mat.m * mat.r].view(mat.r, mat.m)

    # ------------------------------------------------------------------------ reporting, state
    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        layout = self.layout
        if layout is not None:
            d = layout.numel
            info.update(compressed=[{"tensor": m.tensor, "shape": [m.n, m.m], "rank": m.r} for m in self._matrices],
                        uncompressed=[i for i in range(len(layout.shapes))
                                      if i not in {m.tensor for m in self._matrices}],
                        compressed_fraction=self._compressed / d if d else 0.0,
                        payload_ratio=(self._p.numel() + self._q.numel()) * self._p.element_size()
                        / (d * layout.dtype.itemsize) if d else 0.0)
        return info

    def _method_state(self) -> dict[str, Any]:
        return {"q": self._q.detach().cpu().clone(), "consumed": self._consumed,
                "generator": self._generator.get_state()}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        self._q.copy_(state["q"].to(self._q.device))
        self._consumed = bool(state["consumed"])
        self._generator.set_state(state["generator"])

    def _tensor_state(self, i: int) -> dict[str, torch.Tensor]:
        """A compressed matrix's kept Q (as Q^T, ``[r, m]``); nothing for an uncompressed tensor."""
        mat = self._matrix_of.get(i)
        return {} if mat is None else {"q": self._qv(mat).detach().clone()}

    def _load_tensor_state(self, i: int, state: dict[str, torch.Tensor]) -> None:
        mat, q = self._matrix_of.get(i), state.get("q")
        if mat is not None and q is not None and tuple(q.shape) == (mat.r, mat.m):
            self._qv(mat).copy_(q.to(self._q.device, self._q.dtype))
