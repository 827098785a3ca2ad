"""One method applied to a model's gradients bucket by bucket, its state kept by parameter.

A *bucket* is a group of the model's parameters, named by their positions in the model's
parameter order: one of DDP's gradient buckets in the communication hook
(:mod:`sparsecomm.ddp`), or one of the groups the training loop cuts from the end of the model
as DDP cuts its own (:func:`cut_buckets`). :class:`BucketReducer` reduces each bucket with a
reducer of its own, a *unit*, built for that composition of parameters the first time it is
seen, and can run a bucket's reduce on a worker thread while backward goes on
(:meth:`BucketReducer.submit`; :meth:`BucketReducer.finish` waits for the step).

What is kept by parameter and what by unit:

- by parameter: the residual, and what a method keeps per tensor (PowerSGD's Q, DGC's
  momentum; ``Reducer.tensor_states``). When a bucket of a new composition arrives (DDP's
  rebuild of its buckets after the first iteration), the units holding any of its parameters
  are dissolved into per-parameter state, and the new unit starts from it: residuals go on
  exactly, whatever the bucketing.
- by unit: what belongs to a unit's whole vector (a threshold and its controller, partitions,
  random streams, decisions). A new unit starts it afresh (a whole-model method's warm start,
  a random stream of its own, seeded ``seed + 1_000_003 * serial``, serial counting the units
  made). A unit keeps its step count: a per-tensor method's new unit starts at the
  reducer's step count (PowerSGD's ``start_iter`` is by step), a whole-model method's at 0 (a
  new model for it).

A bucket whose parameters are exactly several live units (the single first bucket of a fresh
DDP model resumed from a state saved after DDP's rebuild) is reduced unit by unit, so a resumed
run reduces the same units as the run that saved the state, and resumes bit-exactly.

The training loop uses a :class:`BucketReducer` as its reducer: ``attach(model)`` registers
post-accumulate-grad hooks that submit each group as soon as it and every group before it
have their gradients, and ``reduce(grads, out=grads)`` after backward submits what is left
and waits.
"""
from __future__ import annotations

import concurrent.futures
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..validate import choice, number
from .base import STATE_FORMAT as REDUCER_STATE_FORMAT
from .base import Reducer
from .comm.exchange import LayoutMismatchError
from .layout import Layout
from .registry import build, lookup

__all__ = ["BucketReducer", "SCOPES", "resolve_scope", "cut_buckets", "STATE_FORMAT", "DEFAULT_BUCKET_MB"]

log = logging.getLogger(__name__)

SCOPES = ("auto", "bucket", "model")
STATE_FORMAT = "sparsecomm.buckets/1"
DEFAULT_BUCKET_MB = 25.0   # DDP's bucket_cap_mb
FIRST_BUCKET_MB = 1.0      # DDP's first bucket (the last layers) is this small, so that work starts early
_SEED_STRIDE = 1_000_003   # unit n's seed is seed + _SEED_STRIDE * n


def resolve_scope(scope: str, method: str, options: dict[str, Any] | None = None) -> str:
    """``"bucket"`` or ``"model"``: ``scope`` itself, or for ``"auto"`` ``"bucket"`` when
    method ``method`` with ``options`` has a result on each tensor that depends on that tensor
    alone (``Reducer.per_tensor``), else ``"model"``."""
    choice("scope", scope, SCOPES)
    if scope != "auto":
        return scope
    from .registry import is_per_tensor
    return "bucket" if is_per_tensor(method, **(options or {})) else "model"


