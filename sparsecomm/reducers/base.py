"""The reducer contract shared by every method, and the call every method runs inside."""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import torch

from ..validate import choice, number
from .comm.communicator import Communicator, make_communicator
from .comm.exchange import Header, LayoutMismatchError, Owners, SkipStep, handshake
from .layout import Layout
from .error_feedback import ErrorFeedback
from .timing import PhaseTimer

__all__ = ["Reducer", "ReduceCall", "Workspace", "NONFINITE_POLICIES", "RESIDUAL_DTYPES", "STATE_FORMAT"]

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("raise", "skip")
RESIDUAL_DTYPES = ("float16", "bfloat16", "float32", "float64")
STATE_FORMAT = "sparsecomm.reducer/1"


@dataclass
class Workspace:
    """What a reducer keeps from one ``reduce`` call to the next and lends to each: its
    communicator, the error feedback holding its residual, the phase timer, reusable flat
    buffers, and what to do about a non-finite gradient (``nonfinite``)."""

    comm: Communicator
    feedback: ErrorFeedback
    timer: PhaseTimer
    nonfinite: str
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def release(self) -> None:
        """Drop the reusable buffers and ``x``'s spare (a reducer built with ``keep_buffers=False``
        does so after every reduce; they are allocated again when next needed)."""
        self.buffers.clear()
        self.feedback.release()

    def buffer(self, name: str, layout: Layout) -> torch.Tensor:
        """A flat buffer of ``layout``'s length, dtype and device, kept for reuse."""
        buf = self.buffers.get(name)
        if buf is None or buf.numel() != layout.numel or buf.dtype != layout.dtype or buf.device != layout.device:
            buf = self.buffers[name] = torch.empty(layout.numel, dtype=layout.dtype, device=layout.device)
        return buf


