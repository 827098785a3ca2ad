"""Selection in one pass: error feedback, finiteness check, threshold and compaction fused.

:func:`compensate_select` reads the gradient ``g`` and the residual ``m`` once, writes
``x = g + m`` over the whole vector (the union all-reduce reads other workers' positions of
it and the residual is ``x`` with the sent positions zeroed, so all of ``x`` is needed), tells
whether every ``x`` is finite, and compacts the sorted positions ``p`` in ``[start, end)``
with ``|x[p]| >= threshold`` (NaN never passes) together with ``x[p]``. The host learns one
number, the count (twice only when it exceeds the capacity the caller guessed).

Backends: CUDA tensors use Triton kernels (:mod:`.fused_triton`), CPU tensors a compiled C
loop (:mod:`.fused_cpu`); :func:`reference` is the same contract in plain torch, the pieces
the methods use with ``selection="torch"``. All three give bit-identical results (tests).
Methods choose with their ``selection`` option: ``"torch"``, ``"fused"`` (raises if it cannot
run here) or ``"auto"`` (fused where it can run: float32/float64 gradients and a C compiler on
CPU, Triton on CUDA; the resolved path is in the reducer's ``describe()``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .primitives import threshold_select

__all__ = ["SELECTIONS", "Selected", "unavailable_reason", "resolve", "compensate_select", "reference",
           "FusedSearch", "triton_importable"]

SELECTIONS = ("auto", "torch", "fused")

log = logging.getLogger(__name__)
_told: set[str] = set()


@dataclass
class Selected:
    """What one fused pass found: sorted positions, ``x`` there, and whether all of ``x`` is
    finite (a device boolean tensor on CUDA, no host round-trip)."""

    indices: torch.Tensor
    values: torch.Tensor
    finite: torch.Tensor | bool


def unavailable_reason(device: torch.device, dtype: torch.dtype, index_dtype: torch.dtype) -> str | None:
    """Why the fused path cannot run for these tensors (None when it can)."""
    if dtype not in (torch.float32, torch.float64):
        return f"fused selection handles float32 and float64 gradients, not {dtype}"
    if device.type == "cuda":
        from . import fused_triton
        return fused_triton.unavailable_reason()
    if device.type == "cpu":
        from . import fused_cpu
        return fused_cpu.unavailable_reason(dtype, index_dtype)
    return f"fused selection has no backend for {device.type} tensors"


def triton_importable() -> bool:
    """Is triton installed (the kernel can then also run on CPU under ``TRITON_INTERPRET=1``)?"""
    from . import fused_triton
    return fused_triton.triton is not None


def resolve(selection: str, device: torch.device, dtype: torch.dtype, index_dtype: torch.dtype,
            unsupported: str | None = None) -> bool:
    """True when a method built with ``selection`` uses the fused path for these tensors;
    ``unsupported``: why the method's own configuration cannot (e.g. per-layer thresholds).
    Raises a one-line ValueError when ``"fused"`` was asked for and cannot run."""
    if selection == "torch":
        return False
    reason = unsupported or unavailable_reason(device, dtype, index_dtype)
    if reason is not None and selection == "fused":
        raise ValueError(f"selection='fused' cannot run here: {reason}; use selection='torch' or 'auto'")
    if reason is not None and reason not in _told:  # auto: say once why the torch pieces run (timings differ)
        _told.add(reason)
        log.warning("selection='auto' uses the torch pieces, not the fused pass: %s", reason)
    return reason is None


def _range(n: int, start: int, end: int | None) -> tuple[int, int]:
    end = n if end is None else end
    return start, max(start, end)


def reference(g: torch.Tensor, m: torch.Tensor | None, x: torch.Tensor | None, threshold: float | None,
              start: int = 0, end: int | None = None, index_dtype: torch.dtype = torch.int32
              ) -> tuple[torch.Tensor, Selected]:
    """:func:`compensate_select` in plain torch (the methods' ``selection="torch"`` pieces)."""
    if m is not None:
        assert x is not None
        xs = torch.add(m, g, out=x)
    elif x is not None:
        xs = x.copy_(g)
    else:
        xs = g
    finite: torch.Tensor | bool = True
    if xs.numel():
        lo, hi = torch.aminmax(xs)
        finite = torch.isfinite(lo) & torch.isfinite(hi)
    start, end = _range(xs.numel(), start, end)
    idx = (threshold_select(xs, threshold, index_dtype, start, end) if threshold is not None
           else torch.empty(0, dtype=index_dtype, device=xs.device))
    return xs, Selected(idx, xs[idx], finite)


def compensate_select(g: torch.Tensor, m: torch.Tensor | None, x: torch.Tensor | None, threshold: float | None,
                      start: int = 0, end: int | None = None, index_dtype: torch.dtype = torch.int32,
                      capacity: int | None = None, backend: str | None = None) -> tuple[torch.Tensor, Selected]:
    """One fused pass over the flat, contiguous ``g``: ``x = g + m`` written into ``x`` (``m``
    None: ``g`` copied into ``x``; ``x`` None too: ``x`` is ``g``, nothing is written), the
    finiteness of all of ``x``, and the sorted positions in ``[start, end)`` with
    ``|x| >= threshold`` (compared in x's dtype, as torch does; ``threshold`` None: none).
    ``capacity``: how many pairs to make room for (a guess; more costs a second pass over
    ``x``, into buffers of the exact count; default 1/256 of the range, at least 1024: room
    for the whole range would allocate twice the gradient's bytes, which the allocator
    counts whether or not the pages are written). ``backend``: ``"triton"`` or ``"c"``
    (default: by device; the tests run Triton on CPU tensors under ``TRITON_INTERPRET=1``).
    Returns ``(x, Selected)``, bit-identical to :func:`reference`."""
    n = g.numel()
    start, end = _range(n, start, end)
    size = end - start if threshold is not None else 0
    backend = backend or ("triton" if g.device.type == "cuda" else "c")
    cap = min(size, max(1024, size // 256) if capacity is None else max(1, capacity))
    xs = g if x is None else x
    idx = torch.empty(cap + 1, dtype=index_dtype, device=g.device)  # + 1: never a zero-size buffer
    val = torch.empty(cap + 1, dtype=g.dtype, device=g.device)
    if backend == "triton":
        from . import fused_triton
        state = fused_triton.compensate_select(g, m, x, threshold, start, end, idx, val, cap)
        count, bad = state.tolist()  # the one host synchronisation
        finite: torch.Tensor | bool = bad == 0
        if count > cap:  # x is written now: select from it alone, with room for all
            idx = torch.empty(count, dtype=index_dtype, device=g.device)
            val = torch.empty(count, dtype=g.dtype, device=g.device)
            fused_triton.compensate_select(xs, None, None, threshold, start, end, idx, val, count)
        idx, order = torch.sort(idx[:count])  # blocks claim their slots in any order
        val = val[:count][order]
    else:
        from . import fused_cpu
        count, finite = fused_cpu.compensate_select(g, m, x, threshold, start, end, idx[:cap], val[:cap])
        if count > cap:
            idx = torch.empty(count, dtype=index_dtype)
            val = torch.empty(count, dtype=g.dtype)
            fused_cpu.compensate_select(xs, None, None, threshold, start, end, idx, val)
        idx, val = idx[:count], val[:count]
    return xs, Selected(idx, val, finite)


class FusedSearch:
    """:func:`compensate_select` whose capacity follows the previous call's count, 1.5 times it
    plus 1024 (a guide for speed and memory only: results never depend on it; a count above
    it costs a second pass over ``x``), as :class:`~.selection.ThresholdSearch` does for the
    block search. The pair buffers are then a small multiple of what is selected, not of the
    gradient (until 2026-12-01 the CPU path made room for the whole range: 2x the gradient's
    bytes at every step)."""

    def __init__(self) -> None:
        self.last: int | None = None

    def __call__(self, g: torch.Tensor, m: torch.Tensor | None, x: torch.Tensor | None, threshold: float | None,
                 start: int = 0, end: int | None = None, index_dtype: torch.dtype = torch.int32
                 ) -> tuple[torch.Tensor, Selected]:
        capacity = None if self.last is None else self.last + self.last // 2 + 1024
        xs, sel = compensate_select(g, m, x, threshold, start, end, index_dtype, capacity)
        if threshold is not None:
            self.last = sel.indices.numel()
        return xs, sel