def cut_buckets(sizes_bytes: Sequence[int], bucket_mb: float = DEFAULT_BUCKET_MB,
                first_mb: float = FIRST_BUCKET_MB) -> list[tuple[int, ...]]:
    """Groups of positions 0..n-1 cut from the end, as DDP cuts its buckets: the last
    parameters first, a group closed as soon as it holds at least its cap (``first_mb`` for the
    first, ``bucket_mb`` after); each group's positions ascending (a contiguous run)."""
    caps = [min(first_mb, bucket_mb) * 2**20, bucket_mb * 2**20]
    groups: list[tuple[int, ...]] = []
    current: list[int] = []
    held = 0
    for i in reversed(range(len(sizes_bytes))):
        current.append(i)
        held += sizes_bytes[i]
        if held >= caps[min(len(groups), 1)]:
            groups.append(tuple(reversed(current)))
            current, held = [], 0
    if current:
        groups.append(tuple(reversed(current)))
    return groups


@dataclass(eq=False)
class _Unit:
    """The reducer of one composition of parameters (positions, in the order it is fed)."""

    positions: tuple[int, ...]
    seed: int
    reducer: Reducer | None = None      # built at its first use
    saved: dict[str, Any] | None = None  # a restored reducer state, loaded when it is built
    seeds: list[dict[str, Any] | None] | None = None  # per-parameter state it starts from
    start_step: int = 0


@dataclass
class _Job:
    """A bucket submitted for reduction: its units, each with the indices of its tensors among
    the bucket's, and what to call when they are done."""

    units: list[tuple[_Unit, list[int]]]
    grads: list[torch.Tensor]
    done: Callable[[BaseException | None], None] | None
    refusal: str | None = None
    event: Any = None
    device: torch.device | None = None
    future: concurrent.futures.Future | None = field(default=None, repr=False)


