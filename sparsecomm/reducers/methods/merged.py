"""Merged-gradient sparsification: OMGS-SGD and accuracy-guided tensor fusion (AGTF)."""
from __future__ import annotations

import functools
import math
import time
from typing import Any, Sequence

import torch

from ...validate import boolean, positive_int, positive_ints
from ..base import ReduceCall, Reducer
from ..comm.exchange import PairsInFlight, pack, start_pairs_gather
from ..select.grouping import LinearCost, best_grouping, fit_linear, fusion_allowed, groups_from_sizes, predicted_time
from ..layout import Layout
from ..registry import register
from ..select.primitives import allocate_k, target_count, topk

# Sizes (elements) at which the start-up measurement times selection and all-gathers: the
# first three always, larger ones up to twice the model.
_PROFILE_SIZES = (1 << 10, 1 << 13, 1 << 16, 1 << 19, 1 << 21)


class MergedSparsifier(Reducer):
    """Layers are the tensors, taken in backward order (the last parameter first). They are
    merged into groups of consecutive layers; each group's compensated gradient is sparsified
    with one top-k and its (index, value) pairs all-gathered (sparse gather-sum), each worker
    zeroing its residual at its own positions.

    With :meth:`attach`, each group is sparsified and its all-gather started as soon as backward
    has produced its last gradient, while backward continues (the gradient hooks launch groups
    strictly in group order, so every rank starts the same collectives in the same order); the
    step is finished by ``reduce``, which launches whatever is left, waits, and adds up. Without
    ``attach`` (or with ``overlap=False``) everything happens in ``reduce``: the same groups, the
    same selections, the same average. The first step always runs without overlap: it measures
    the per-layer backward times (when attached) and fits the cost models, and its handshake
    checks that every rank has the same layout; overlap starts at the second step.

    The grouping comes from ``groups`` (group lengths in layers, backward order) or, by default,
    from the cost models fitted at the first step on this machine (:mod:`..grouping`): all-gather
    time against the number of selected elements, top-k time against the group size, and the
    per-layer backward times, all taken as the maximum over ranks so that every rank forms the
    same groups. ``describe()`` reports the fitted constants, the times and the grouping.
    """

    def __init__(self, *, groups: Sequence[int] | None = None, overlap: bool = True, **common: Any) -> None:
        self.groups_option = None if groups is None else positive_ints("groups", groups,
                                                                       "layer counts, backward order")
        self.overlap = boolean("overlap", overlap)
        super().__init__(**common)
        self._groups: list[tuple[int, int]] | None = None   # [i, j) in backward order
        self._cost: dict[str, Any] = {}
        self._params: list[torch.nn.Parameter] | None = None
        self._stamps: dict[int, float] = {}
        self._backward: list[float] | None = None
        self._predicted: float | None = None
        self._history: list[dict[str, Any]] = []
        self._reset_step_state()

    def options(self) -> dict[str, Any]:
        return {"groups": self.groups_option, "overlap": self.overlap}

    # ------------------------------------------------------------------ layers and groups
    def _configure(self, layout: Layout) -> None:
        self._L = len(layout.shapes)
        self._sizes_bw = layout.sizes[::-1]
        if self.groups_option is not None:
            self._groups = groups_from_sizes(self.groups_option, self._L)
        self._configure_densities(layout)

    def _configure_densities(self, layout: Layout) -> None:
        """Per-layer selected counts (backward order); OMGS: the target density everywhere."""
        self._k_bw = [self.density * n for n in self._sizes_bw]

    def _tensors(self, group: tuple[int, int]) -> range:
        """Tensor numbers (parameter order) of a group given in backward layers."""
        i, j = group
        return range(self._L - j, self._L - i)

    def _segment(self, group: tuple[int, int]) -> tuple[int, int]:
        t = self._tensors(group)
        offsets = self.layout.offsets
        return offsets[t.start], offsets[t.stop]

    def _group_k(self, group: tuple[int, int]) -> int:
        a, b = self._segment(group)
        return target_count(self.density, b - a)

    # ---------------------------------------------------------------------- the hooks
    def attach(self, model: Any) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        self._params = params
        for number, p in enumerate(params):
            p.register_post_accumulate_grad_hook(functools.partial(self._on_grad, number))

    def _overlapping(self) -> bool:
        return (self.overlap and self._params is not None and self._groups is not None
                and self.layout is not None and self.steps >= 1)

    def _on_grad(self, number: int, param: torch.Tensor) -> None:
        if not self._overlapping():
            self._stamps[number] = time.perf_counter()
            return
        call = self.open_call()
        if self._group_of is None:
            self._count_members()
        g = self._group_of[number]
        self._missing[g] -= 1
        while self._next < len(self._groups) and self._missing[self._next] == 0:
            self._launch(call, self._next, [p.grad for p in self._params])

    def _count_members(self) -> None:
        """A hooked step's bookkeeping: each tensor's group, and how many gradients each group waits for."""
        self._group_of = {}
        self._missing = []
        for g, group in enumerate(self._groups):
            members = self._tensors(group)
            self._missing.append(len(members))
            for t in members:
                self._group_of[t] = g

    def _reset_step_state(self) -> None:
        self._group_of: dict[int, int] | None = None
        self._missing: list[int] = []
        self._next = 0
        self._in_flight: list[tuple[PairsInFlight, torch.Tensor]] = []

    def _end_step(self) -> None:
        for pairs, _ in self._in_flight:  # a step abandoned mid-way: let its collectives finish
            pairs.wait()
        self._reset_step_state()

    # ---------------------------------------------------------------------- one group
    def _launch(self, call: ReduceCall, g: int, grads: Sequence[torch.Tensor] | None) -> None:
        """Compensate group ``g``'s tensors (unless built), select its top-k and start the
        all-gather of its pairs."""
        group = self._groups[g]
        a, b = self._segment(group)
        k = self._group_k(group)
        with call.phase("select"):
            x = call.compensate(grads, self._tensors(group)) if grads is not None else call.x
            idx = topk(x[a:b], k, call.layout.index_dtype, call.scratch()).add_(a) if k else \
                torch.empty(0, dtype=call.layout.index_dtype, device=x.device)
        if k:
            with call.phase("comm"):
                self._in_flight.append((start_pairs_gather(self.comm, idx, x[idx], k), idx))
        self._next = g + 1

    # ------------------------------------------------------------------------ a step
    def _run(self, call: ReduceCall) -> torch.Tensor:
        overlapping = self._overlapping()
        if not overlapping:  # handshake first: layouts are checked before any group is sent
            call.handshake()
            if self._groups is None or self.steps == 0:
                self._decide(call)
        for g in range(self._next, len(self._groups)):
            self._launch(call, g, None)
        if overlapping:  # the groups went first (hooks started them); the handshake closes the step
            call.handshake()
        avg = call.output()
        own, received = [], 0
        with call.phase("comm"):
            for pairs, idx in self._in_flight:
                received += pairs.add_into(avg).numel()
                own.append(idx)
            self._in_flight = []
        sent = torch.cat(own) if own else torch.empty(0, dtype=call.layout.index_dtype, device=call.x.device)
        self._after_step(call)  # before the commit: call.x still holds the compensated gradient
        call.commit_sparse(sent)
        call.counted(selected=sent.numel(), received=received)
        call.stats.update(groups=len(self._groups), overlapped=overlapping)
        return avg

    def _after_step(self, call: ReduceCall) -> None:
        """Called once the exchange is done, before the residual is committed, for methods that
        revise their grouping as training goes (AGTF); a new grouping applies from the next step."""

    # --------------------------------------------------------------- fitting and grouping
    def _decide(self, call: ReduceCall) -> None:
        """At the first step: fit the cost models (collectives) and form the groups."""
        select, comm = self._fit_costs(call)
        self._backward = self._backward_times(call)
        self._regroup(call, select, comm, from_step=self.steps)

    def _fit_costs(self, call: ReduceCall) -> tuple[LinearCost, LinearCost]:
        if self._cost:
            return LinearCost(*self._cost["select"]), LinearCost(*self._cost["comm"])
        device, dtype = call.x.device, call.x.dtype
        gen = torch.Generator().manual_seed(12345)
        sizes = [n for i, n in enumerate(_PROFILE_SIZES) if i < 3 or n <= 2 * call.d]
        select_s, comm_s, comm_n = [], [], []
        for n in sizes:
            v = torch.randn(n, generator=gen).to(device, dtype)
            k = target_count(self.density, n)
            select_s.append(_median_time(lambda: topk(v, k, call.layout.index_dtype), device))
            row = pack([torch.zeros(k, dtype=call.layout.index_dtype, device=device),
                        torch.zeros(k, dtype=dtype, device=device)], k)
            comm_s.append(_median_time(lambda: self.comm.all_gather(row), device))
            comm_n.append(k)
        # the same fit on every rank: the slowest rank's times
        times = torch.tensor(select_s + comm_s, dtype=torch.float64, device=device)
        times = self._max_over_ranks(times)
        select = fit_linear(sizes, times[:len(sizes)].tolist())
        comm = fit_linear(comm_n, times[len(sizes):].tolist())
        self._cost = {"select": select.as_list(), "comm": comm.as_list(),
                      "measured": {"select_sizes": sizes, "select_s": times[:len(sizes)].tolist(),
                                   "comm_selected": comm_n, "comm_s": times[len(sizes):].tolist()}}
        self.comm.reset_counters()  # the measurement's collectives are not the step's traffic
        return select, comm

    def _max_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        table = self.comm.all_gather(values)
        return table.max(dim=0).values.cpu()

    def _backward_times(self, call: ReduceCall) -> list[float]:
        """Per-layer backward times (backward order) from the first step's gradient hooks:
        the gap between a layer's gradient and the one before it; zeros without hooks."""
        L = self._L
        times = [0.0] * L
        if self._stamps:
            order = sorted(self._stamps.items(), key=lambda e: e[1])
            for (number, t), (_, before) in zip(order[1:], order[:-1]):
                times[L - 1 - number] = t - before
            first = order[0][0]
            times[L - 1 - first] = min((t for t in times if t > 0), default=0.0)
        self._stamps = {}
        values = self._max_over_ranks(torch.tensor(times, dtype=torch.float64, device=call.x.device))
        self.comm.reset_counters()
        return values.tolist()

    def _regroup(self, call: ReduceCall, select: LinearCost, comm: LinearCost, from_step: int) -> None:
        """Form the groups used from step ``from_step`` on (and note them in the history)."""
        if self.groups_option is not None:
            self._groups = groups_from_sizes(self.groups_option, self._L)
        else:
            self._groups, _ = best_grouping(self._backward, self._sizes_bw, self._k_bw, select, comm,
                                            self._allowed())
        self._predicted = predicted_time(self._groups, self._backward, self._sizes_bw, self._k_bw, select, comm)
        self._history.append({"from_step": from_step, "groups": [j - i for i, j in self._groups],
                              "k_per_layer": [int(self._group_k((i, i + 1))) for i in range(self._L)],
                              "predicted_iteration_s": self._predicted})

    def _allowed(self):
        return None

    def describe(self) -> dict[str, Any]:
        if self._groups is None:
            return {}
        return {"method": self.name, "groups": [j - i for i, j in self._groups],
                "group_tensors_backward_order": [list(self._tensors(g))[::-1] for g in self._groups],
                "cost_model": {k: v for k, v in self._cost.items() if k != "measured"},
                "cost_measurements": self._cost.get("measured"),
                "backward_times_s": self._backward, "predicted_iteration_s": self._predicted,
                "history": self._history}

    # ------------------------------------------------------------------------- state
    def _method_state(self) -> dict[str, Any]:
        return {"groups": None if self._groups is None else [list(g) for g in self._groups],
                "cost": self._cost, "backward": self._backward, "history": self._history}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        self._groups = None if state["groups"] is None else [tuple(g) for g in state["groups"]]
        self._cost = dict(state["cost"])
        self._backward = state["backward"]
        self._history = list(state["history"])


