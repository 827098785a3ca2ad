"""Accordion: layer-wise top-k whose per-tensor density switches with the training regime."""
from __future__ import annotations

from typing import Any

import torch

from ...validate import number, positive_int
from ..base import ReduceCall
from ..comm.exchange import fill_at, put_at
from ..layout import Layout
from ..registry import register
from ..select.exact_topk import rest_of, top_into, top_of
from ..select.primitives import target_count
from .sparse_base import EXCHANGES, SparseReducer


@register
class Accordion(SparseReducer):
    """Accordion (Agarwal et al., MLSys 2021) over layer-wise top-k, as the ExDyna authors
    adapted it from the Accordion authors' code (``AccordionTopKReducer``; the defaults
    ``k_low=0.1``, ``k_high=0.99``, ``detection_threshold=0.5``, ``switch_freq=10`` are theirs).

    Every tensor t sends its k_t = max(1, floor(c_t numel_t)) largest |x|, with c_t either
    ``k_high`` (critical regime) or ``k_low``; equal |x|: the lower position first (the rule of
    :mod:`~..select.exact_topk`; their code and this one before 2026-12-07 used torch.topk,
    whose choice among equal values is unspecified). The ``density`` argument is not used;
    ``target_density`` reports sum_t k_t / d.

    ``exchange``: ``"gather"`` sends the selection as (position, value) pairs by sparse
    gather-sum, as their code all-gathers values and positions; ``"union"`` by union
    all-reduce, as for ``topk``; ``"auto"`` (default) as ``"gather"``, except on steps where
    the pairs would cost more bytes than the dense vector (sum_t k_t (index size + value size)
    > d x value size: with int32 positions and float32 values, sum_t k_t > d / 2, as at the
    default k_high = 0.99 while most of the vector is critical). Such a step sends the same selection as
    a dense vector (x at the selected positions, 0 elsewhere) by one all-reduce, divided by P;
    the residual is the same, x with the selected positions zeroed. Every rank knows the k_t,
    so every rank takes the same choice. With P <= 2 the average is bit-identical to the
    gather-sum's (with one worker there is no sum; with two, a + b either way); with P >= 3
    the all-reduce sums in the backend's order, not in rank order, so the average may differ
    from the gather-sum's in float rounding (still identical on every rank). It needs no
    vector of 0.99 d positions: a tensor with k_t > numel_t / 2 finds the positions it drops
    (:func:`~..select.exact_topk.rest_of`). With a ``values`` or ``indices`` wire format other
    than the default, ``"auto"`` is ``"gather"``.

    Decisions are taken at the first reduce of epochs 0, switch_freq, 2 switch_freq, ... (the
    epoch and its learning rate come from :meth:`begin_epoch`; before any call it behaves as
    epoch 0 with an unknown learning rate, and a reducer that has never decided decides at its
    first reduce, whatever the epoch). A tensor is critical when it is the first decision (or
    epoch 0), when the learning rate dropped since the last decision (only if both are known),
    or when its gradient norm changed by more than ``detection_threshold`` relative to its norm
    at the last decision: |n - n_prev| > detection_threshold * n_prev (a previous norm of 0
    counts as a change unless the norm is still 0; their code divides by it).

    The norms are those of rank 0's own raw local gradient g = x - m (the compensated vector
    minus the residual carried in, i.e. the gradient handed to ``reduce``), per tensor, at the
    decision step -- as in their code, which takes the norms of the worker's gradient before
    error feedback. Only rank 0 computes them (one pass over d, in float32 for 16-bit
    gradients) and decides; it broadcasts one byte per tensor (critical or not) right after the
    step's handshake, at decision steps only, so every rank uses the same densities. Norms
    and the learning rate at the last decision are kept for the next one.

    Stats: ``critical_fraction`` (fraction of tensors in the critical regime this step),
    ``decision`` (this step decided) and ``dense_exchange`` (this step sent a dense vector; its
    ``density`` is then the lower bound of the union described in
    :meth:`~.sparse_base.SparseReducer._send_dense`). ``describe()`` returns the current
    per-tensor choices and the decision history: every decision's epoch, step, learning rate and critical tensors,
    and ``switch_epochs``, the epochs at which some tensor changed regime.
    """

    name = "accordion"
    # each tensor's regime follows its own norm and the learning rate; its k_t is its own
    per_tensor = True
    summary = "layer-wise top-k at k_high or k_low per tensor, switched every few epochs by regime (Accordion)"
    uses_density = False
    exchanges = ("auto", *EXCHANGES)

    def __init__(self, *, k_low: float = 0.1, k_high: float = 0.99, detection_threshold: float = 0.5,
                 switch_freq: int = 10, exchange: str = "auto", **common: Any) -> None:
        fraction = "a fraction of each tensor"
        self.k_low = number("k_low", k_low, 0.0, 1.0, low_open=True, meaning=fraction)
        self.k_high = number("k_high", k_high, 0.0, 1.0, low_open=True, meaning=fraction)
        if self.k_low > self.k_high:
            raise ValueError(f"k_low ({k_low}) must not exceed k_high ({k_high}): k_high is the density of the "
                             f"critical regime")
        self.detection_threshold = number("detection_threshold", detection_threshold, 0.0, low_open=True,
                                          meaning="a relative change of the gradient norm")
        self.switch_freq = positive_int("switch_freq", switch_freq, "epochs between decisions")
        super().__init__(exchange=exchange, **common)
        self._epoch: int | None = None
        self._lr: float | None = None
        self._critical: list[bool] = []
        self._ks: list[int] = []
        self._target = 1.0
        self._reset_decisions()

    def options(self) -> dict[str, Any]:
        return {**super().options(), "k_low": self.k_low, "k_high": self.k_high,
                "detection_threshold": self.detection_threshold, "switch_freq": self.switch_freq}

    def _reset_decisions(self) -> None:
        self._decided_epoch: int | None = None
        self._prev_norms: list[float] | None = None  # rank 0 only
        self._prev_lr: float | None = None
        self._history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------ training context
    def begin_epoch(self, epoch: int, lr: float, epochs: float) -> None:
        self._epoch = int(epoch)
        self._lr = None if lr is None else float(lr)

    @property
    def target_density(self) -> float:
        return self._target

    def _configure(self, layout: Layout) -> None:
        self._reset_decisions()
        self._set_regimes(layout, [True] * len(layout.shapes))

    def _set_regimes(self, layout: Layout, critical: list[bool]) -> None:
        self._critical = list(critical)
        self._ks = [target_count(self.k_high if c else self.k_low, n) for c, n in zip(critical, layout.sizes)]
        self._target = sum(self._ks) / layout.numel if layout.numel else 1.0

    # ------------------------------------------------------------------------ the step
    def _run(self, call: ReduceCall) -> torch.Tensor:
        epoch = 0 if self._epoch is None else self._epoch
        deciding = self._decided_epoch is None or (epoch % self.switch_freq == 0 and epoch != self._decided_epoch)
        if deciding:
            call.handshake()
            self._decide(call, epoch)
        dense = self._dense_step(call.layout)  # from the k_t, which every rank shares
        selected = sum(self._ks)
        if dense:
            out = call.output()
            with call.phase("select"):
                self._select_dense(call, out)
            if not deciding:
                call.handshake(count=selected)
            avg = self._send_dense(call, out, selected)
        else:
            with call.phase("select"):
                idx = self._select(call)
            if deciding:  # everyone uses the same densities now, so everyone's count is known
                counts = [selected] * self.comm.size
            else:
                counts = call.handshake(count=selected).counts
            avg = self._send(call, idx, counts, exchange="gather" if self.exchange == "auto" else None)
        L = len(self._critical)
        call.stats.update(critical_fraction=sum(self._critical) / L if L else 0.0, decision=deciding,
                          dense_exchange=dense)
        return avg

    def _dense_step(self, layout: Layout) -> bool:
        """``exchange="auto"`` and the step's pairs would cost more bytes than the dense vector."""
        if self.exchange != "auto" or not self.wire.default:
            return False
        value = layout.dtype.itemsize
        return sum(self._ks) * (layout.index_dtype.itemsize + value) > layout.numel * value

    def _select(self, call: ReduceCall) -> torch.Tensor:
        """Layer-wise top-k by the rule (as :func:`~..select.exact_topk.reference`, the same
        positions in the same order), each tensor's positions written straight into one index
        vector of the layout's index dtype (:func:`~..select.exact_topk.top_into`): with k_high
        = 0.99 the selection is nearly the whole vector, and per-tensor int64 index lists, their
        concatenation and its conversion would be 4x the gradient."""
        x, layout = call.x, call.layout
        scratch = call.scratch()
        idx = torch.empty(sum(self._ks), dtype=layout.index_dtype, device=x.device)
        at = 0
        for (a, b), k in zip(layout.segments, self._ks):
            if k > 0:
                top_into(torch.abs(x[a:b], out=scratch[:b - a]), k, idx[at:at + k]).add_(a)
                at += k
        return idx

    def _select_dense(self, call: ReduceCall, out: torch.Tensor) -> None:
        """The selection of :meth:`_select` as a dense vector in ``out``: x at the selected
        positions, 0 elsewhere. A tensor with k_t > numel_t / 2 is copied whole and its
        dropped positions zeroed (:func:`~..select.exact_topk.rest_of`); any other gets x at
        its top-k positions."""
        x, scratch = call.x, call.scratch()
        for (a, b), k in zip(call.layout.segments, self._ks):
            n = b - a
            if 2 * k > n:
                out[a:b].copy_(x[a:b])
                if k < n:
                    fill_at(out[a:b], rest_of(torch.abs(x[a:b], out=scratch[:n]), k), 0)
            elif k > 0:
                keep = top_of(torch.abs(x[a:b], out=scratch[:n]), k)
                put_at(out[a:b], keep, x[a:b].index_select(0, keep))

    def _decide(self, call: ReduceCall, epoch: int) -> None:
        """Rank 0 classifies every tensor and broadcasts the choice (one byte per tensor)."""
        layout = call.layout
        L = len(layout.shapes)
        flags = torch.zeros(L, dtype=torch.uint8, device=call.x.device)
        norms: list[float] | None = None
        if self.rank == 0:
            with call.phase("select"):
                norms = self._norms(call)
                first = self._prev_norms is None or epoch == 0
                lr_drop = self._lr is not None and self._prev_lr is not None and self._lr < self._prev_lr
                thr = self.detection_threshold
                critical = [first or lr_drop or abs(n - p) > thr * p
                            for n, p in zip(norms, self._prev_norms or [0.0] * L)]
                flags.copy_(torch.tensor(critical, dtype=torch.uint8))
        if L:
            with call.phase("comm"):
                self.comm.broadcast_(flags, 0)
        critical = [bool(v) for v in flags.tolist()]
        switched = [i for i, (old, new) in enumerate(zip(self._critical, critical)) if old != new]
        self._set_regimes(layout, critical)
        self._history.append({"epoch": epoch, "step": call.index, "lr": self._lr,
                              "critical": [i for i, c in enumerate(critical) if c], "switched": switched})
        self._decided_epoch = epoch
        self._prev_lr = self._lr
        if norms is not None:
            self._prev_norms = norms

    def _norms(self, call: ReduceCall) -> list[float]:
        """Per-tensor L2 norms of this worker's raw gradient g = x - m (one pass, one host read)."""
        layout = call.layout
        if not layout.shapes:
            return []
        g = torch.sub(call.x, call.residual, out=call.scratch())
        dtype = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
        norms = torch.stack([torch.linalg.vector_norm(g[a:b], dtype=dtype) for a, b in layout.segments])
        return [float(v) for v in norms.tolist()]

    # ------------------------------------------------------------------------ reporting, state
    def describe(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "lr": self._lr,
                "densities": [self.k_high if c else self.k_low for c in self._critical],
                "critical": list(self._critical), "decisions": [dict(h) for h in self._history],
                "switch_epochs": [h["epoch"] for h in self._history if h["switched"]]}

    def _method_state(self) -> dict[str, Any]:
        return {"critical": list(self._critical), "decided_epoch": self._decided_epoch,
                "prev_norms": None if self._prev_norms is None else list(self._prev_norms),
                "prev_lr": self._prev_lr, "history": [dict(h) for h in self._history]}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        assert self.layout is not None
        self._set_regimes(self.layout, [bool(c) for c in state["critical"]])
        self._decided_epoch = state["decided_epoch"]
        self._prev_norms = None if state["prev_norms"] is None else [float(v) for v in state["prev_norms"]]
        self._prev_lr = state["prev_lr"]
        self._history = [dict(h) for h in state["history"]]
