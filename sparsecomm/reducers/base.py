"""The reducer contract shared by every method, and the step every method runs inside."""
from __future__ import annotations

import abc
import logging
from typing import Any, ClassVar, Iterable, Sequence

import torch

from ..validate import choice, number
from .comm.communicator import Communicator, make_communicator
from .comm.exchange import Header, LayoutMismatchError, SkipStep, handshake
from .layout import Layout
from .error_feedback import ErrorFeedback
from .timing import PhaseTimer

__all__ = ["Reducer", "Step", "NONFINITE_POLICIES", "STATE_FORMAT"]

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("raise", "skip")
STATE_FORMAT = "sparsecomm.reducer/1"


class Step:
    """One ``reduce`` call as a method sees it, and all a method may touch besides the pieces
    (selection, control, placement, exchange): the compensated vector ``x`` (built by
    :meth:`compensate`, all of it or tensor by tensor), the communicator, the handshake, the
    phase timer, the output and scratch buffers, the error-feedback commit, the counts that
    make ``density`` and ``local_density``, and the method's own ``stats``.

    A step normally opens inside ``reduce``; a method that starts work while backward is still
    running (overlap) opens it earlier with :meth:`Reducer.open_step` and compensates tensors as
    their gradients arrive."""

    def __init__(self, reducer: "Reducer", layout: Layout) -> None:
        self.reducer = reducer
        self.comm: Communicator = reducer.comm
        self.layout = layout
        self.index = reducer.steps
        self.stats: dict[str, Any] = {}
        self.header: Header | None = None
        self.committed = False
        self.phase = reducer._timer
        self.selected: int | None = None
        self.received: int | None = None
        self._memory = reducer._memory
        self._x: torch.Tensor | None = None
        self._built: set[int] = set()
        self._finite: torch.Tensor | bool = True
        self._problem: str | None = None
        self._out: torch.Tensor | None = None  # the caller's flat output buffer, when it has one
        # (grads, flat, overwrite) while x waits to be built by the method's fused selection
        self._deferred: tuple[Sequence[torch.Tensor], torch.Tensor | None, bool] | None = None
        self._reuse_output = False

    @property
    def d(self) -> int:
        return self.layout.numel

    @property
    def x(self) -> torch.Tensor:
        """The flat compensated vector ``g + m`` (``g`` with error feedback off). An internal
        buffer (or the caller's own gradients when they may be overwritten): valid until the
        commit. A step whose method selects with :meth:`select_fused` builds it there; read
        before that, it is built here in plain torch."""
        if self._x is None and self._deferred is not None:
            self._build_deferred()
        if self._x is None:
            raise RuntimeError("the step's vector is not built yet: call compensate() first")
        return self._x

    @property
    def error_feedback(self) -> bool:
        return self._memory.enabled

    @property
    def residual(self) -> torch.Tensor:
        """The residual ``m`` this step started from (zeros with error feedback off)."""
        return self._memory.residual

    def compensate(self, grads: Sequence[torch.Tensor], tensors: Iterable[int] | None = None,
                   flat: torch.Tensor | None = None, overwrite: bool = False) -> torch.Tensor:
        """Build ``x`` for the tensors numbered in ``tensors`` (all by default) that are not
        built yet, and return ``x``. ``flat``: the gradients as one flat vector (they are
        consecutive views of it), read in one pass; with ``overwrite`` and error feedback off,
        ``x`` is that vector itself (no copy)."""
        wanted = range(len(self.layout.shapes)) if tensors is None else tensors
        todo = [t for t in wanted if t not in self._built]
        if not todo and self._x is not None:
            return self._x
        if flat is not None and len(todo) == len(self.layout.shapes):
            self._x = self._memory.compensate_flat(flat, overwrite)
        else:
            self._x = self._memory.compensate(grads, self.layout, todo)
        self._built.update(todo)
        return self._x

    def _build_deferred(self) -> None:
        grads, flat, overwrite = self._deferred
        self._deferred = None
        with self.phase("select"):
            x = self.compensate(grads, flat=flat, overwrite=overwrite)
            self._finite = _all_finite(x)

    def select_fused(self, threshold: float | None, start: int = 0, end: int | None = None,
                     search: Any = None) -> Any:
        """Positions in ``[start, end)`` with ``|x| >= threshold`` (sorted; none for None) and x
        there, as a :class:`~sparsecomm.reducers.select.fused.Selected`, found in one fused pass
        (:mod:`~sparsecomm.reducers.select.fused`). While ``x`` is not built yet and the gradients are
        one flat vector, that pass also builds it (``x = g + m``) and checks its finiteness;
        otherwise it reads ``x``. ``search``: a :class:`~sparsecomm.reducers.select.fused.FusedSearch`
        (its capacity guess); a fresh one by default."""
        from .select.fused import FusedSearch
        search = search or FusedSearch()
        index_dtype = self.layout.index_dtype
        deferred = self._deferred
        if deferred is not None and deferred[1] is not None:
            _, flat, overwrite = deferred
            m, buffer = self._memory.operands(flat, overwrite)
            if buffer is None or buffer.dtype == flat.dtype:
                self._deferred = None
                with self.phase("select"):
                    x, found = search(flat, m, buffer, threshold, start, end, index_dtype)
                self._x, self._finite = x, found.finite
                self._built.update(range(len(self.layout.shapes)))
                return found
        x = self.x
        with self.phase("select"):
            return search(x, None, None, threshold, start, end, index_dtype)[1]

    def output(self) -> torch.Tensor:
        """A zeroed flat vector to build the average in: the caller's own output buffer when it
        is one flat vector not shared with ``x``, the reducer's reusable buffer when the result
        is copied out anyway, else a fresh one."""
        x = self._x
        if self._out is not None and (x is None or not _overlap(self._out, x)):
            return self._out.zero_()
        if self._reuse_output:
            return self.reducer._buffer("output").zero_()
        return torch.zeros(self.d, dtype=self.layout.dtype, device=self.layout.device)

    def scratch(self) -> torch.Tensor:
        """A reusable flat float buffer of length d (for |x| and the like)."""
        return self.reducer._buffer("scratch")

    def handshake(self, count: int | torch.Tensor = 0, extras: Iterable[float | torch.Tensor] = ()) -> Header:
        """The step's first collective (see :func:`exchange.handshake`); call it exactly once,
        before any other collective of the step. Raises on every rank alike when the step
        cannot go on."""
        if self.header is not None:
            raise RuntimeError("handshake() called twice in one step")
        if self._deferred is not None:
            self._build_deferred()
        with self.phase("comm"):
            self.header = handshake(self.comm, self.layout, finite=self._finite, count=count,
                                    extras=list(extras), problem=self._problem,
                                    nonfinite=self.reducer.nonfinite)
        return self.header

    def counted(self, selected: int, received: int) -> None:
        """What this step moved: ``selected`` coordinates chosen by this worker itself,
        ``received`` coordinates of the average that got a value. The reducer reports them as
        ``local_density`` and ``density`` (fractions of d)."""
        self.selected, self.received = int(selected), int(received)

    def fraction(self, count: float) -> float:
        """``count / d`` (0 for an empty layout)."""
        return count / self.d if self.d else 0.0

    def commit_sparse(self, sent: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """Error feedback: the residual is ``x`` with ``sent`` zeroed (``kept`` there when given:
        what rounding the values left behind, see :mod:`~sparsecomm.reducers.comm.wire`)."""
        with self.phase("select"):
            self._memory.commit_sparse(self.x, sent, kept)
        self.committed = True

    def commit_all(self) -> None:
        with self.phase("select"):
            self._memory.commit_all(self.x)
        self.committed = True

    def commit_dense(self, approximation: torch.Tensor) -> None:
        with self.phase("select"):
            self._memory.commit_dense(self.x, approximation)
        self.committed = True

    def commit_subtracted(self) -> None:
        """The method subtracted its dense approximation from ``x`` itself (with error
        feedback on; e.g. :func:`exchange.gather_decoded_mean` with ``residual=step.x``):
        ``x`` is the new residual as it stands, as :meth:`commit_dense` would have made it."""
        with self.phase("select"):
            self._memory.commit_in_place(self.x)
        self.committed = True


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Do the memory ranges of two contiguous tensors intersect?"""
    if a.device != b.device or a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _all_finite(x: torch.Tensor) -> torch.Tensor | bool:
    """A device boolean: no NaN or Inf in ``x`` (one read pass; no host round-trip)."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return torch.isfinite(lo) & torch.isfinite(hi)


class Reducer(abc.ABC):
    """Averages gradients across workers, compressed by one method, with error feedback.

    ``reduce(grads)`` is a collective: every rank calls it with tensors of the same shapes,
    in the same order, and gets the same averaged tensors back. Subclasses implement
    :meth:`_run` (select, exchange, commit) and, when they keep state, :meth:`_configure`,
    :meth:`_method_state` and :meth:`_load_method_state`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    compensates: ClassVar[bool] = True  # False: the method sends everything, no residual
    uses_density: ClassVar[bool] = True  # False: density is ignored (the target is 1)
    wide_residual: ClassVar[bool] = False  # True: float32 residual for 16-bit gradients
    # False: the average is not the plain mean of what the workers hold (a vote, an unbiased
    # random rounding without residual, momentum inside the method), so the conservation
    # identity sum_w x_w = P avg + sum_w m_w does not apply; say what holds instead
    conserves: bool = True
    # True where the method applies momentum itself (DGC's momentum correction): the
    # optimizer must then be plain SGD, or the momentum is applied twice
    applies_momentum: bool = False

    def __init__(self, *, density: float = 0.001, error_feedback: bool = True, group: Any = None,
                 seed: int = 0, nonfinite: str = "raise", sync_timing: bool = False) -> None:
        self.density = number("density", density, 0.0, 1.0, low_open=True)
        choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        self.error_feedback = bool(error_feedback)
        self.seed = int(seed)
        self.nonfinite = nonfinite
        self.comm = make_communicator(group)
        self._memory = ErrorFeedback(self.error_feedback and self.compensates, wide=self.wide_residual)
        self._timer = PhaseTimer(sync_timing)
        self._layout: Layout | None = None
        self._pending_state: dict | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._step: Step | None = None  # a step opened before its reduce (open_step)
        self._raw_stats: dict[str, Any] = {}
        self._stats: dict[str, Any] | None = {}
        self.steps = 0
        self.skipped_steps = 0

    # ----------------------------------------------------------------- public contract
    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.size

    @property
    def layout(self) -> Layout | None:
        """The gradients' layout, known from the first reduce on (None before)."""
        return self._layout

    def options(self) -> dict[str, Any]:
        """The method-specific options this reducer was built with."""
        return {}

    # Training context. The training loop calls these for every method; methods that need
    # epochs, learning rates or the backward pass override them (the defaults do nothing).
    def attach(self, model: Any) -> None:
        """Called once with the model before training, on every rank alike (a method may register
        hooks on its parameters here, e.g. to exchange gradients while backward runs; it may
        run collectives). ``reduce`` must then be given the parameters' gradients in
        ``model.parameters()`` order."""

    def begin_epoch(self, epoch: int, lr: float, epochs: float) -> None:
        """Called on every rank before the first step of each epoch (also when resuming
        mid-epoch) with the epoch index, its learning rate and the total epoch count."""

    def describe(self) -> dict[str, Any]:
        """What the method decided or measured that a reader of the run should see (fitted cost
        models, groupings, schedules); written to the run's records after the method's name and
        ``options()``, which it does not repeat. Empty by default."""
        return {}

    def reduce(self, grads: Iterable[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Average ``grads`` over all workers (a collective). Returns new tensors of the same
        shapes, dtype and device, bit-identical on every rank; or, given ``out`` (tensors of the
        same layout, which may be ``grads`` themselves), writes the average there and returns it,
        allocating nothing per step.

        Gradients that are consecutive views of one flat buffer (see
        :func:`~sparsecomm.reducers.layout.bind_flat_gradients`) are read in place, in one pass;
        with ``out=grads`` the average is built in that buffer directly (no copy in or out)."""
        grads = list(grads)
        problem = None
        if self._layout is None:
            self._setup(Layout.of(grads))
        else:
            problem = self._layout.difference(grads)
        layout = self._layout
        assert layout is not None
        if self._step is not None:  # opened while backward ran (open_step)
            step, self._step = self._step, None
        else:
            step = Step(self, layout)
            self._open(step)
        if problem is not None:
            step._problem = problem
            step.handshake()  # raises on every rank
            raise AssertionError("unreachable")
        flat_out = None
        if out is not None:
            out = list(out)
            wrong = layout.difference(out)
            if wrong is not None:
                raise ValueError(f"out does not match the gradients: {wrong.replace('gradient', 'tensor')}")
            flat_out = layout.flat_view(out)
            step._out, step._reuse_output = flat_out, True
        with self._timer("select"):
            flat_in = layout.flat_view(grads)
            overwrite = flat_in is not None and flat_out is not None and _overlap(flat_in, flat_out)
            if self._fuses_compensation():  # the method builds x in its selection pass
                step._deferred = (grads, flat_in, overwrite)
            else:
                step._finite = _all_finite(step.compensate(grads, flat=flat_in, overwrite=overwrite))
        try:
            avg = self._run(step)
        except SkipStep as skip:
            return self._skip(layout, skip, out)
        finally:
            self._end_step()
        if step.header is None:
            raise RuntimeError(f"reducer {self.name!r} finished a step without its handshake")
        if self._memory.enabled and not step.committed:
            raise RuntimeError(f"reducer {self.name!r} finished a step without updating its residual")
        if step.received is None:
            raise RuntimeError(f"reducer {self.name!r} finished a step without reporting its counts (step.counted)")
        self.steps += 1
        self._record(step)
        if out is not None:
            if flat_out is None:
                torch._foreach_copy_(out, layout.split(avg))
            elif avg.data_ptr() != flat_out.data_ptr():
                flat_out.copy_(avg)
            return out
        if avg.data_ptr() == step.x.data_ptr():  # the method averaged in place in the internal buffer
            avg = avg.clone()
        return layout.split(avg)

    def open_step(self) -> Step:
        """The step the next ``reduce`` finishes, opened now: for a method that starts work
        while backward is still running (e.g. exchanging the first gradients as later ones are
        computed). Only once the layout is known (after the first reduce); calling it again
        before that ``reduce`` returns the same step."""
        if self._layout is None:
            raise RuntimeError("open_step() needs the layout of a first reduce()")
        if self._step is None:
            self._step = Step(self, self._layout)
            self._open(self._step)
        return self._step

    @property
    def target_density(self) -> float:
        """The density this step aims at (reported as ``target_density``): ``density``, or 1
        for methods that ignore it; methods that choose their densities themselves override it."""
        return self.density if self.uses_density else 1.0

    @property
    def memory(self) -> list[torch.Tensor]:
        """Error-feedback residual after the last reduce, shaped like the gradients (zeros
        when error feedback is off; empty before the first reduce)."""
        if self._layout is None or not self._memory.allocated:
            return []
        return self._layout.split(self._memory.residual)

    @property
    def stats(self) -> dict[str, Any]:
        """The last step's measurements as plain Python numbers (methods.md, section 5)."""
        if self._stats is None:
            self._stats = {k: _plain(v) for k, v in self._raw_stats.items()}
        return dict(self._stats)

    def stat(self, key: str, default: Any = None) -> Any:
        """One of :attr:`stats`, computing only that one (``residual_norm`` costs a pass over
        the residual; the others are free)."""
        if self._stats is not None:
            return self._stats.get(key, default)
        return _plain(self._raw_stats[key]) if key in self._raw_stats else default

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly: counters, residual, method state."""
        layout = self._layout
        if layout is None and self._pending_state is not None:
            return dict(self._pending_state)
        return {
            "format": STATE_FORMAT,
            "method": self.name,
            "density": self.density,
            "error_feedback": self.error_feedback,
            "seed": self.seed,
            "options": self.options(),
            "rank": self.rank,
            "world_size": self.world_size,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "layout": None if layout is None else {"shapes": [list(s) for s in layout.shapes],
                                                    "dtype": str(layout.dtype).replace("torch.", "")},
            "residual": None if layout is None or not self._memory.enabled
            else self._memory.residual.detach().cpu().clone(),
            "method_state": {} if layout is None else self._method_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` of the same method, options, rank and
        world size. Takes effect at the next ``reduce``, whose gradients must have the saved
        layout."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a sparsecomm reducer state (expected format {STATE_FORMAT!r})")
        mine = {"method": self.name, "density": self.density, "error_feedback": self.error_feedback,
                "seed": self.seed, "options": _results_options(self.options()), "rank": self.rank,
                "world_size": self.world_size}
        saved = {**state, "options": _results_options(state.get("options"))}
        wrong = [f"{k}: saved {saved.get(k)!r}, this reducer {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if wrong:
            raise ValueError("reducer state does not match this reducer (" + "; ".join(wrong) + ")")
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self._layout = None
        self._memory = ErrorFeedback(self._memory.enabled, wide=self.wide_residual)
        self._pending_state = state if state["layout"] is not None else None
        self._raw_stats, self._stats = {}, {}

    # ------------------------------------------------------------------ for subclasses
    @abc.abstractmethod
    def _run(self, step: Step) -> torch.Tensor:
        """Select, call ``step.handshake`` first among collectives, exchange, commit the
        residual, fill ``step.stats``; return the flat average."""

    def _configure(self, layout: Layout) -> None:
        """Build layout-dependent state (partitions, per-layer k, ...) at the first step."""

    def _fuses_compensation(self) -> bool:
        """True when this step's method builds ``x`` itself, in :meth:`Step.select_fused`."""
        return False

    def _method_state(self) -> dict[str, Any]:
        return {}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        pass

    # ------------------------------------------------------------------------ internals
    def _setup(self, layout: Layout) -> None:
        pending, self._pending_state = self._pending_state, None
        residual = None
        if pending is not None:
            saved = pending["layout"]
            if [list(s) for s in layout.shapes] != saved["shapes"] or str(layout.dtype).replace("torch.", "") != saved["dtype"]:
                raise LayoutMismatchError(
                    f"gradients ({layout.describe()}) do not match the restored reducer state "
                    f"({len(saved['shapes'])} tensors of dtype {saved['dtype']})")
            residual = pending["residual"]
            residual = None if residual is None else residual.to(layout.device)
        self._layout = layout
        self._memory.allocate(layout, residual if self._memory.enabled else None)
        self._configure(layout)
        if pending is not None:
            self._load_method_state(pending["method_state"])
        log.debug("reducer %s set up for %s on rank %d/%d", self.name, layout.describe(), self.rank, self.world_size)

    def _end_step(self) -> None:
        """Called when ``reduce`` ends, however it ends (methods with per-step state reset it)."""

    def _open(self, step: Step) -> None:
        """Start a step's measurements: byte counters and phase clocks."""
        self.comm.reset_counters()
        self._timer.reset(step.layout.device)

    def _buffer(self, name: str) -> torch.Tensor:
        """A flat buffer of the layout's length, dtype and device, kept for reuse."""
        buf = self._buffers.get(name)
        layout = self._layout
        assert layout is not None
        if buf is None or buf.numel() != layout.numel or buf.dtype != layout.dtype or buf.device != layout.device:
            buf = self._buffers[name] = torch.empty(layout.numel, dtype=layout.dtype, device=layout.device)
        return buf

    def _skip(self, layout: Layout, skip: SkipStep, out: list[torch.Tensor] | None) -> list[torch.Tensor]:
        self.skipped_steps += 1
        log.warning("reducer %s skipped step %d: non-finite gradient on rank(s) %s", self.name, self.steps, skip.ranks)
        self._raw_stats = {"step": self.steps, "skipped": True, "skipped_steps": self.skipped_steps,
                           "nonfinite_ranks": list(skip.ranks), "density": 0.0, "local_density": 0.0,
                           "target_density": self.target_density,
                           "bytes_sent": self.comm.bytes_sent, "bytes_wire": self.comm.bytes_wire,
                           "t_select": self._timer.totals.get("select", 0.0),
                           "t_comm": self._timer.totals.get("comm", 0.0)}
        self._stats = None
        if out is not None:
            torch._foreach_zero_(out)
            return out
        return layout.split(torch.zeros(layout.numel, dtype=layout.dtype, device=layout.device))

    def _record(self, step: Step) -> None:
        raw = {"step": step.index, "skipped": False, "skipped_steps": self.skipped_steps,
               "target_density": self.target_density}
        raw.update(step.stats)
        raw["density"] = step.fraction(step.received)
        raw["local_density"] = step.fraction(step.selected)
        raw["density_ratio"] = lambda: _plain(raw["density"]) / self.target_density
        raw["bytes_sent"] = self.comm.bytes_sent
        raw["bytes_wire"] = self.comm.bytes_wire
        raw["t_select"] = self._timer.totals.get("select", 0.0)
        raw["t_comm"] = self._timer.totals.get("comm", 0.0)
        memory = self._memory
        raw["residual_norm"] = (lambda: float(torch.linalg.vector_norm(memory.residual.float()))) \
            if memory.enabled else 0.0
        self._raw_stats = raw
        self._stats = None


# Options that choose how, never what: a state saved with one value loads into a reducer with another.
SPEED_OPTIONS = ("selection",)


def _results_options(options: Any) -> Any:
    if not isinstance(options, dict):
        return options
    return {k: v for k, v in options.items() if k not in SPEED_OPTIONS}


def _plain(value: Any) -> Any:
    """Resolve a lazily computed or device-resident stat to a Python number."""
    if callable(value):
        value = value()
    if isinstance(value, torch.Tensor):
        value = value.item()
    return value