def _median_time(fn, device: torch.device, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@register
class OMGS(MergedSparsifier):
    """OMGS-SGD (Shi et al., INFOCOM 2020): merged-gradient sparsification with the grouping
    that minimises the predicted iteration time (an exact dynamic program over group
    boundaries, see :mod:`sparsecomm.reducers.select.grouping`); top-k with k = max(1, floor(c n_g))
    per group; overlap with backward when attached."""

    name = "omgs"
    per_tensor = False  # top-k over groups of layers merged by a model of the whole backward pass
    summary = "merged-gradient top-k over layer groups chosen by fitted cost models, overlapping backward"


@register
class AGTF(MergedSparsifier):
    """Accuracy-guided tensor fusion (the SNA-MGS-SGD prototype): OMGS's pipeline and grouping,
    but every layer has its own density, from its importance: the budget k = max(1, floor(c d))
    is shared among layers in proportion to the L2 norms of their compensated gradients (summed
    over ranks) as DEFT shares it (:func:`~sparsecomm.reducers.select.primitives.allocate_k`: each layer
    at least 1 and at most its size); and a group is formed only
    if the fused selection does not raise the sparsification-noise model (docs/reducers.md, *Choices*, AGTF):
    ``(sum p / sum k - 1) sum g <= sum (1/rho - 1) g``. A fused group sends the top ``sum k_i``
    of the group. Densities and groups are revised every ``regroup_every`` steps (one small
    all-reduce of the norms); a new grouping takes effect at the next step."""

    name = "agtf"
    per_tensor = False  # the budget shared among layers by their norms, layers merged into groups
    summary = "OMGS grouping with per-layer densities and a fusion rule that never raises the noise model"

    def __init__(self, *, groups: Sequence[int] | None = None, overlap: bool = True, regroup_every: int = 100,
                 **common: Any) -> None:
        self.regroup_every = positive_int("regroup_every", regroup_every)
        super().__init__(groups=groups, overlap=overlap, **common)
        self._sq_norms: list[float] | None = None
        self._k_layers: list[int] | None = None

    def options(self) -> dict[str, Any]:
        return {**super().options(), "regroup_every": self.regroup_every}

    def _configure_densities(self, layout: Layout) -> None:
        if self._k_layers is None or len(self._k_layers) != self._L:
            self._k_layers = [target_count(self.density, n) for n in self._sizes_bw]  # until norms are known
        self._k_bw = [float(k) for k in self._k_layers]

    def _group_k(self, group: tuple[int, int]) -> int:
        i, j = group
        return int(sum(self._k_layers[i:j]))

    def _allowed(self):
        if self._sq_norms is None:
            return None
        densities = [k / n if n else 1.0 for k, n in zip(self._k_layers, self._sizes_bw)]
        return fusion_allowed(self._sizes_bw, densities, self._sq_norms)

    def _share_budget(self, call: ReduceCall) -> None:
        """k per layer from the norms of the compensated gradient, summed over ranks."""
        layout = call.layout
        norms = torch.stack([call.x[a:b].float().pow(2).sum() if b > a else call.x.new_zeros((), dtype=torch.float32)
                             for a, b in layout.segments]) if layout.segments else call.x.new_zeros(0)
        sq = self.comm.all_reduce_(norms.to(torch.float64)).cpu().tolist()[::-1]  # backward order
        self._sq_norms = sq
        k_layers = allocate_k([math.sqrt(v) for v in sq], self._sizes_bw, target_count(self.density, call.d))
        k_layers = [k if n else 0 for k, n in zip(k_layers, self._sizes_bw)]
        self._k_layers = k_layers
        self._k_bw = [float(k) for k in k_layers]

    def _after_step(self, call: ReduceCall) -> None:
        if self.steps % self.regroup_every == 0:  # self.steps counts steps before this one
            self._share_budget(call)
            select, comm = LinearCost(*self._cost["select"]), LinearCost(*self._cost["comm"])
            self._regroup(call, select, comm, from_step=self.steps + 1)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        if info:
            info["k_per_layer_backward_order"] = list(self._k_layers)
        return info

    def _method_state(self) -> dict[str, Any]:
        return {**super()._method_state(), "k_layers": list(self._k_layers), "sq_norms": self._sq_norms}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        super()._load_method_state(state)
        self._k_layers = [int(k) for k in state["k_layers"]]
        self._k_bw = [float(k) for k in self._k_layers]
        self._sq_norms = state["sq_norms"]
