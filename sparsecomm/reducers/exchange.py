"""How selected values travel between workers (methods.md, section 2).

Every step opens with a *handshake*: one all-gather of a small float64 row per worker
(layout fingerprint, status flags, the count of selected coordinates and method-specific
extras). It is what lets every rank take the same decision before any size-dependent
collective: raise together when layouts differ or a gradient is not finite, skip together,
and size padded all-gathers from the counts. The schemes below then move the payload:

* :func:`dense_allreduce_mean` -- the ``exact`` baseline, one flat all-reduce;
* :func:`sparse_gather_sum` -- everyone's (index, value) pairs, padded to the largest count,
  scatter-added in rank order;
* :func:`union_allreduce` -- indices are all-gathered, then every worker all-reduces its own
  values at the union of everyone's indices;
* :func:`allreduce_at` -- all-reduce at positions every worker already agrees on.

Padding is zero-initialised, counted as sent, and sliced off before it can reach a result.
Sums are formed in a fixed order, so ``avg`` is bit-identical on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .comm import Communicator
from .layout import Layout

__all__ = [
    "LayoutMismatchError", "NonFiniteGradientError", "SkipStep", "Header", "handshake",
    "gather_counts", "dense_allreduce_mean", "sparse_gather_sum", "union_allreduce", "allreduce_at", "union_of",
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


def _aligned(n: int) -> int:
    """Round a padded count up so that every packed row keeps its sub-buffers aligned."""
    return (n + 7) // 8 * 8


def _pack(parts: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """One zero-padded byte row holding each 1-D part padded to ``n`` elements."""
    n = _aligned(n)
    row = torch.zeros(sum(n * p.element_size() for p in parts), dtype=torch.uint8, device=parts[0].device)
    at = 0
    for p in parts:
        size = n * p.element_size()
        row[at:at + size].view(p.dtype)[:p.numel()] = p
        at += size
    return row


def _unpack(row: torch.Tensor, n: int, count: int, dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
    n = _aligned(n)
    out, at = [], 0
    for dt in dtypes:
        size = n * torch.empty((), dtype=dt).element_size()
        out.append(row[at:at + size].view(dt)[:count])
        at += size
    return out


def union_of(indices: Sequence[torch.Tensor], d: int) -> torch.Tensor:
    """Sorted distinct positions of the concatenated ``indices`` (a vector of length ``d``)."""
    cat = torch.cat(list(indices)) if len(indices) != 1 else indices[0]
    if cat.numel() * 16 < d:
        return torch.unique(cat)
    mask = torch.zeros(d, dtype=torch.bool, device=cat.device)
    mask[cat] = True
    return torch.nonzero(mask).view(-1).to(cat.dtype)


def sparse_gather_sum(comm: Communicator, x: torch.Tensor, idx: torch.Tensor, counts: list[int],
                      avg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse gather-sum: all-gather every worker's (index, value) pairs, add them in rank
    order into the zeroed ``avg``, divide by P. Returns ``(avg, union of all indices)``."""
    n = max(counts) if counts else 0
    if n == 0:
        return avg, idx[:0]
    table = comm.all_gather(_pack([idx, x[idx]], n))
    received = []
    for w, c in enumerate(counts):
        if c:
            iw, vw = _unpack(table[w], n, c, (idx.dtype, x.dtype))
            avg.index_add_(0, iw, vw)
            received.append(iw)
    union = union_of(received, x.numel())
    if comm.size > 1:
        avg[union] = avg[union] / comm.size
    return avg, union


def union_allreduce(comm: Communicator, x: torch.Tensor, idx: torch.Tensor, counts: list[int],
                    avg: torch.Tensor, disjoint: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Union all-reduce: all-gather indices, then all-reduce everyone's ``x`` at the union,
    written into the zeroed ``avg``. With ``disjoint`` (exclusive partitions) the union is the
    plain concatenation in rank order. Returns ``(avg, union)``."""
    n = max(counts) if counts else 0
    if n == 0:
        return avg, idx[:0]
    table = comm.all_gather(_pack([idx], n))
    received = [_unpack(table[w], n, c, (idx.dtype,))[0] for w, c in enumerate(counts) if c]
    union = torch.cat(received) if disjoint else union_of(received, x.numel())
    return allreduce_at(comm, x, union, avg), union


def allreduce_at(comm: Communicator, x: torch.Tensor, positions: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
    """Write the mean over workers of ``x`` at ``positions`` (the same on all workers) into the
    zeroed ``avg``."""
    values = x[positions]
    comm.all_reduce_(values)
    avg[positions] = values / comm.size if comm.size > 1 else values
    return avg
