"""Deep Gradient Compression: sampled-threshold sparsification with momentum correction."""
from __future__ import annotations

import math
from typing import Any

import torch

from ...validate import boolean, nonnegative_int, number
from ..base import ReduceCall, Reducer
from ..comm.exchange import SkipStep, allreduce_at, routed_gather_sum, sparse_gather_sum
from ..layout import Layout
from ..registry import register
from ..select.primitives import target_count
from .sparse_base import routed_stats

_LOWER = 0.8  # a count below 0.8 k lowers the threshold by this factor (the authors' code)
_ADAPTATIONS = 10  # at most this many lowerings per tensor and step


@register
class DGC(Reducer):
    """Deep Gradient Compression (Lin, Han, Mao, Wang & Dally, ICLR 2018), after the paper and
    its authors' code (synxlin/deep-gradient-compression).

    Per worker and step: the gradient (clipped locally when ``clip_norm`` is set) enters the
    momentum u <- mu u + g and the velocity v <- v + u; in each tensor of two or more dimensions
    the coordinates of v above a threshold estimated from a sample are sent (at most k_t) by
    sparse gather-sum, and u is zeroed where v was sent (momentum factor masking); v keeps the
    rest (the residual). 1-d tensors are all-reduced and get momentum SGD on their average. The
    density warms up as max(c, ``warmup_coeff`` ** (epoch + 1)) over the first
    ``warmup_epochs`` epochs (:meth:`begin_epoch`).

    The average already carries the momentum: step it with plain SGD at momentum 0 (the
    trainer refuses another optimizer beside it). Every choice where the paper and the code
    leave room, and why, is in docs/reducers.md (*Choices where the sources leave room*, DGC).

    Args:
        momentum: mu (0: no momentum correction; the plain conservation identity then holds).
        momentum_masking: zero u where v was sent.
        sample_ratio: the share of a tensor sampled for its threshold.
        warmup_epochs, warmup_coeff: the density warm-up.
        clip_norm: local clipping of each worker's gradient at clip_norm / sqrt(P) (None: off).

    Stats: ``adaptations`` (threshold lowerings this step), ``cut`` (tensors whose count
    exceeded k_t and was cut to the k_t largest).

    Example::

        r = reducers.build("dgc", density=0.001, momentum=0.9)   # with torch.optim.SGD(momentum=0)
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
    def per_tensor(self) -> bool:  # type: ignore[override]
        """Thresholds, momentum and masking are per tensor; the local clipping (``clip_norm``)
        scales every tensor by the norm of all of them."""
        return self.clip_norm is None

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
            routed = None
            if self.owners is None:
                avg, union = sparse_gather_sum(self.comm, x, idx, header.counts, call.output())
            else:  # route_to: each pair to its owner; the 1-d tensors stay all-reduced: the momentum below
                # reads their whole average (method state every rank keeps alike)
                avg, union, routed = routed_gather_sum(self.comm, x, idx, header.counts, call.output(), self.owners)
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
        if routed is None:
            call.counted(selected=idx.numel() + dense.numel(), received=union.numel() + dense.numel())
        else:
            routed_stats(call, self.owners, idx.numel(), union, routed, dense)
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

    def _tensor_state(self, i: int) -> dict[str, torch.Tensor]:
        """Tensor ``i``'s momentum u (its velocity v is the residual)."""
        a, b = self.layout.segments[i]
        return {"momentum": self._u[a:b].detach().clone()}

    def _load_tensor_state(self, i: int, state: dict[str, torch.Tensor]) -> None:
        u = state.get("momentum")
        a, b = self.layout.segments[i]
        if u is not None and u.numel() == b - a:
            self._u[a:b].copy_(u.reshape(-1))
