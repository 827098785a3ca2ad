"""Deep Gradient Compression: sampled-threshold sparsification with momentum correction."""
from __future__ import annotations

import math
from typing import Any

import torch

from ...validate import boolean, nonnegative_int, number
from ..base import ReduceCall, Reducer
from ..comm.exchange import SkipStep, allreduce_at, sparse_gather_sum
from ..layout import Layout
from ..registry import register
from ..select.primitives import target_count

_LOWER = 0.8  # a count below 0.8 k lowers the threshold by this factor (the authors' code)
_ADAPTATIONS = 10  # at most this many lowerings per tensor and step


@register
class DGC(Reducer):
    """Deep Gradient Compression (Lin, Han, Mao, Wang & Dally, ICLR 2018), after the paper and
    its authors' code (synxlin/deep-gradient-compression).

    **Momentum correction.** The reducer owns the momentum: per worker, u <- mu u + g (the
    momentum, ``momentum`` = mu) and v <- v + u (the accumulated velocity); v is sparsified
    and sent, and the error-feedback residual (``memory``) is v where nothing was sent.
    **Momentum factor masking** (``momentum_masking``): u is zeroed where v was sent. With
    ``error_feedback=False`` the unsent part of v is dropped (no accumulation); u is kept.

    **Composition with the optimizer.** The average the reducer returns already carries the
    momentum: apply it with plain SGD, *momentum 0* and no Nesterov (the update is
    w <- w - lr avg), or the momentum is applied twice. Weight decay in the optimizer then acts
    without momentum (the authors' optimizer keeps a momentum for the weight-decay term alone);
    add the decay to the gradient before ``reduce`` to give it momentum as momentum SGD would.
    Not meant for Adam. The momentum accumulates gradients, not lr-scaled steps (PyTorch's
    convention), so learning-rate schedules apply as with ``torch.optim.SGD``.

    **Which tensors.** As in the authors' code, only tensors of two or more dimensions are
    sparsified; 1-d tensors (biases, normalisation weights) are all-reduced densely and the
    momentum is applied to their average (u <- mu u + avg, the same on every rank; ``avg`` is
    u there), which is momentum SGD. Every compressed tensor t sends at most
    k_t = max(1, floor(c_t n_t)) coordinates.

    **Sampled threshold.** Per compressed tensor: if n_t <= ceil(2 / c), its exact top-k;
    otherwise s_t = max(ceil(n_t ``sample_ratio``), ceil(2 / c)) positions are drawn uniformly
    (with replacement) and the threshold is the ceil(s_t c)-th largest |v| among them. If more
    than k_t coordinates pass, the k_t largest of them are sent (the authors' code re-selects
    above 1.3 k_t and otherwise keeps the first k_t positions, a bias towards the start of the
    tensor; here always the largest); if fewer than 0.8 k_t pass, the threshold is multiplied
    by 0.8 and the count taken again, at most 10 times. Positions are drawn on the CPU from
    one generator seeded with ``seed``, the same on every rank (any draw would do; this one
    is reproducible), one draw per step for all tensors. The pairs travel by sparse gather-sum
    (int32 positions, values in the gradient's dtype, padded to the largest count, as the
    authors' all-gather), the dense tensors by one all-reduce.

    **Local gradient clipping** (``clip_norm``, off by default as in the authors' image
    configurations): before the gradient enters the momentum, each worker scales its own g by
    min(1, clip_norm / sqrt(P) / (||g||_2 + 1e-6)), ||g||_2 over all its tensors (the paper:
    "scale the threshold by N^-1/2"; the authors' code clips per tensor). Use it instead of the
    training loop's ``clip_norm``, which clips the averaged update (momentum included).

    **Warm-up.** During the first ``warmup_epochs`` epochs the density is
    max(c, ``warmup_coeff`` ** (epoch + 1)): 0.25, 0.0625, 0.0156, 0.0039 and then c = 0.001
    by default (the paper's exponential warm-up; the authors' code derives the coefficient
    from c and the epoch count instead). The epoch comes from :meth:`begin_epoch`, which the
    training loop calls; a reducer never told its epoch (a benchmark, a DDP hook without
    ``begin_epoch``) uses c from the start. ``target_density`` reports the current density.

    **Conservation.** The momentum adds mass: with the momentum u_w each worker held before the
    step, sum_w (x_w + mu u_w) = P avg + sum_w m_w(new), x_w = g_w + m_w the compensated
    gradient; with momentum 0 this is the plain identity (``conserves`` is True only then).

    Stats: ``adaptations`` (threshold lowerings this step, all tensors), ``cut`` (tensors
    whose count exceeded k_t and was cut to the k_t largest).
    """

    name = "dgc"
    summary = "sampled-threshold top-k with momentum correction and masking, local clipping, density warm-up (DGC)"

    def __init__(self, *, momentum: float = 0.9, momentum_masking: bool = True, sample_ratio: float = 0.01,
                 warmup_epochs: int = 4, warmup_coeff: float = 0.25, clip_norm: float | None = None,
                 **common: Any) -> None:
        self.momentum = number("momentum", momentum, 0.0, 1.0, high_open=True)
        self.momentum_masking = boolean("momentum_masking", momentum_masking)
        self.sample_ratio = number("sample_ratio", sample_ratio, 0.0, 1.0, low_open=True,
                                   meaning="fraction of a tensor sampled for its threshold")
        self.warmup_epochs = nonnegative_int("warmup_epochs", warmup_epochs, "epochs of density warm-up")
        self.warmup_coeff = number("warmup_coeff", warmup_coeff, 0.0, 1.0, low_open=True,
                                   meaning="the warm-up density of epoch e is warmup_coeff ** (e + 1)")
        self.clip_norm = None if clip_norm is None else number(
            "clip_norm", clip_norm, 0.0, low_open=True,
            meaning="local L2 clipping norm before the N^-1/2 scaling, or None")
        super().__init__(**common)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._epoch: int | None = None
        self._lr: float | None = None
        self._plans: dict[float, list[tuple[int, int, int, int, int]]] = {}

    def options(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "momentum_masking": self.momentum_masking,
                "sample_ratio": self.sample_ratio, "warmup_epochs": self.warmup_epochs,
                "warmup_coeff": self.warmup_coeff, "clip_norm": self.clip_norm}

    @property
    def conserves(self) -> bool:
        """The plain conservation identity holds only without momentum (see the class)."""
        return self.momentum == 0.0

    @property
    def applies_momentum(self) -> bool:  # type: ignore[override]
        return self.momentum > 0.0

    # ------------------------------------------------------------------------ training context
    def begin_epoch(self, epoch: int, lr: float, epochs: float) -> None:
        self._epoch = int(epoch)
        self._lr = None if lr is None else float(lr)

    def density_at(self, epoch: int | None) -> float:
        """The density of ``epoch`` (the target density when the epoch is unknown)."""
        if epoch is None or epoch >= self.warmup_epochs:
            return self.density
        return max(self.density, self.warmup_coeff ** (epoch + 1))

    @property
    def target_density(self) -> float:
        return self.density_at(self._epoch)

    # ------------------------------------------------------------------------ set-up
    def _configure(self, layout: Layout) -> None:
        self._compressed = [(i, a, b) for i, (shape, (a, b)) in enumerate(zip(layout.shapes, layout.segments))
                            if len(shape) > 1 and b > a]
        dense = [torch.arange(a, b) for shape, (a, b) in zip(layout.shapes, layout.segments)
                 if len(shape) <= 1 and b > a]
        self._dense = (torch.cat(dense) if dense else torch.empty(0, dtype=torch.int64)).to(
            layout.device, layout.index_dtype)
        self._u = torch.zeros(layout.numel, dtype=layout.dtype, device=layout.device)
        self._plans = {}
        self._mask: torch.Tensor | None = None
        self._mask_plan: list | None = None

    def _plan(self, density: float) -> list[tuple[int, int, int, int, int]]:
        """Per compressed tensor: (a, b, k, samples, k among the samples); samples 0: exact top-k."""
        if density not in self._plans:
            full = math.ceil(2.0 / density)
            plan = []
            for _, a, b in self._compressed:
                n = b - a
                k = target_count(density, n)
                if n <= full:
                    plan.append((a, b, k, 0, k))
                else:
                    s = max(math.ceil(n * self.sample_ratio), full)
                    plan.append((a, b, k, s, max(1, math.ceil(s * density))))
            self._plans[density] = plan
        return self._plans[density]

    # ------------------------------------------------------------------------ the step
    def _run(self, call: ReduceCall) -> torch.Tensor:
        x, m, u, mu = call.x, call.residual, self._u, self.momentum
        plan = self._plan(self.target_density)
        state = self._generator.get_state()
        with call.phase("select"):
            if self.clip_norm is not None:
                self._clip(call)
            if mu:
                scaled = torch.mul(u, mu, out=call.scratch())
                for _, a, b in self._compressed:  # v = v + (mu u + g): x = g + v already
                    x[a:b].add_(scaled[a:b])
            idx, adaptations, cut = self._select(x, plan, call.layout.index_dtype, call.scratch())
        try:
            header = call.handshake(count=idx.numel())
        except SkipStep:
            self._generator.set_state(state)  # a skipped step leaves the method's state as it was
            raise
        dense = self._dense
        with call.phase("comm"):
            avg, union = sparse_gather_sum(self.comm, x, idx, header.counts, call.output())
            if dense.numel():
                allreduce_at(self.comm, x, dense, avg)
        with call.phase("select"):
            if mu:
                for _, a, b in self._compressed:  # u = v_new - v_old = mu u + g
                    torch.sub(x[a:b], m[a:b], out=u[a:b])
                if self.momentum_masking and idx.numel():
                    u[idx] = 0
                if dense.numel():  # momentum SGD on the dense tensors' average
                    u[dense] = u[dense] * mu + avg[dense]
                    avg[dense] = u[dense]
        call.commit_sparse(torch.cat([idx, dense]) if dense.numel() else idx)
        call.counted(selected=idx.numel() + dense.numel(), received=union.numel() + dense.numel())
        call.stats.update(adaptations=adaptations, cut=cut)
        return avg

    def _clip(self, call: ReduceCall) -> None:
        """x = m + g * min(1, clip_norm / sqrt(P) / (||g|| + 1e-6)), g = x - m."""
        x, m = call.x, call.residual
        g = torch.sub(x, m, out=call.scratch())
        norm = torch.linalg.vector_norm(g, dtype=torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else None)
        coef = torch.clamp(self.clip_norm / math.sqrt(self.comm.size) / (norm + 1e-6), max=1.0)
        torch.add(m, g.mul_(coef.to(g.dtype)), out=x)

    def _select(self, x: torch.Tensor, plan: list[tuple[int, int, int, int, int]], index_dtype: torch.dtype,
                scratch: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Sorted positions to send, threshold lowerings, tensors cut to their k. |x| is formed
        once (in ``scratch``), the thresholds' comparisons land in one mask, and one ``nonzero``
        finds every tensor's passing positions: the host learns sizes twice, plus once per
        threshold lowering, however many tensors there are."""
        magnitude = torch.abs(x, out=scratch)
        if self._mask is None or self._mask_plan is not plan:  # ranges of tensors not sampled stay False
            self._mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
            self._mask_plan = plan
        mask = self._mask
        sampled = [entry for entry in plan if entry[3]]
        parts = [torch.topk(magnitude[a:b], k, sorted=False).indices.add_(a)  # small tensors: exact top-k
                 for a, b, k, s, _ in plan if not s]
        adaptations = cut = 0
        if sampled:
            counts = torch.tensor([s for _, _, _, s, _ in sampled], dtype=torch.int64)
            sizes = torch.tensor([b - a for a, b, _, _, _ in sampled], dtype=torch.float64).repeat_interleave(counts)
            starts = torch.tensor([a for a, _, _, _, _ in sampled], dtype=torch.int64).repeat_interleave(counts)
            draws = torch.rand(int(counts.sum()), generator=self._generator, dtype=torch.float64)
            positions = draws.mul_(sizes).floor_().long().add_(starts)  # uniform in each tensor
            samples = magnitude[positions.to(x.device)]
            thresholds, at = [], 0
            for a, b, k, s, ks in sampled:  # the ks-th largest sampled |x|
                thresholds.append(torch.topk(samples[at:at + s], ks, sorted=False).values.min())
                at += s
                torch.ge(magnitude[a:b], thresholds[-1], out=mask[a:b])
            passed = torch.nonzero(mask).view(-1)
            ends = torch.tensor([b for _, b, _, _, _ in sampled], dtype=passed.dtype, device=x.device)
            bounds = [0] + torch.searchsorted(passed, ends).tolist()
            for j, (a, b, k, s, ks) in enumerate(sampled):
                chosen = passed[bounds[j]:bounds[j + 1]]
                t, tries = thresholds[j], 0
                while chosen.numel() < _LOWER * k and tries < _ADAPTATIONS:
                    t, tries = t * _LOWER, tries + 1
                    chosen = torch.nonzero(magnitude[a:b] >= t).view(-1).add_(a)
                adaptations += tries
                if chosen.numel() > k:  # the k largest of those that passed
                    chosen = chosen[torch.topk(magnitude[chosen], k, sorted=False).indices]
                    cut += 1
                parts.append(chosen)
        if not parts:
            return torch.empty(0, dtype=index_dtype, device=x.device), 0, 0
        return torch.sort(torch.cat(parts)).values.to(index_dtype), adaptations, cut

    # ------------------------------------------------------------------------ reporting, state
    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"epoch": self._epoch, "lr": self._lr,
                                "density": self.target_density}
        if self.layout is not None:
            info.update(compressed=[i for i, _, _ in self._compressed],
                        dense=[i for i, shape in enumerate(self.layout.shapes) if len(shape) <= 1])
        return info

    def _method_state(self) -> dict[str, Any]:
        return {"momentum": self._u.detach().cpu().clone(), "generator": self._generator.get_state(),
                "epoch": self._epoch, "lr": self._lr}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        self._u.copy_(state["momentum"].to(self._u.device))
        self._generator.set_state(state["generator"])
        self._epoch = state["epoch"]
        self._lr = state["lr"]
