"""The reducer contract shared by every method, and the step every method runs inside."""
from __future__ import annotations

import abc
import logging
from typing import Any, ClassVar, Iterable

import torch

from .comm import Communicator, make_communicator
from .exchange import Header, LayoutMismatchError, SkipStep, handshake
from .layout import Layout
from .memory import ErrorFeedback
from .timing import PhaseTimer

__all__ = ["Reducer", "Step", "NONFINITE_POLICIES", "STATE_FORMAT"]

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("raise", "skip")
STATE_FORMAT = "sparsecomm.reducer/1"


class Step:
    """One ``reduce`` call as a method sees it: the compensated vector, the communicator, the
    handshake, the phase timer, the error-feedback commit and the stats being filled."""

    def __init__(self, reducer: "Reducer", layout: Layout, x: torch.Tensor, reuse_output: bool = False) -> None:
        self.reducer = reducer
        self._reuse_output = reuse_output
        self.comm: Communicator = reducer.comm
        self.layout = layout
        self.x = x
        self.index = reducer.steps
        self.stats: dict[str, Any] = {}
        self.header: Header | None = None
        self.committed = False
        self.phase = reducer._timer
        self._finite: torch.Tensor | bool = True
        self._problem: str | None = None

    @property
    def d(self) -> int:
        return self.layout.numel

    def output(self) -> torch.Tensor:
        """A zeroed flat vector to build the average in: a fresh one, or the reducer's own
        reusable buffer when the caller asked for the result to be copied into ``out``."""
        if self._reuse_output:
            return self.reducer._buffer("output").zero_()
        return torch.zeros(self.d, dtype=self.layout.dtype, device=self.layout.device)

    def scratch(self) -> torch.Tensor:
        """A reusable flat float buffer of length d (for |x| and the like)."""
        return self.reducer._buffer("scratch")

    def handshake(self, count: int | torch.Tensor = 0, extras: Iterable[float | torch.Tensor] = ()) -> Header:
        """The step's first collective (see :func:`exchange.handshake`); call it exactly once,
        before any other collective. Raises on every rank alike when the step cannot go on."""
        if self.header is not None:
            raise RuntimeError("handshake() called twice in one step")
        with self.phase("comm"):
            self.header = handshake(self.comm, self.layout, finite=self._finite, count=count,
                                    extras=list(extras), problem=self._problem,
                                    nonfinite=self.reducer.nonfinite)
        return self.header

    def commit_sparse(self, sent: torch.Tensor) -> None:
        """Error feedback: the residual is ``x`` with ``sent`` zeroed."""
        with self.phase("select"):
            self.reducer._memory.commit_sparse(self.x, sent)
        self.committed = True

    def commit_all(self) -> None:
        with self.phase("select"):
            self.reducer._memory.commit_all(self.x)
        self.committed = True

    def commit_dense(self, approximation: torch.Tensor) -> None:
        with self.phase("select"):
            self.reducer._memory.commit_dense(self.x, approximation)
        self.committed = True


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

    def __init__(self, *, density: float = 0.001, error_feedback: bool = True, group: Any = None,
                 seed: int = 0, nonfinite: str = "raise", sync_timing: bool = False) -> None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"density must be a number in (0, 1], got {density!r}")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {list(NONFINITE_POLICIES)}, got {nonfinite!r}")
        self.density = float(density)
        self.error_feedback = bool(error_feedback)
        self.seed = int(seed)
        self.nonfinite = nonfinite
        self.comm = make_communicator(group)
        self._memory = ErrorFeedback(self.error_feedback and self.compensates, wide=self.wide_residual)
        self._timer = PhaseTimer(sync_timing)
        self._layout: Layout | None = None
        self._pending_state: dict | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._step_open = False
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
        models, groupings, schedules); written to the run's records. Empty by default."""
        return {}

    def reduce(self, grads: Iterable[torch.Tensor], out: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Average ``grads`` over all workers (a collective). Returns new tensors of the same
        shapes, dtype and device, bit-identical on every rank; or, given ``out`` (tensors of the
        same layout, which may be ``grads`` themselves), writes the average there and returns it,
        allocating nothing per step."""
        grads = list(grads)
        problem = None
        if self._layout is None:
            self._setup(Layout.of(grads))
        else:
            problem = self._layout.difference(grads)
        layout = self._layout
        assert layout is not None
        if not self._step_open:
            self._open_step(layout)
        self._step_open = False
        if problem is not None:
            step = Step(self, layout, torch.empty(0, dtype=layout.dtype, device=layout.device))
            step._problem = problem
            step.handshake()  # raises on every rank
            raise AssertionError("unreachable")
        if out is not None:
            out = list(out)
            wrong = layout.difference(out)
            if wrong is not None:
                raise ValueError(f"out does not match the gradients: {wrong.replace('gradient', 'tensor')}")
        with self._timer("select"):
            x = self._compensate(grads, layout)
            step = Step(self, layout, x, reuse_output=out is not None)
            step._finite = _all_finite(x)
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
        self.steps += 1
        self._record(step)
        if out is not None:
            torch._foreach_copy_(out, layout.split(avg))
            return out
        if avg.data_ptr() == x.data_ptr():  # the method averaged in place in the internal buffer
            avg = avg.clone()
        return layout.split(avg)

    @property
    def target_density(self) -> float:
        """The density this step aims at (reported as ``target_density``): ``density``, or 1
        for methods that ignore it; methods that choose their densities themselves override it."""
        return self.density if self.uses_density else 1.0

    def reduce_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Reduce one flat buffer (for example a DDP bucket) as a single tensor."""
        return self.reduce([flat])[0]

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
            "residual": None if layout is None or not self._memory.allocated
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
                "seed": self.seed, "options": self.options(), "rank": self.rank, "world_size": self.world_size}
        wrong = [f"{k}: saved {state.get(k)!r}, this reducer {v!r}" for k, v in mine.items() if state.get(k) != v]
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

    def _compensate(self, grads: list[torch.Tensor], layout: Layout) -> torch.Tensor:
        """Build the flat compensated vector ``x`` (error feedback); a method that already built
        parts of it while backward ran builds only the rest."""
        return self._memory.compensate(grads, layout)

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

    def _open_step(self, layout: Layout) -> None:
        """Start a step's measurements: byte counters and phase clocks. ``reduce`` does it,
        unless the method already did while backward was running (overlap)."""
        self.comm.reset_counters()
        self._timer.reset(layout.device)
        self._step_open = True

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
        raw.setdefault("density", 1.0)
        raw.setdefault("local_density", raw["density"])
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


def _plain(value: Any) -> Any:
    """Resolve a lazily computed or device-resident stat to a Python number."""
    if callable(value):
        value = value()
    if isinstance(value, torch.Tensor):
        value = value.item()
    return value


def density_of(count: int, d: int) -> float:
    return count / d if d else 0.0
