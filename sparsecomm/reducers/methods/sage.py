"""SAGE: a hard threshold rescaled every step to track a target density."""
from __future__ import annotations

from typing import Any

import torch

from ...validate import boolean, choice, number
from ..base import ReduceCall
from ..select.control import CONTROLLERS, SageScaling, pooled_threshold
from ..comm.exchange import gather_counts
from ..select.fused import SELECTIONS, FusedSearch, resolve
from ..layout import Layout
from ..registry import register
from ..select.primitives import (ThresholdSearch, curve_counts, initial_threshold, slovin_sample_size, target_count,
                         top_curve)
from .sparse_base import SparseReducer


@register
class Sage(SparseReducer):
    """SAGE (Yoon, Jeong & Oh, J. Supercomputing 2023): hard threshold with lambda_0 =
    1/(2 sqrt(k)) rescaled by alpha * beta * gamma every step (see
    :class:`~sparsecomm.reducers.select.control.SageScaling`); each worker's own density tracks c.

    Thresholds stay in sync across workers (the authors' code lets each worker sample with
    its own random stream, so thresholds drift apart): every worker samples the same
    ``n_s`` positions (Slovin's formula with error ``sample_error``; one indexed gather), the
    sampled means ride on the step's handshake and are averaged, and the examined counts
    for ``d_exam`` are summed with one 8-byte all-reduce, so every worker derives the same
    lambda from the same global statistics.

    ``warm_start`` (default True): step 0's lambda is not 1/(2 sqrt(k)) but where the workers'
    exact top-2k curves say their mean count is k
    (:func:`~sparsecomm.reducers.select.control.pooled_threshold`; the curves ride on the handshake
    with the sampled means). ``controller``: ``"fast"`` (default) keeps the published alpha and
    beta, and gamma = 1 inside 0.5 <= d_exam / c <= 2, and takes gamma = (d_exam / c) ** 0.1
    outside it (:class:`~sparsecomm.reducers.select.control.SageScaling` says why that band is
    narrower than the published 0.1-10); ``"paper"`` is the published rule.
    ``controller="paper", warm_start=False`` is the published method exactly.

    With the fused selection (``selection``, :mod:`~sparsecomm.reducers.select.fused`) the pass
    that builds ``x = g + m`` also keeps the candidates ``|x| >= 0.8 lambda`` (lambda of the
    previous step); the examined count and the selection then read only those whenever both of
    the step's thresholds stay at or above 0.8 lambda (the usual case), and read ``x`` again
    otherwise. Results are the same either way.
    """

    CANDIDATES = 0.8  # the fused pass keeps |x| >= CANDIDATES * lambda (a guide for speed only)

    name = "sage"
    per_tensor = False  # one threshold for the whole vector, controlled by its density and a sample of it
    summary = "hard threshold rescaled every step to track the target density (synced across workers)"

    def __init__(self, *, exchange: str = "gather", sample_error: float = 0.05, warm_start: bool = True,
                 controller: str = "fast", selection: str = "auto", **common: Any) -> None:
        self.sample_error = number("sample_error", sample_error, 0.0, 1.0, low_open=True, high_open=True)
        self.warm_start = boolean("warm_start", warm_start)
        self.controller = choice("controller", controller, CONTROLLERS)
        self.selection = choice("selection", selection, SELECTIONS)
        self._fused = False
        self._fused_searches = (FusedSearch(), FusedSearch(), FusedSearch())  # the candidates, a second
        # pass over x, a pass over the candidates
        super().__init__(exchange=exchange, **common)
        self._generator = torch.Generator()
        self._generator.manual_seed(self.seed)
        self._control: SageScaling | None = None
        self._search = ThresholdSearch(self.density)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "sample_error": self.sample_error, "warm_start": self.warm_start,
                "controller": self.controller, "selection": self.selection}

    def _configure(self, layout: Layout) -> None:
        self._k = k = target_count(self.density, layout.numel)
        self._control = SageScaling(self.density, initial_threshold(k), fast=self.controller == "fast")
        self._samples = slovin_sample_size(layout.numel, self.sample_error)
        self._fused = resolve(self.selection, layout.device, layout.dtype, layout.index_dtype)

    def _fuses_compensation(self) -> bool:
        return self._fused

    def describe(self) -> dict[str, Any]:
        return {"selection": "fused" if self._fused else "torch"}

    def _select(self, call: ReduceCall, threshold: float, low: float | None, candidates: Any) -> torch.Tensor:
        """Sorted positions with |x| >= threshold: from the fused pass's candidates (those with
        |x| >= low) when they hold all of them, else by a search of x."""
        if candidates is not None and low is not None and threshold >= low:
            # the same C loop or kernel over the candidates' values: positions among them, no
            # |values| copy, mask or int64 positions the size of the candidates
            _, within = self._fused_searches[2](candidates.values, None, None, threshold,
                                                index_dtype=call.layout.index_dtype)
            return torch.index_select(candidates.indices, 0, within.indices)
        if self._fused:
            return call.select_fused(threshold, search=self._fused_searches[1]).indices
        return self._search(call.x, threshold, call.layout.index_dtype, scratch=call.scratch())

    def _run(self, call: ReduceCall) -> torch.Tensor:
        control, d = self._control, call.d
        assert control is not None
        low = candidates = None
        if self._fused:  # builds x = g + m, checks it, keeps the candidates
            low = control.threshold * self.CANDIDATES if control.started else None
            candidates = call.select_fused(low, search=self._fused_searches[0])
        x = call.x
        with call.phase("select"):
            positions = torch.randint(0, max(d, 1), (self._samples,), generator=self._generator)
            sampled = x[positions.to(x.device)].abs().float().mean() if self._samples else 0.0
            warm = self.warm_start and not control.started
            points = curve_counts(min(d, 2 * self._k)) if warm else []
            curve = top_curve(x, points, scratch=call.scratch()).unbind() if warm else ()
        header = call.handshake(extras=[sampled, *curve])
        sampled_mean = sum(header.extras[:, 0].tolist()) / self.comm.size  # rank order
        if not control.started:
            calibrated = pooled_threshold(header.extras[:, 1:].tolist(), points, [d] * self.comm.size,
                                          self.comm.size * self._k) if warm else None
            control.start(sampled_mean, calibrated)
        else:
            alpha = control.alpha(sampled_mean)
            with call.phase("select"):
                examined = self._select(call, control.threshold * alpha, low, candidates).numel()
            with call.phase("comm"):
                total = self.comm.all_reduce_(torch.tensor([examined], dtype=torch.float64, device=x.device))
            control.update(sampled_mean, alpha, float(total) / (self.comm.size * d) if d else 0.0)
        with call.phase("select"):
            idx = self._select(call, control.threshold, low, candidates)
        with call.phase("comm"):
            counts = gather_counts(self.comm, idx.numel(), x.device)
        avg = self._send(call, idx, counts)
        call.stats.update(threshold=control.threshold, sampled_mean=sampled_mean, **control.last)
        return avg

    def _method_state(self) -> dict[str, Any]:
        assert self._control is not None
        return {"control": self._control.state_dict(), "generator": self._generator.get_state()}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        assert self._control is not None
        self._control.load_state_dict(state["control"])
        self._generator.set_state(state["generator"])