class BucketReducer:
    """Averages a model's gradients bucket by bucket with one method (``method``, ``density``,
    ``error_feedback``, ``seed``, ``options`` as :func:`~sparsecomm.reducers.build` takes them,
    on process group ``group``), each bucket by the unit reducer of its composition, with
    residuals and per-tensor state kept by parameter (see the module).

    ``bucket_mb``: the size of the groups :meth:`reduce` and :meth:`attach` cut (the DDP hook
    hands over DDP's own buckets instead). ``overlap``: :meth:`attach` registers
    post-accumulate-grad hooks that start each group's reduce during backward, on a worker
    thread; without it, :meth:`reduce` reduces every group in order when called.

    It offers a reducer's calls (``reduce``, ``attach``, ``begin_epoch``, ``stats``, ``stat``,
    ``describe``, ``options``, ``state_dict``, ``load_state_dict``, ``residual``), so the
    training loop uses it in place of one."""

    def __init__(self, method: str, density: float = 0.001, *, error_feedback: bool = True, seed: int = 0,
                 group: Any = None, bucket_mb: float = DEFAULT_BUCKET_MB, overlap: bool = True,
                 **options: Any) -> None:
        self._cls = lookup(method)
        self.name = method
        self.density = density
        self.error_feedback = bool(error_feedback)
        self.seed = int(seed)
        self.group = group
        self._options = dict(options)
        self.bucket_mb = number("bucket_mb", bucket_mb, 0.0, low_open=True, meaning="megabytes per bucket")
        self.overlap = bool(overlap)
        self._probe = build(method, density=density, error_feedback=error_feedback, seed=seed,
                            group=_solo(), **options)  # bad settings fail here; also answers class questions
        self._units: dict[tuple[int, ...], _Unit] = {}  # live units, in the order they were made
        self._owner: dict[int, tuple[int, ...]] = {}    # position -> the live unit holding it
        self._loose: dict[int, dict[str, Any]] = {}     # per-parameter state of positions in no live unit
        self._serial = 0
        self.steps = 0
        self.skipped_steps = 0
        self._epoch: tuple[int, float, float] | None = None
        self._shapes: list[tuple[int, ...]] | None = None
        self._dtype: torch.dtype | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._streams: dict[torch.device, Any] = {}
        self._jobs: list[_Job] = []
        self._error: BaseException | None = None  # the step's first error
        self._reduced: list[_Unit] = []       # this step's units, in the order they were reduced
        self._last: list[_Unit] = []          # the last finished step's
        self._stats: dict[str, Any] | None = {}
        # the training loop's groups and hooks
        self._groups: list[tuple[int, ...]] | None = None
        self._params: list[torch.Tensor] | None = None
        self._ready: list[int] = []
        self._next_group = 0

    # ------------------------------------------------------------------ what a reducer offers
    def options(self) -> dict[str, Any]:
        return self._probe.options()

    @property
    def per_tensor(self) -> bool:
        return bool(self._probe.per_tensor)

    @property
    def applies_momentum(self) -> bool:
        return bool(self._probe.applies_momentum)

    @property
    def conserves(self) -> bool:
        return bool(self._probe.conserves)

    @property
    def target_density(self) -> float:
        """The d-weighted mean of the units' target densities (the method's own before any step)."""
        units = [u for u in self._last if u.reducer is not None and u.reducer.layout is not None]
        d = sum(u.reducer.layout.numel for u in units)
        if not d:
            return self._probe.target_density
        return sum(u.reducer.target_density * u.reducer.layout.numel for u in units) / d

    @property
    def rank(self) -> int:
        return self._probe_comm().rank

    @property
    def world_size(self) -> int:
        return self._probe_comm().size

    @property
    def units(self) -> list[tuple[tuple[int, ...], Reducer | None]]:
        """The live units: each one's positions (in the order its reducer is fed) and reducer
        (None until its first use)."""
        return [(u.positions, u.reducer) for u in self._units.values()]

    def live_unit(self, positions: Sequence[int]) -> _Unit | None:
        """The live unit of exactly these positions (in this order), or None."""
        return self._units.get(tuple(positions))

    @property
    def last_units(self) -> list[tuple[tuple[int, ...], Reducer]]:
        """The units the last finished step reduced, in the order it reduced them."""
        return [(u.positions, u.reducer) for u in self._last if u.reducer is not None]

    def attach(self, model: Any) -> None:
        """Learn the model's trainable parameters (the positions are their order in
        ``model.parameters()``), cut them into groups of about ``bucket_mb`` from the end, and
        with ``overlap`` register hooks that start each group's reduce as soon as it and every
        group before it have their gradients (groups start in the same order on every rank)."""
        params = [p for p in model.parameters() if p.requires_grad]
        self._set_parameters([tuple(p.shape) for p in params], [p.numel() * p.element_size() for p in params])
        self._params = params
        if self.overlap:
            for position, p in enumerate(params):
                p.register_post_accumulate_grad_hook(lambda _, i=position: self._on_gradient(i))

    def begin_epoch(self, epoch: int, lr: float, epochs: float) -> None:
        """Pass the training context to every unit, and to units made later."""
        self._epoch = (epoch, lr, epochs)
        for unit in self._units.values():
            if unit.reducer is not None:
                unit.reducer.begin_epoch(epoch, lr, epochs)

    def describe(self) -> dict[str, Any]:
        """The scope and, per bucket of the last step, its parameters and what its reducer
        decided or fitted."""
        return {"scope": "bucket", "buckets": [{"parameters": list(u.positions), **u.reducer.describe()}
                                               for u in self._last if u.reducer is not None]}

    def reduce(self, grads: Sequence[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Average the model's gradients (``model.parameters()`` order, as a reducer takes
        them) group by group, in place when ``out`` is ``grads``: the groups the hooks have not
        started yet are started now, in order, and the step is waited for. Without ``out``
        the average is returned as new tensors."""
        grads = list(grads)
        if out is None:
            out = [g.clone() for g in grads]
        else:
            out = list(out)
            if any(o is not g for o, g in zip(out, grads)):
                torch._foreach_copy_(out, grads)
        if self._groups is None:
            layout = Layout.of(grads)
            self._set_parameters(list(layout.shapes), [g.numel() * g.element_size() for g in grads])
        elif len(out) != len(self._shapes or ()):
            raise LayoutMismatchError(f"expected {len(self._shapes or ())} gradients (the model's parameters), "
                                      f"got {len(out)}")
        assert self._groups is not None
        while self._next_group < len(self._groups):
            self._start_group(self._next_group, out)
        self._next_group = 0
        self._ready = [0] * len(self._groups)
        self.finish()
        return out

    # ------------------------------------------------------------------ buckets
    def set_shapes(self, shapes: Sequence[Sequence[int]], dtype: torch.dtype | None = None) -> None:
        """The shapes of all the model's parameters, in model order (positions index them)."""
        self._shapes = [tuple(s) for s in shapes]
        if dtype is not None:
            self._dtype = dtype

    def units_for(self, positions: Sequence[int], device: torch.device) -> list[tuple[_Unit, list[int]]]:
        """The units that reduce a bucket holding ``positions`` (in the order its tensors come),
        each with the indices of its tensors among the bucket's: the live unit of exactly this
        composition; or the live units it is made of, in the order they were made; or a new unit,
        made from the per-parameter state of the units it takes parameters from (which are
        dissolved). ``device``: where a dissolved unit that never ran sets up its state."""
        key = tuple(positions)
        if key in self._units:
            return [(self._units[key], list(range(len(key))))]
        owners = {self._owner.get(p) for p in key}
        wanted = set(key)
        if None not in owners and all(set(k) <= wanted for k in owners):
            index = {p: i for i, p in enumerate(key)}
            return [(self._units[k], [index[p] for p in k]) for k in self._units if k in owners]
        for owner in owners - {None}:
            self._dissolve(owner, device)
        return [(self._new_unit(key), list(range(len(key))))]

    def reduce_now(self, units: list[tuple[_Unit, list[int]]], grads: list[torch.Tensor],
                   done: Callable[[BaseException | None], None] | None = None) -> None:
        """Reduce a bucket's units in place in this thread, after any submitted work; errors
        are kept for :meth:`finish`."""
        self._wait_jobs()
        self._run(_Job(units, grads, done))

    def submit(self, units: list[tuple[_Unit, list[int]]], grads: list[torch.Tensor],
               done: Callable[[BaseException | None], None] | None = None) -> None:
        """Reduce a bucket's units in place on the worker thread, after everything submitted
        before; ``done(error)`` is called there when they are done (error None), inside the
        side CUDA stream the work ran on, if any."""
        self._enqueue(_Job(units, grads, done))

    def refuse(self, units: list[_Unit], problem: str) -> None:
        """Make these units' next reduce fail on every rank (their handshake carries ``problem``),
        in submission order: for a rank that cannot take part in the step as the others do."""
        self._enqueue(_Job([(u, []) for u in units], [], None, refusal=problem))

    def finish(self) -> None:
        """Wait for the step's work; close the step (counters, stats); raise the first error any
        unit raised, once all are done."""
        self._wait_jobs()
        error, self._error = self._error, None
        reduced, self._reduced = self._reduced, []
        if reduced:
            self._last = reduced
            self._stats = None
            if any(u.reducer is not None and u.reducer.stat("skipped", False) for u in reduced):
                self.skipped_steps += 1
            else:
                self.steps += 1
        if error is not None:
            raise error

    def close(self) -> None:
        """Wait for submitted work and stop the worker thread (a later submit starts a new one)."""
        self.abandon()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def abandon(self) -> None:
        """Forget a step that will not finish (its work is waited for, its errors dropped)."""
        self._wait_jobs()
        self._reduced, self._error = [], None

    # ------------------------------------------------------------------ stats
    @property
    def stats(self) -> dict[str, Any]:
        """The last step's measurements over all its buckets: bytes and times summed,
        densities (and every other number) weighted by the buckets' sizes, ``residual_norm``
        over all residuals, ``skipped`` when any bucket skipped; ``buckets`` counts them."""
        if self._stats is None:
            self._stats = self._combine()
        return dict(self._stats)

    def stat(self, key: str, default: Any = None) -> Any:
        return self.stats.get(key, default)

    def _combine(self) -> dict[str, Any]:
        units = [u for u in self._last if u.reducer is not None and u.reducer.layout is not None]
        if not units:
            return {}
        if len(units) == 1:
            return {**units[0].reducer.stats, "buckets": 1}
        parts = [(u.reducer.stats, u.reducer.layout.numel) for u in units]
        d = sum(n for _, n in parts)
        out: dict[str, Any] = {}
        for key in dict.fromkeys(k for s, _ in parts for k in s):
            values = [(s[key], n) for s, n in parts if key in s]
            if key in _SUMMED:
                out[key] = sum(v for v, _ in values)
            elif key == "residual_norm":
                out[key] = math.sqrt(sum(float(v) ** 2 for v, _ in values))
            elif key in ("skipped",):
                out[key] = any(bool(v) for v, _ in values)
            elif key == "nonfinite_ranks":
                out[key] = sorted({r for v, _ in values for r in v})
            elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v, _ in values):
                weight = sum(n for _, n in values)
                out[key] = sum(float(v) * n for v, n in values) / weight if weight else values[0][0]
            else:
                out[key] = values[0][0]
        out["density_ratio"] = out["density"] / out["target_density"] if out.get("target_density") else 0.0
        out["step"] = max(int(s["step"]) for s, _ in parts if "step" in s)
        out["skipped_steps"] = self.skipped_steps
        out["buckets"] = len(units)
        return out

    @property
    def residual(self) -> list[torch.Tensor]:
        """Every parameter's residual, in model order (empty before the first step, or with
        error feedback off)."""
        flat = self._flat_residual()
        if flat is None or self._shapes is None:
            return []
        return Layout(tuple(self._shapes), flat.dtype, flat.device).split(flat)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly on the same bucketing, and with exact
        residuals and per-tensor state on any other: settings, counters, every parameter's
        residual (one flat vector in model order), the live units (positions, seed, their
        reducers' states without the residual) and the per-parameter state of parameters in no
        live unit."""
        units = []
        for unit in self._units.values():
            state = unit.saved if unit.reducer is None else unit.reducer.state_dict()
            if state is not None:
                state = {k: v for k, v in state.items() if k != "residual"}
            units.append({"positions": list(unit.positions), "seed": unit.seed, "start_step": unit.start_step,
                          "reducer": state,
                          "seeds": None if unit.seeds is None else [_without_residual(s) for s in unit.seeds]})
        comm = self._probe_comm()
        return {"format": STATE_FORMAT, "method": self.name, "density": self.density,
                "error_feedback": self.error_feedback, "seed": self.seed, "options": self.options(),
                "residual_dtype": self._probe.residual_dtype, "rank": comm.rank, "world_size": comm.size, "steps": self.steps, "skipped_steps": self.skipped_steps,
                "serial": self._serial, "epoch": None if self._epoch is None else list(self._epoch),
                "shapes": None if self._shapes is None else [list(s) for s in self._shapes],
                "residual": self._flat_residual(cpu=True), "units": units,
                "loose": {p: _without_residual(s) for p, s in self._loose.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (or from a plain reducer's state of the whole model,
        taken as one unit of every parameter in model order). Settings must match; the rank
        and world size are checked by each unit's reducer when it is built."""
        if isinstance(state, dict) and state.get("format") == REDUCER_STATE_FORMAT:
            state = self._from_reducer_state(state)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a sparsecomm bucket reducer state (expected format {STATE_FORMAT!r} or "
                             f"{REDUCER_STATE_FORMAT!r})")
        mine = {"method": self.name, "density": self.density, "error_feedback": self.error_feedback,
                "seed": self.seed, "options": self.options(), "residual_dtype": self._probe.residual_dtype}
        wrong = [f"{k}: saved {state.get(k)!r}, this reducer {v!r}" for k, v in mine.items() if state.get(k) != v]
        if wrong:
            raise ValueError("bucket reducer state does not match this reducer (" + "; ".join(wrong) + ")")
        self.abandon()
        shapes = state["shapes"]
        if shapes is not None and self._shapes is not None and [list(s) for s in self._shapes] != shapes:
            raise LayoutMismatchError(f"the model's parameters ({len(self._shapes)} tensors) do not match the "
                                      f"restored state ({len(shapes)} tensors, or other shapes)")
        if shapes is not None:
            self._shapes = [tuple(s) for s in shapes]
        residuals = self._split(state["residual"], shapes)
        self._units, self._owner, self._loose = {}, {}, {}
        for record in state["units"]:
            key = tuple(int(p) for p in record["positions"])
            saved = record["reducer"]
            if saved is not None:
                residual = None
                if residuals is not None and saved.get("layout") is not None and saved.get("error_feedback"):
                    residual = torch.cat([residuals[p].reshape(-1) for p in key]) if key else None
                saved = {**saved, "residual": residual}
            seeds = record.get("seeds")
            if seeds is not None and residuals is not None:
                seeds = [{**(s or {}), "residual": residuals[p]} for s, p in zip(seeds, key)]
            unit = _Unit(key, int(record["seed"]), saved=saved, seeds=seeds,
                         start_step=int(record.get("start_step", 0)))
            self._units[key] = unit
            for p in key:
                self._owner[p] = key
        for p, s in state["loose"].items():
            self._loose[int(p)] = dict(s)
        if residuals is not None:
            for p, r in enumerate(residuals):
                if p not in self._owner:
                    self._loose.setdefault(p, {})["residual"] = r
        self.steps, self.skipped_steps = int(state["steps"]), int(state["skipped_steps"])
        self._serial = int(state["serial"])
        self._epoch = None if state["epoch"] is None else tuple(state["epoch"])  # type: ignore[assignment]
        self._last, self._stats = [], {}

    def _from_reducer_state(self, state: dict[str, Any]) -> dict[str, Any]:
        """A plain reducer's state of the whole model as one unit of every parameter."""
        layout = state.get("layout")
        shapes = None if layout is None else layout["shapes"]
        n = 0 if shapes is None else len(shapes)
        record = {"positions": list(range(n)), "seed": self.seed, "start_step": 0,
                  "reducer": {k: v for k, v in state.items() if k != "residual"}, "seeds": None}
        return {"format": STATE_FORMAT, "method": state.get("method"), "density": state.get("density"),
                "error_feedback": state.get("error_feedback"), "seed": state.get("seed"),
                "options": self.options() if state.get("method") == self.name else state.get("options"),
                "steps": state["steps"], "skipped_steps": state["skipped_steps"], "serial": 1, "epoch": None,
                "shapes": shapes, "residual": state.get("residual"), "units": [record] if shapes is not None else [],
                "loose": {}}

    # ------------------------------------------------------------------ internals
    def _set_parameters(self, shapes: list[tuple[int, ...]], sizes: list[int]) -> None:
        if self._shapes is not None and [tuple(s) for s in self._shapes] != [tuple(s) for s in shapes]:
            raise LayoutMismatchError(f"the model's parameters ({len(shapes)} tensors) do not match the "
                                      f"restored state ({len(self._shapes)} tensors, or other shapes)")
        self._shapes = [tuple(s) for s in shapes]
        self._groups = cut_buckets(sizes, self.bucket_mb)
        self._ready = [0] * len(self._groups)
        self._next_group = 0
        self._group_of = {p: g for g, members in enumerate(self._groups) for p in members}

    def _on_gradient(self, position: int) -> None:
        """A parameter's gradient is accumulated: start every group that is complete, in order."""
        g = self._group_of[position]
        self._ready[g] += 1
        assert self._groups is not None and self._params is not None
        while self._next_group < len(self._groups) and \
                self._ready[self._next_group] == len(self._groups[self._next_group]):
            self._start_group(self._next_group, None)

    def _start_group(self, g: int, grads: list[torch.Tensor] | None) -> None:
        """Reduce group ``g``: on the worker thread when its gradients are the parameters'
        (``grads`` None, from a hook during backward), else here in ``grads``."""
        assert self._groups is not None
        positions = self._groups[g]
        self._next_group = g + 1
        asynchronous = grads is None
        if grads is None:
            assert self._params is not None
            bucket = [self._params[p].grad for p in positions]
        else:
            bucket = [grads[p] for p in positions]
        units = self.units_for(positions, bucket[0].device if bucket else torch.device("cpu"))
        if asynchronous:
            self.submit(units, bucket)
        else:
            self.reduce_now(units, bucket)

    def _new_unit(self, key: tuple[int, ...]) -> _Unit:
        seeds = [self._loose.pop(p, None) for p in key]
        unit = _Unit(key, self.seed + _SEED_STRIDE * self._serial,
                     seeds=seeds if any(s for s in seeds) else None,
                     start_step=self.steps if self.per_tensor else 0)
        self._serial += 1
        self._units[key] = unit
        for p in key:
            self._owner[p] = key
        log.debug("bucket reducer %s: a new bucket of %d parameters (unit %d)", self.name, len(key), self._serial - 1)
        return unit

    def _dissolve(self, key: tuple[int, ...], device: torch.device) -> None:
        """Put a live unit's per-parameter state aside (its own state is dropped)."""
        unit = self._units.pop(key)
        for p in key:
            self._owner.pop(p, None)
        states: list[dict[str, Any] | None]
        if unit.reducer is None and unit.saved is None:
            states = unit.seeds or [None] * len(key)
        else:
            reducer = self._reducer_of(unit)
            if reducer.layout is None:
                dtype = self._dtype or _dtype_of(unit.saved) or torch.float32
                reducer.setup(Layout(tuple(self._shapes[p] for p in key), dtype, device))  # type: ignore[index]
            states = list(reducer.tensor_states())
        for p, s in zip(key, states):
            if s:
                self._loose[p] = s
        log.debug("bucket reducer %s: a bucket of %d parameters dissolved into per-parameter state",
                  self.name, len(key))

    def _reducer_of(self, unit: _Unit) -> Reducer:
        if unit.reducer is None:
            reducer = build(self.name, density=self.density, error_feedback=self.error_feedback, seed=unit.seed,
                            group=self.group, **self._options)
            if unit.saved is not None:
                reducer.load_state_dict(unit.saved)
                unit.saved = None
            else:
                reducer.steps = unit.start_step
                if unit.seeds is not None:
                    reducer.seed_tensor_states(unit.seeds)
            unit.seeds = None
            if self._epoch is not None:
                reducer.begin_epoch(*self._epoch)
            unit.reducer = reducer
        return unit.reducer

    def _probe_comm(self) -> Any:
        for unit in self._units.values():
            if unit.reducer is not None:
                return unit.reducer.comm
        from .comm.communicator import make_communicator
        try:
            return make_communicator(self.group)
        except RuntimeError:
            return _solo()

    def _run(self, job: _Job) -> None:
        """Reduce a job's units in this thread (the worker's, or the caller's). An error is
        handed to ``job.done`` and kept as the step's (the first one) for :meth:`finish`; the
        job's other units still run, so that every rank starts the same collectives."""
        error: BaseException | None = None
        for unit, index in job.units:
            try:
                reducer = self._reducer_of(unit)
                if job.refusal is not None:
                    _refuse(reducer, job.refusal)
                else:
                    grads = [job.grads[i] for i in index]
                    reducer.reduce(grads, out=grads)
                    self._reduced.append(unit)
            except BaseException as exc:  # reported through done() and finish()
                error = error or exc
        if error is not None and self._error is None:
            self._error = error
        if job.done is not None:
            job.done(error)

    def _enqueue(self, job: _Job) -> None:
        device = job.grads[0].device if job.grads else None
        if not self.overlap_possible(device):
            self._wait_jobs()
            self._run(job)
            return
        if device is not None and device.type == "cuda":
            job.event = torch.cuda.Event()
            job.event.record(torch.cuda.current_stream(device))
            job.device = device
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"sparsecomm-{self.name}")
        job.future = self._executor.submit(self._work, job)
        self._jobs.append(job)

    def overlap_possible(self, device: torch.device | None) -> bool:
        """Work may go to the worker thread (overlap on, and not a meta device)."""
        return self.overlap and (device is None or device.type in ("cpu", "cuda"))

    def _work(self, job: _Job) -> None:
        if job.event is None:
            self._run(job)
            return
        stream = self._streams.get(job.device)
        if stream is None:
            stream = self._streams[job.device] = torch.cuda.Stream(job.device)
        with torch.cuda.device(job.device), torch.cuda.stream(stream):
            stream.wait_event(job.event)
            self._run(job)

    def _wait_jobs(self) -> None:
        """Wait for everything submitted (the caller's CUDA stream then waits for the side
        stream the work ran on)."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            assert job.future is not None
            try:
                job.future.result()
            except BaseException as exc:  # _run catches the reducers' errors; this is a bug in done()
                self._error = self._error or exc
        for device, stream in self._streams.items():
            if any(j.device == device for j in jobs):
                torch.cuda.current_stream(device).wait_stream(stream)

    def _flat_residual(self, cpu: bool = False) -> torch.Tensor | None:
        """Every parameter's residual as one flat vector in model order (None with no residual)."""
        if self._shapes is None:
            return None
        pieces: dict[int, torch.Tensor] = {}
        any_state = False
        for unit in self._units.values():
            if unit.reducer is not None and unit.reducer.layout is not None:
                for p, s in zip(unit.positions, unit.reducer.tensor_states()):
                    any_state = True
                    if "residual" in s:
                        pieces[p] = s["residual"]
            elif unit.saved is not None and unit.saved.get("residual") is not None:
                any_state = True
                sizes = [math.prod(self._shapes[p]) for p in unit.positions]
                for p, r in zip(unit.positions, unit.saved["residual"].split(sizes)):
                    pieces[p] = r
            elif unit.seeds is not None:
                for p, s in zip(unit.positions, unit.seeds):
                    if s and "residual" in s:
                        any_state = True
                        pieces[p] = s["residual"]
        for p, s in self._loose.items():
            if "residual" in s:
                any_state = True
                pieces[p] = s["residual"]
        if not pieces or not any_state:
            return None
        sample = next(iter(pieces.values()))
        dtype, device = sample.dtype, (torch.device("cpu") if cpu else sample.device)
        flat = torch.cat([pieces[p].reshape(-1).to(device, dtype) if p in pieces
                          else torch.zeros(math.prod(s), dtype=dtype, device=device)
                          for p, s in enumerate(self._shapes)]) if self._shapes else torch.zeros(0, dtype=dtype)
        return flat

    def _split(self, flat: torch.Tensor | None, shapes: Any) -> list[torch.Tensor] | None:
        if flat is None or shapes is None:
            return None
        sizes = [math.prod(s) for s in shapes]
        return [piece.clone() for piece in flat.reshape(-1).split(sizes)]


_SUMMED = ("bytes_sent", "bytes_wire", "t_select", "t_comm", "wire_floor_bytes")


def _refuse(reducer: Reducer, problem: str) -> None:
    """A reduce that fails on every rank alike (the handshake carries the problem): fed
    tensors that cannot match the reducer's layout."""
    layout = reducer.layout
    mismatch = [] if layout is None or layout.shapes else [torch.zeros(1)]
    try:
        reducer.reduce(mismatch)
    except LayoutMismatchError as exc:
        raise LayoutMismatchError(problem) from exc
    raise LayoutMismatchError(problem)


def _without_residual(state: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if state is None else {k: v for k, v in state.items() if k != "residual"}


def _dtype_of(saved: dict[str, Any] | None) -> torch.dtype | None:
    layout = None if saved is None else saved.get("layout")
    return None if layout is None else getattr(torch, layout["dtype"])


def _solo() -> Any:
    from .comm.communicator import SoloCommunicator
    return SoloCommunicator()
