"""A DistributedDataParallel communication hook that averages gradients with any sparsecomm reducer.

    from sparsecomm.ddp import ReducerHookState, reducer_hook
    model = DDP(model)
    state = ReducerHookState("exdyna", density=0.01)   # any method of reducers.available()
    model.register_comm_hook(state, reducer_hook)

DDP calls a hook once per gradient bucket, in bucket order, while backward runs (PyTorch's
``ddp_comm_hooks`` conventions: ``hook(state, bucket) -> Future`` holding the averaged bucket).
This hook does not reduce bucket by bucket: it keeps each bucket and returns a Future not yet
completed; when the last bucket arrives it reduces every gradient of the model at once, in
the model's parameter order, writes the averages into the buckets and completes all the
Futures (DDP waits on them only after the last hook, in ``finalize_backward``). The reducer
thus sees exactly what the project's training loop gives it (``reduce(grads)`` over
``model.parameters()``), so methods that select over the whole model (exdyna, micro, sage,
global_topk, gtopk, cltk, deft, omgs, agtf) and layer-wise ones (topk, legacy, accordion,
powersgd) behave as in that loop, whatever DDP's bucketing (which changes after the first
iteration). The price is DDP's overlap of communication with backward.

The parameter order is learned at the first step: its buckets taken from the last index to
the first, parameters in bucket order, which is ``model.parameters()`` order (DDP cuts its
first buckets from the parameters in model order and reverses the list). Register the hook
before the first backward, as PyTorch requires.
"""
import logging
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from . import reducers
from .reducers import LayoutMismatchError, Reducer

__all__ = ["ReducerHookState", "reducer_hook", "STATE_FORMAT"]

log = logging.getLogger(__name__)

STATE_FORMAT = "sparsecomm.ddp_hook/1"


