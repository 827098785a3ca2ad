"""The CUDA side of :mod:`~sparsecomm.reducers.select.fused`: one Triton kernel.

Each program handles ``BLOCK`` consecutive elements: it loads ``g`` (and ``m``), writes
``x = m + g``, ORs a non-finite flag, and, for the elements in ``[start, end)`` with
``|x| >= threshold``, claims that many slots with one atomic add on a global counter and
writes its pairs there in ascending order (a prefix sum inside the block). Blocks claim slots
in whatever order they run, so the caller sorts the pairs (``k`` of them, a small fraction of
the vector) to get the reference order. Runs on CPU tensors under ``TRITON_INTERPRET=1`` (the
tests compare it with the torch reference that way).
"""
from __future__ import annotations

import torch

__all__ = ["unavailable_reason", "compensate_select"]

try:
    import triton
    import triton.language as tl
except Exception as exc:  # pragma: no cover - triton is optional
    triton = None
    _IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = None

BLOCK = 1024

if triton is not None:
    @triton.jit
    def _select_kernel(g, m, x, n, start, end, thr_ptr, idx, val, state, cap,
                       HAS_M: tl.constexpr, WRITE_X: tl.constexpr, SELECT: tl.constexpr,
                       WIDE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        if WIDE:
            pid = pid.to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        v = tl.load(g + offs, mask=inside, other=0.0)
        if HAS_M:
            v = tl.load(m + offs, mask=inside, other=0.0) + v
        if WRITE_X:
            tl.store(x + offs, v, mask=inside)
        z = v - v  # 0, or NaN where v is NaN or +-Inf
        bad = tl.max((z != z).to(tl.int64), axis=0)
        if bad > 0:
            tl.atomic_max(state + 1, bad)
        if SELECT:
            thr = tl.load(thr_ptr)
            passed = (tl.abs(v) >= thr) & inside & (offs >= start) & (offs < end)
            flags = passed.to(tl.int32)
            count = tl.sum(flags, axis=0)
            if count > 0:
                base = tl.atomic_add(state, count.to(tl.int64))
                pos = base + (tl.cumsum(flags, axis=0) - 1).to(tl.int64)
                keep = passed & (pos < cap)
                tl.store(idx + pos, offs.to(idx.dtype.element_ty), mask=keep)
                tl.store(val + pos, v, mask=keep)


def unavailable_reason() -> str | None:
    """Why the Triton kernel cannot run on CUDA here (None when it can)."""
    if triton is None:
        return f"triton is not installed ({_IMPORT_ERROR})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def compensate_select(g: torch.Tensor, m: torch.Tensor | None, x: torch.Tensor | None, threshold: float | None,
                      start: int, end: int, idx: torch.Tensor, val: torch.Tensor, cap: int) -> torch.Tensor:
    """Launch the kernel (contract: :func:`sparsecomm.reducers.select.fused.compensate_select`);
    writes at most ``cap`` pairs in claim order. Returns a device int64 tensor
    ``[count that passed, 1 if some x is not finite]``; nothing is read back here."""
    if triton is None:
        raise RuntimeError(f"triton is not installed ({_IMPORT_ERROR})")
    n = g.numel()
    state = torch.zeros(2, dtype=torch.int64, device=g.device)
    if n == 0:
        return state
    thr = torch.full((1,), 0.0 if threshold is None else threshold, dtype=g.dtype, device=g.device)
    _select_kernel[(triton.cdiv(n, BLOCK),)](
        g, g if m is None else m, g if x is None else x, n, start, end, thr, idx, val, state, cap,
        HAS_M=m is not None, WRITE_X=x is not None, SELECT=threshold is not None and end > start,
        WIDE=n + BLOCK >= 2 ** 31, BLOCK=BLOCK)
    return state