class ReduceCall:
    """One ``reduce`` call as a method sees it, and all a method may touch besides the pieces
    (selection, control, placement, exchange): the compensated vector ``x`` (built by
    :meth:`compensate`, all of it or tensor by tensor, or by a fused selection), the
    communicator, the handshake, the phase timer, the output and scratch buffers, the
    error-feedback commit, the counts that make ``density`` and ``local_density``, and the
    method's own ``stats``.

    A call normally opens inside ``reduce``, which binds its inputs (:meth:`bind`); a method
    that starts work while backward is still running (overlap) opens it earlier with
    :meth:`Reducer.open_call` and compensates tensors as their gradients arrive."""

    def __init__(self, workspace: Workspace, layout: Layout, index: int) -> None:
        self.comm: Communicator = workspace.comm
        self.phase = workspace.timer
        self.layout = layout
        self.index = index
        self.stats: dict[str, Any] = {}
        self.header: Header | None = None
        self.committed = False
        self.selected: int | None = None
        self.received: int | None = None
        self._workspace = workspace
        self._feedback = workspace.feedback
        self._x: torch.Tensor | None = None
        self._built: set[int] = set()
        self._finite: torch.Tensor | bool = True
        self._problem: str | None = None
        self._outputs: list[torch.Tensor] | None = None  # the caller's output tensors
        self._out: torch.Tensor | None = None  # ... as one flat vector, when they are one
        self._pending: _Pending | None = None  # the inputs of an x the method's fused selection builds

    # ------------------------------------------------------------------- inputs and output
    def bind(self, grads: Sequence[torch.Tensor], out: list[torch.Tensor] | None, fused: bool) -> None:
        """Take this call's inputs: the gradients (read in place, in one pass, when they are
        views of one flat buffer), the caller's ``out`` tensors (where the average goes; built
        there directly when they are one flat buffer), and build ``x`` now, or leave it to the
        method's fused selection (``fused``)."""
        layout = self.layout
        if out is not None:
            wrong = layout.difference(out)
            if wrong is not None:
                raise ValueError(f"out does not match the gradients: {wrong.replace('gradient', 'tensor')}")
            self._outputs, self._out = out, layout.flat_view(out)
        with self.phase("select"):
            flat = layout.flat_view(grads)
            overwrite = flat is not None and self._out is not None and _overlap(flat, self._out)
            if fused:
                self._pending = _Pending(grads, flat, overwrite)
            else:
                self._finite = _all_finite(self.compensate(grads, flat=flat, overwrite=overwrite))

    def refuse(self, problem: str) -> None:
        """End the call on every rank alike: this rank's gradients do not fit (``problem``)."""
        self._problem = problem
        self.handshake()  # raises on every rank
        raise AssertionError("unreachable: the handshake raises for a refused call")

    def check(self, method: str) -> None:
        """The contract of a method's ``_run``: handshake made, residual committed, counts said."""
        if self.header is None:
            raise RuntimeError(f"reducer {method!r} finished a step without its handshake")
        if self._feedback.enabled and not self.committed:
            raise RuntimeError(f"reducer {method!r} finished a step without updating its residual")
        if self.received is None:
            raise RuntimeError(f"reducer {method!r} finished a step without reporting its counts (call.counted)")

    def result(self, avg: torch.Tensor) -> list[torch.Tensor]:
        """The average handed back: written into the caller's ``out`` tensors, or as new tensors."""
        out, flat_out = self._outputs, self._out
        if out is not None:
            if flat_out is None:
                torch._foreach_copy_(out, self.layout.split(avg))
            elif avg.data_ptr() != flat_out.data_ptr():
                flat_out.copy_(avg)
            return out
        if self._x is not None and avg.data_ptr() == self._x.data_ptr():  # averaged in place in x's buffer
            avg = avg.clone()
        return self.layout.split(avg)

    def zero_result(self) -> list[torch.Tensor]:
        """Zeros as the average (a skipped step)."""
        if self._outputs is not None:
            torch._foreach_zero_(self._outputs)
            return self._outputs
        return self.layout.split(torch.zeros(self.d, dtype=self.layout.dtype, device=self.layout.device))

    # ----------------------------------------------------------------------- for methods
    @property
    def d(self) -> int:
        return self.layout.numel

    @property
    def x(self) -> torch.Tensor:
        """The flat compensated vector ``g + m`` (``g`` with error feedback off). An internal
        buffer (or the caller's own gradients when they may be overwritten): valid until the
        commit. A call whose method selects with :meth:`select_fused` builds it there; read
        before that, it is built here in plain torch."""
        self._build_pending()
        if self._x is None:
            raise RuntimeError("the call's vector is not built yet: call compensate() first")
        return self._x

    @property
    def error_feedback(self) -> bool:
        return self._feedback.enabled

    @property
    def residual(self) -> torch.Tensor:
        """The residual ``m`` this call started from (zeros with error feedback off)."""
        return self._feedback.residual

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
            self._x = self._feedback.compensate_flat(flat, overwrite)
        else:
            self._x = self._feedback.compensate(grads, self.layout, todo)
        self._built.update(todo)
        return self._x

    def _build_pending(self) -> None:
        """Build the ``x`` left to a fused selection in plain torch (the method read it first)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with self.phase("select"):
                self._finite = _all_finite(self.compensate(pending.grads, flat=pending.flat,
                                                           overwrite=pending.overwrite))

    def select_fused(self, threshold: float | None, start: int = 0, end: int | None = None,
                     search: Any = None) -> Any:
        """Positions in ``[start, end)`` with ``|x| >= threshold`` (sorted; none for None) and x
        there, as a :class:`~sparsecomm.reducers.select.fused.Selected`, found in one fused pass
        (:mod:`~sparsecomm.reducers.select.fused`, through :meth:`select_in_pass`). ``search``: a
        :class:`~sparsecomm.reducers.select.fused.FusedSearch` (its capacity guess); a fresh one
        by default."""
        from .select.fused import FusedSearch
        search = search or FusedSearch()
        return self.select_in_pass(lambda g, m, x, index_dtype: search(g, m, x, threshold, start, end, index_dtype))

    def select_in_pass(self, search: Any) -> Any:
        """What ``search(g, m, x, index_dtype) -> (x, Selected)`` finds in one pass with
        :func:`~sparsecomm.reducers.select.fused.compensate_select`'s ``g, m, x`` contract. While
        ``x`` is not built yet and the gradients are one flat vector, that pass also builds it
        (``x = g + m``) and checks its finiteness; otherwise it reads ``x``."""
        index_dtype = self.layout.index_dtype
        pending = self._pending
        if pending is not None and pending.flat is not None:
            m, buffer = self._feedback.operands(pending.flat, pending.overwrite)
            if buffer is None or (buffer.dtype == pending.flat.dtype and (m is None or m.dtype == buffer.dtype)):
                self._pending = None
                with self.phase("select"):
                    x, found = search(pending.flat, m, buffer, index_dtype)
                self._x, self._finite = x, found.finite
                self._built.update(range(len(self.layout.shapes)))
                return found
        x = self.x
        with self.phase("select"):
            return search(x, None, None, index_dtype)[1]

    def output(self) -> torch.Tensor:
        """A zeroed flat vector to build the average in: the caller's own output buffer when it
        is one flat vector not shared with ``x``, the reducer's reusable buffer when the result
        is copied out anyway, else a fresh one."""
        x = self._x
        if self._out is not None and (x is None or not _overlap(self._out, x)):
            return self._out.zero_()
        if self._outputs is not None:
            return self._workspace.buffer("output", self.layout).zero_()
        return torch.zeros(self.d, dtype=self.layout.dtype, device=self.layout.device)

    def scratch(self) -> torch.Tensor:
        """A reusable flat float buffer of length d (for |x| and the like)."""
        return self._workspace.buffer("scratch", self.layout)

    def handshake(self, count: int | torch.Tensor = 0, extras: Iterable[float | torch.Tensor] = ()) -> Header:
        """The call's first collective (see :func:`exchange.handshake`); call it exactly once,
        before any other collective of the call. Raises on every rank alike when the call
        cannot go on."""
        if self.header is not None:
            raise RuntimeError("handshake() called twice in one step")
        self._build_pending()
        with self.phase("comm"):
            self.header = handshake(self.comm, self.layout, finite=self._finite, count=count,
                                    extras=list(extras), problem=self._problem,
                                    nonfinite=self._workspace.nonfinite)
        return self.header

    def counted(self, selected: int, received: int) -> None:
        """What this call moved: ``selected`` coordinates chosen by this worker itself,
        ``received`` coordinates of the average that got a value. The reducer reports them as
        ``local_density`` and ``density`` (fractions of d)."""
        self.selected, self.received = int(selected), int(received)

    def counted_dense(self, owners: Owners | None, routed: bool) -> None:
        """The counts of a step in which every coordinate travels (quantisers, casts): all d
        selected and received; with ``owners`` set, also ``routed`` (every worker's coordinates
        went to their owners only) and ``shard_density``, the part of this rank's owned
        coordinates that got a value: all of them (0 for an empty part), as for the sparse
        methods (:func:`~.methods.sparse_base.routed_stats`)."""
        self.counted(selected=self.d, received=self.d)
        if owners is not None:
            self.stats.update(routed=routed, shard_density=1.0 if owners.numel(self.comm.rank) else 0.0)

    def fraction(self, count: float) -> float:
        """``count / d`` (0 for an empty layout)."""
        return count / self.d if self.d else 0.0

    def commit_sparse(self, sent: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """Error feedback: the residual is ``x`` with ``sent`` zeroed (``kept`` there when given:
        what rounding the values left behind, see :mod:`~sparsecomm.reducers.comm.wire`)."""
        with self.phase("select"):
            self._feedback.commit_sparse(self.x, sent, kept)
        self.committed = True

    def commit_all(self) -> None:
        with self.phase("select"):
            self._feedback.commit_all(self.x)
        self.committed = True

    def commit_dense(self, approximation: torch.Tensor) -> None:
        with self.phase("select"):
            self._feedback.commit_dense(self.x, approximation)
        self.committed = True

    def commit_subtracted(self) -> None:
        """The method subtracted its dense approximation from ``x`` itself (with error
        feedback on; e.g. :func:`exchange.gather_decoded_mean` with ``residual=call.x``):
        ``x`` is the new residual as it stands, as :meth:`commit_dense` would have made it."""
        with self.phase("select"):
            self._feedback.commit_in_place(self.x)
        self.committed = True


@dataclass(frozen=True)
class _Pending:
    """The inputs of an ``x`` not built yet: a fused selection builds it in its pass."""

    grads: Sequence[torch.Tensor]
    flat: torch.Tensor | None
    overwrite: bool


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
    :meth:`_run` (select, exchange, commit, on the :class:`ReduceCall` it is given) and, when
    they keep state, :meth:`_configure`, :meth:`_method_state` and :meth:`_load_method_state`.
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
    # Whether the method's result on a tensor depends on that tensor alone (its gradient, its
    # residual, its own state, the step's context), never on the other tensors reduced with
    # it. Such a method reduces a model bucket by bucket with the same meaning (scope
    # "bucket": the DDP hook's and the training loop's overlap, sparsecomm.reducers.buckets);
    # one that selects over the whole vector (a k, a threshold or partitions of d) would then
    # treat each bucket as its model. Every method declares it in its own class body, as a
    # class attribute or as a property of its options (registry.register refuses a class that
    # does not; tests/test_buckets.py checks every registered method).
    per_tensor: ClassVar[bool]

    def __init__(self, *, density: float = 0.001, error_feedback: bool = True, group: Any = None,
                 seed: int = 0, nonfinite: str = "raise", sync_timing: bool = False,
                 residual_dtype: str | None = None, keep_buffers: bool = True) -> None:
        self.density = number("density", density, 0.0, 1.0, low_open=True)
        choice("nonfinite", nonfinite, NONFINITE_POLICIES)
        if residual_dtype is not None:
            choice("residual_dtype", residual_dtype, RESIDUAL_DTYPES)
        if not isinstance(keep_buffers, bool):
            raise ValueError(f"keep_buffers must be true or false, got {keep_buffers!r}")
        self.error_feedback = bool(error_feedback)
        self.seed = int(seed)
        self.nonfinite = nonfinite
        self.residual_dtype = residual_dtype
        self.keep_buffers = keep_buffers
        self.comm = make_communicator(group)
        self.workspace = Workspace(self.comm, self._new_feedback(self.error_feedback and self.compensates),
                                   PhaseTimer(sync_timing), nonfinite)
        self._layout: Layout | None = None
        self._pending_state: dict | None = None
        self._pending_tensors: list[dict[str, Any] | None] | None = None  # seed_tensor_states
        self._opened: ReduceCall | None = None  # a call opened before its reduce (open_call)
        self.owners: Owners | None = None  # route_to
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

    def route_to(self, owners: Owners | None) -> None:
        """Tell the reducer which worker needs which coordinates of the average (the same
        :class:`~sparsecomm.reducers.comm.exchange.Owners` on every rank; None: every worker
        needs all). A method that can send each worker's contribution straight to its owner
        then fills the average only at this rank's owned coordinates, bit for bit as without
        routing (the former all-reduces: see below), and leaves the rest 0: the sparse
        gather-sum of topk, global_topk, thresh, sage, accordion, legacy and dgc (each selected
        pair to its owner), the quantisers qsgd, terngrad, efsignsgd and signsgd and the casts
        fp16 and bf16 with ``exchange="gather"`` (each owner's part of every encoded row); and
        the exchanges at positions every worker learns or knows, whose values went by
        all-reduce: the union exchange of exdyna, micro, deft and of the sparse methods with
        ``exchange="union"``, and randomk, cltk and gtopk (each value to its position's owner,
        :func:`~.comm.exchange.routed_sum_at`). Those owners sum in rank order where the
        all-reduce summed in the backend's: bit for bit with 2 workers (and with 16-bit wire
        values at any P), within float rounding with more. The residual and the method's
        state stay as without routing. Not routed: dgc's dense 1-d tensors (its momentum reads
        their whole average), the sparse gather-sum in a wire format other than the default,
        accordion's dense step, omgs, agtf, powersgd, fp16/bf16 with ``exchange="allreduce"``.
        Every rank must set the same owners before the same step."""
        if owners is not None and (owners.size != self.world_size or (self._layout is not None and owners.d != self._layout.numel)):
            raise ValueError(f"route_to: {owners!r} does not fit {self.world_size} workers"
                             + ("" if self._layout is None else f" and {self._layout.numel} coordinates"))
        self.owners = owners

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
        try:
            call = self._open(grads)
            call.bind(grads, None if out is None else list(out), fused=self._fuses_compensation())
            try:
                avg = self._run(call)
            except SkipStep as skip:
                return self._skip(call, skip)
            finally:
                self._end_step()
            call.check(self.name)
            self.steps += 1
            self._record(call)
            return call.result(avg)
        finally:
            if not self.keep_buffers:
                self.workspace.release()

    def open_call(self) -> ReduceCall:
        """The call the next ``reduce`` finishes, opened now: for a method that starts work
        while backward is still running (e.g. exchanging the first gradients as later ones are
        computed). Only once the layout is known (after the first reduce); calling it again
        before that ``reduce`` returns the same call."""
        if self._layout is None:
            raise RuntimeError("open_call() needs the layout of a first reduce()")
        if self._opened is None:
            self._opened = self._new_call(self._layout)
        return self._opened

    @property
    def target_density(self) -> float:
        """The density this step aims at (reported as ``target_density``): ``density``, or 1
        for methods that ignore it; methods that choose their densities themselves override it."""
        return self.density if self.uses_density else 1.0

    @property
    def residual(self) -> list[torch.Tensor]:
        """The error-feedback residual after the last reduce, shaped like the gradients (zeros
        when error feedback is off; empty before the first reduce)."""
        feedback = self.workspace.feedback
        if self._layout is None or not feedback.allocated:
            return []
        return self._layout.split(feedback.residual)

    def setup(self, layout: Layout) -> None:
        """Fix the gradients' layout now, before any reduce (the first reduce does it
        otherwise), e.g. to read :meth:`tensor_states` of a restored state. Does nothing once
        the layout is known."""
        if self._layout is None:
            self._setup(layout)

    def tensor_states(self) -> list[dict[str, torch.Tensor]]:
        """What this reducer keeps for each tensor, in layout order: its residual
        (``"residual"``, flat, when error feedback is on) and the method's own state of that
        tensor (:meth:`_tensor_state`: e.g. PowerSGD's Q, DGC's momentum). Copies. State that
        belongs to the whole vector (thresholds, partitions, random streams, counters) is not
        here. Empty before the layout is known."""
        layout = self._layout
        if layout is None:
            return []
        feedback = self.workspace.feedback
        residual = feedback.residual if feedback.enabled else None
        states = []
        for i, (a, b) in enumerate(layout.segments):
            state = {} if residual is None else {"residual": residual[a:b].detach().clone()}
            state.update(self._tensor_state(i))
            states.append(state)
        return states

    def seed_tensor_states(self, states: Sequence[dict[str, torch.Tensor] | None]) -> None:
        """Start each tensor from ``states`` (one per tensor, as :meth:`tensor_states` gives
        them; None or a missing key: that part starts afresh) instead of a zero residual and
        fresh method state. Only before the layout is known; applied when it is (after a
        restored state, if any). Used to move per-tensor state between reducers of other
        tensor groupings (:mod:`~sparsecomm.reducers.buckets`)."""
        if self._layout is not None:
            raise RuntimeError("seed_tensor_states() must come before the first reduce (or setup)")
        self._pending_tensors = list(states)

    @property
    def stats(self) -> dict[str, Any]:
        """The last step's measurements as plain Python numbers (docs/reducers.md, *Metrics*)."""
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
            "residual_dtype": self.residual_dtype,
            "rank": self.rank,
            "world_size": self.world_size,
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "layout": None if layout is None else {"shapes": [list(s) for s in layout.shapes],
                                                    "dtype": str(layout.dtype).replace("torch.", "")},
            "residual": None if layout is None or not self.workspace.feedback.enabled
            else self.workspace.feedback.residual.detach().cpu().clone(),
            "method_state": {} if layout is None else self._method_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict` of the same method, options, rank and
        world size. Takes effect at the next ``reduce``, whose gradients must have the saved
        layout."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a sparsecomm reducer state (expected format {STATE_FORMAT!r})")
        mine = {"method": self.name, "density": self.density, "error_feedback": self.error_feedback,
                "seed": self.seed, "options": self.options(), "residual_dtype": self.residual_dtype,
                "rank": self.rank, "world_size": self.world_size}
        wrong = setting_differences(state, mine, "reducer")
        if wrong:
            raise ValueError("reducer state does not match this reducer (" + "; ".join(wrong) + ")")
        self.steps = int(state["steps"])
        self.skipped_steps = int(state["skipped_steps"])
        self._layout = None
        self.workspace.feedback = self._new_feedback(self.workspace.feedback.enabled)
        self._pending_state = state if state["layout"] is not None else None
        self._raw_stats, self._stats = {}, {}

    # ------------------------------------------------------------------ for subclasses
    @abc.abstractmethod
    def _run(self, call: ReduceCall) -> torch.Tensor:
        """Select, call ``call.handshake`` first among collectives, exchange, commit the
        residual, fill ``call.stats``; return the flat average."""

    def _configure(self, layout: Layout) -> None:
        """Build layout-dependent state (partitions, per-layer k, ...) at the first step."""

    def _fuses_compensation(self) -> bool:
        """True when this method builds ``x`` itself, in :meth:`ReduceCall.select_fused`."""
        return False

    def _method_state(self) -> dict[str, Any]:
        return {}

    def _load_method_state(self, state: dict[str, Any]) -> None:
        pass

    def _tensor_state(self, i: int) -> dict[str, torch.Tensor]:
        """The method's own state of tensor ``i`` (copies), for :meth:`tensor_states`."""
        return {}

    def _load_tensor_state(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Start tensor ``i`` from ``state`` (what :meth:`_tensor_state` gave for a tensor of
        the same shape); keys the method does not keep are ignored."""

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
        feedback = self.workspace.feedback
        feedback.allocate(layout, residual if feedback.enabled else None)
        self._configure(layout)
        if pending is not None:
            self._load_method_state(pending["method_state"])
        seeds, self._pending_tensors = self._pending_tensors, None
        if seeds is not None:
            self._seed(layout, seeds)
        log.debug("reducer %s set up for %s on rank %d/%d", self.name, layout.describe(), self.rank, self.world_size)

    def _seed(self, layout: Layout, seeds: list[dict[str, Any] | None]) -> None:
        if len(seeds) != len(layout.shapes):
            raise ValueError(f"seed_tensor_states: {len(seeds)} states for {len(layout.shapes)} tensors")
        feedback = self.workspace.feedback
        for i, ((a, b), state) in enumerate(zip(layout.segments, seeds)):
            if not state:
                continue
            residual = state.get("residual")
            if residual is not None and feedback.enabled:
                if residual.numel() != b - a:
                    raise ValueError(f"seed_tensor_states: tensor {i} has {b - a} elements, its residual "
                                     f"{residual.numel()}")
                feedback.residual[a:b].copy_(residual.reshape(-1))
            self._load_tensor_state(i, state)

    def _new_feedback(self, enabled: bool) -> ErrorFeedback:
        return ErrorFeedback(enabled, wide=self.wide_residual, keep_spare=self.keep_buffers,
                             residual_dtype=None if self.residual_dtype is None else getattr(torch, self.residual_dtype))

    def _end_step(self) -> None:
        """Called when ``reduce`` ends, however it ends (methods with per-step state reset it)."""

    def _open(self, grads: list[torch.Tensor]) -> ReduceCall:
        """This reduce's call: the one opened early (:meth:`open_call`) or a new one; refused on
        every rank when the gradients do not fit the layout of the first reduce."""
        problem = None
        if self._layout is None:
            self._setup(Layout.of(grads))
        else:
            problem = self._layout.difference(grads)
        assert self._layout is not None
        call, self._opened = self._opened or self._new_call(self._layout), None
        if problem is not None:
            call.refuse(problem)
        return call

    def _new_call(self, layout: Layout) -> ReduceCall:
        """A call with its measurements started: byte counters and phase clocks."""
        self.comm.reset_counters()
        self.workspace.timer.reset(layout.device)
        return ReduceCall(self.workspace, layout, self.steps)

    def _skip(self, call: ReduceCall, skip: SkipStep) -> list[torch.Tensor]:
        self.skipped_steps += 1
        log.warning("reducer %s skipped step %d: non-finite gradient on rank(s) %s", self.name, self.steps, skip.ranks)
        self._raw_stats = {"step": self.steps, "skipped": True, "skipped_steps": self.skipped_steps,
                           "nonfinite_ranks": list(skip.ranks), "density": 0.0, "local_density": 0.0,
                           "target_density": self.target_density, **self._measured()}
        self._stats = None
        return call.zero_result()

    def _record(self, call: ReduceCall) -> None:
        raw = {"step": call.index, "skipped": False, "skipped_steps": self.skipped_steps,
               "target_density": self.target_density}
        raw.update(call.stats)
        raw["density"] = call.fraction(call.received)
        raw["local_density"] = call.fraction(call.selected)
        raw["density_ratio"] = lambda: _plain(raw["density"]) / self.target_density
        raw.update(self._measured())
        feedback = self.workspace.feedback
        raw["residual_norm"] = (lambda: float(torch.linalg.vector_norm(feedback.residual.float()))) \
            if feedback.enabled else 0.0
        self._raw_stats = raw
        self._stats = None

    def _measured(self) -> dict[str, float]:
        """What the communicator counted and the timer clocked in this call."""
        totals = self.workspace.timer.totals
        return {"bytes_sent": self.comm.bytes_sent, "bytes_wire": self.comm.bytes_wire,
                "t_select": totals.get("select", 0.0), "t_comm": totals.get("comm", 0.0)}


# Options that choose how, never what: a state saved with one value loads into a reducer with another.
SPEED_OPTIONS = ("selection", "keep_buffers")


def _results_options(options: Any) -> Any:
    if not isinstance(options, dict):
        return options
    return {k: v for k, v in options.items() if k not in SPEED_OPTIONS}


def setting_differences(saved: dict[str, Any], mine: dict[str, Any], this: str) -> list[str]:
    """The settings in ``mine`` that a saved state holds other values of, one ``"key: saved X,
    this <this> Y"`` each; ``options`` compared without those that change no value
    (:data:`SPEED_OPTIONS`). Shared by the states of a reducer, the DDP hook and the FSDP
    registration."""
    saved = {**saved, "options": _results_options(saved.get("options"))}
    mine = {**mine, "options": _results_options(mine.get("options"))}
    return [f"{k}: saved {saved.get(k)!r}, this {this} {v!r}" for k, v in mine.items() if saved.get(k) != v]


def _plain(value: Any) -> Any:
    """Resolve a lazily computed or device-resident stat to a Python number."""
    if callable(value):
        value = value()
    if isinstance(value, torch.Tensor):
        value = value.item()
    return value