class _Bucket(NamedTuple):
    """A bucket of the current backward pass, waiting for the last one."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]   # views into buffer
    future: torch.futures.Future
    buffer: torch.Tensor


class ReducerHookState:
    """The state :func:`reducer_hook` works with: a sparsecomm reducer, built lazily on
    ``process_group`` (None: the default group) at the first hook call, and the model's
    parameter order. ``method``, ``density``, ``error_feedback``, ``seed`` and ``options`` are
    those of :func:`sparsecomm.reducers.build`, checked here (bad values raise its ValueError).

    ``stats`` (the last step's measurements), ``skipped`` (``nonfinite="skip"`` zeroed this
    step's gradients: skip the optimizer step), ``begin_epoch`` (for accordion and legacy),
    ``describe``, ``state_dict`` and ``load_state_dict`` expose the reducer. Pickling keeps
    everything but the process group, as PyTorch's PowerSGD state does.
    """

    def __init__(self, method: str, density: float = 0.001, *, error_feedback: bool = True, seed: int = 0,
                 process_group: Any = None, **options: Any) -> None:
        if "group" in options:
            raise ValueError("ReducerHookState takes the process group as process_group=, not group= "
                             "(the reducer is built on it at the first hook call)")
        reducers.build(method, density=density, error_feedback=error_feedback, seed=seed,
                       group=reducers.SoloCommunicator(), **options)  # bad input fails here, not mid-backward
        self.method = method
        self.density = density
        self.error_feedback = error_feedback
        self.seed = seed
        self.options = dict(options)
        self.process_group = process_group
        self.reducer: Reducer | None = None
        self._position: dict[torch.Tensor, int] | None = None  # parameter -> place in model order
        self._shapes: list[list[int]] | None = None            # saved or learned, model order
        self._relearn = False       # after load_state_dict: parameters may be new objects
        self._buckets: list[_Bucket] = []
        self._pending_reducer_state: dict[str, Any] | None = None
        self._pending_epoch: tuple[int, float, float] | None = None

    # ------------------------------------------------------------------ what users call
    @property
    def stats(self) -> dict[str, Any]:
        return {} if self.reducer is None else self.reducer.stats

    @property
    def skipped(self) -> bool:
        return self.reducer is not None and bool(self.reducer.stat("skipped", False))

    def begin_epoch(self, epoch: int, lr: float, epochs: float) -> None:
        """Pass the training context to the reducer (see ``Reducer.begin_epoch``)."""
        if self.reducer is None:
            self._pending_epoch = (epoch, lr, epochs)
        else:
            self.reducer.begin_epoch(epoch, lr, epochs)

    def describe(self) -> dict[str, Any]:
        return {} if self.reducer is None else self.reducer.describe()

    def state_dict(self) -> dict[str, Any]:
        """The reducer's state (residuals included) and the parameter shapes in model order."""
        reducer_state = self._pending_reducer_state if self.reducer is None else self.reducer.state_dict()
        return {"format": STATE_FORMAT, **self._settings(), "parameter_shapes": self._shapes,
                "reducer": reducer_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (same method and settings), also into a fresh DDP model:
        the parameter order is learned again at the next step and checked against the saved one."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a ReducerHookState state (expected format {STATE_FORMAT!r})")
        wrong = [f"{k}: saved {state.get(k)!r}, this state {v!r}" for k, v in self._settings().items()
                 if state.get(k) != v]
        if wrong:
            raise ValueError("hook state does not match this ReducerHookState (" + "; ".join(wrong) + ")")
        self._discard_buckets(RuntimeError("load_state_dict during a backward pass"))
        self._shapes = state["parameter_shapes"]
        self._relearn = True
        self._pending_reducer_state = None
        if state["reducer"] is None:  # saved before its first step: start afresh
            self.reducer = None
        elif self.reducer is None:
            self._pending_reducer_state = state["reducer"]
        else:
            self.reducer.load_state_dict(state["reducer"])

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self._settings(), "state": self.state_dict()}

    def __setstate__(self, saved: dict[str, Any]) -> None:
        settings = dict(saved["settings"])
        self.__init__(settings.pop("method"), settings.pop("density"), **settings.pop("options"), **settings)
        self.load_state_dict(saved["state"])

    def _settings(self) -> dict[str, Any]:
        return {"method": self.method, "density": self.density, "error_feedback": self.error_feedback,
                "seed": self.seed, "options": self.options}

    # ------------------------------------------------------------------ what the hook does
    def _on_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """Keep ``bucket``; at the last one reduce them all. Returns the bucket's Future."""
        buffer = bucket.buffer()
        if buffer.layout != torch.strided:
            self._discard_buckets(RuntimeError("sparse gradient bucket"))
            shapes = [list(p.shape) for p in bucket.parameters()]
            raise ValueError(f"reducer_hook: DDP bucket {bucket.index()} holds sparse gradients (parameters of shapes "
                             f"{shapes}); sparsecomm reducers average dense gradients only (e.g. nn.Embedding(sparse=False))")
        if bucket.index() == 0 and self._buckets:  # an earlier backward stopped before its last bucket
            log.warning("reducer_hook: dropping %d buckets of an unfinished backward pass", len(self._buckets))
            self._discard_buckets(RuntimeError("backward pass abandoned before its last bucket"))
        future = torch.futures.Future(devices=[buffer.device]) if buffer.is_cuda else torch.futures.Future()
        self._buckets.append(_Bucket(bucket.parameters(), bucket.gradients(), future, buffer))
        if bucket.is_last():
            try:
                self._reduce_step(self._buckets)
            except BaseException as exc:
                self._discard_buckets(exc)
                raise
            self._buckets = []
        return future

    def _reduce_step(self, buckets: list[_Bucket]) -> None:
        params = [p for b in reversed(buckets) for p in b.params]
        grads = [g for b in reversed(buckets) for g in b.grads]
        if self._position is None or (self._relearn and set(params) != set(self._position)):
            self._learn_order(params, grads)
        self._relearn = False
        reducer = self._reducer()
        ordered: list[torch.Tensor | None] = [None] * len(self._position)
        for p, g in zip(params, grads):
            i = self._position.get(p)
            if i is None or ordered[i] is not None:
                ordered = None
                break
            ordered[i] = g
        if ordered is None or any(g is None for g in ordered):
            self._fail_everywhere(reducer, params)
        reducer.reduce(ordered, out=ordered)
        for b in buckets:
            b.future.set_result(b.buffer)

    def _learn_order(self, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        dtypes = sorted({str(g.dtype) for g in grads})
        if len(dtypes) > 1:
            raise ValueError(f"reducer_hook: the model's gradients have dtypes {dtypes}; a reducer averages "
                             f"gradients of one floating dtype (convert the model to one dtype)")
        shapes = [list(p.shape) for p in params]
        if self._shapes is not None and shapes != self._shapes:
            raise LayoutMismatchError(f"reducer_hook: the model's parameters ({len(shapes)} tensors) do not match the "
                                      f"restored hook state ({len(self._shapes)} tensors, or other shapes)")
        self._position = {p: i for i, p in enumerate(params)}
        self._shapes = shapes
        log.debug("reducer_hook: %s over %d parameters (%d elements)", self.method, len(params),
                  sum(p.numel() for p in params))

    def _reducer(self) -> Reducer:
        if self.reducer is None:
            self.reducer = reducers.build(self.method, density=self.density, error_feedback=self.error_feedback,
                                          seed=self.seed, group=self.process_group, **self.options)
            if self._pending_reducer_state is not None:
                self.reducer.load_state_dict(self._pending_reducer_state)
                self._pending_reducer_state = None
            if self._pending_epoch is not None:
                self.reducer.begin_epoch(*self._pending_epoch)
        return self.reducer

    def _fail_everywhere(self, reducer: Reducer, params: list[torch.Tensor]) -> None:
        """The buckets do not hold the parameters of the first step. Feed the reducer a list
        that cannot match its layout: its handshake makes every rank raise, so no rank is left
        waiting in a collective; then raise here with the reason."""
        unseen = sum(p not in self._position for p in params)
        reason = (f"reducer_hook: this step's DDP buckets hold {len(params)} parameters, {unseen} of them not seen "
                  f"at the first step ({len(self._position)} parameters): one ReducerHookState serves one DDP "
                  f"model (load_state_dict moves it to another)")
        mismatch = [] if self._position else [torch.zeros(1)]
        try:
            reducer.reduce(mismatch)
        except LayoutMismatchError as exc:
            raise LayoutMismatchError(reason) from exc
        raise LayoutMismatchError(reason)

    def _discard_buckets(self, exc: BaseException) -> None:
        for b in self._buckets:
            if not b.future.done():
                b.future.set_exception(exc)
        self._buckets = []


# No ``from __future__ import annotations`` here: DDP checks these annotations as objects.
def reducer_hook(state: ReducerHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average the model's gradients with ``state``'s reducer (see the
    module docstring). Register with ``ddp_model.register_comm_hook(state, reducer_hook)``."""
    return state._on_bucket(bucket)
