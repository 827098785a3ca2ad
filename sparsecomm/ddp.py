"""A DistributedDataParallel communication hook that averages gradients with any sparsecomm method.

    from sparsecomm.ddp import ReducerHookState, reducer_hook
    model = DDP(model)
    state = ReducerHookState("topk", density=0.01)   # any method of reducers.available()
    model.register_comm_hook(state, reducer_hook)

DDP calls a hook once per gradient bucket, in bucket order, while backward runs (PyTorch's
``ddp_comm_hooks`` conventions: ``hook(state, bucket) -> Future`` holding the averaged bucket),
and waits on the Futures only after the last bucket. ``scope`` says what the method is
applied to:

- ``"bucket"``: each bucket is reduced as DDP hands it over, on a worker thread, and its Future
  is returned at once: communication runs while backward goes on, as with DDP's own
  all-reduce. A method whose result on a tensor depends on that tensor alone (``per_tensor``:
  layer-wise top-k, the quantizers, the casts, PowerSGD, DGC, ...) means the same as over the
  whole model; a whole-model method (ExDyna, MiCRO, SAGE, global top-k, ...) treats each bucket
  as its model (its k, threshold and partitions per bucket).
- ``"model"``: the buckets are kept and, at the last one, every gradient of the model is reduced
  at once in the model's parameter order, as this project's training loop does; no overlap.
- ``"auto"`` (default): ``"bucket"`` for per-tensor methods, ``"model"`` for the others.

Residuals and per-tensor method state are kept by parameter (:mod:`sparsecomm.reducers.buckets`),
so DDP's rebuild of its buckets after the first iteration, ``find_unused_parameters``,
``no_sync()``, ``static_graph`` and ``gradient_as_bucket_view`` work, and ``state_dict()``
resumes bit-exactly across the rebuild.

The parameter order is learned at the first backward (in both scopes, that backward is reduced
after its last bucket): its buckets taken from the last index to the first, parameters in
bucket order, which is ``model.parameters()`` order (DDP cuts its first buckets from the
parameters in model order and reverses the list). Register the hook before the first backward,
as PyTorch requires.
"""
import logging
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from . import reducers
from .reducers import LayoutMismatchError
from .reducers.base import setting_differences
from .reducers.buckets import SCOPES, BucketReducer, resolve_scope

__all__ = ["ReducerHookState", "reducer_hook", "STATE_FORMAT", "SCOPES"]

log = logging.getLogger(__name__)

STATE_FORMAT = "sparsecomm.ddp_hook/2"
_FORMATS = ("sparsecomm.ddp_hook/1", STATE_FORMAT)


class _Bucket(NamedTuple):
    """A bucket of the current backward pass."""

    index: int
    params: list[torch.Tensor]
    grads: list[torch.Tensor]   # views into buffer
    future: torch.futures.Future
    buffer: torch.Tensor


class ReducerHookState:
    """The state :func:`reducer_hook` works with: the method, applied in ``scope`` (``"auto"``,
    ``"bucket"`` or ``"model"``, see the module), on ``process_group`` (None: the default
    group), and the model's parameter order. ``method``, ``density``, ``error_feedback``,
    ``seed`` and ``options`` are those of :func:`sparsecomm.reducers.build`, checked here (bad
    values raise its ValueError).

    A method option named like one of these (``thresh``'s ``scope``) goes in
    ``method_options``, a dict merged with ``options``.

    ``scope`` is the scope that runs (``"auto"`` resolved); ``stats`` (the last step's
    measurements, over all buckets), ``skipped`` (``nonfinite="skip"`` zeroed a bucket this
    step: skip the optimizer step), ``begin_epoch`` (for accordion, legacy and dgc),
    ``describe``, ``state_dict`` and ``load_state_dict`` expose the method. Pickling keeps
    everything but the process group, as PyTorch's PowerSGD state does.
    """

    def __init__(self, method: str, density: float = 0.001, *, error_feedback: bool = True, seed: int = 0,
                 process_group: Any = None, scope: str = "auto", method_options: dict[str, Any] | None = None,
                 **options: Any) -> None:
        options = {**(method_options or {}), **options}
        if "group" in options:
            raise ValueError("ReducerHookState takes the process group as process_group=, not group= "
                             "(the reducer is built on it at the first hook call)")
        reducers.build(method, density=density, error_feedback=error_feedback, seed=seed,
                       group=reducers.SoloCommunicator(), **options)  # bad input fails here, not mid-backward
        self.scope = resolve_scope(scope, method, options)
        self.requested_scope = scope
        self.method = method
        self.density = density
        self.error_feedback = error_feedback
        self.seed = seed
        self.options = dict(options)
        self.process_group = process_group
        self.engine = BucketReducer(method, density, error_feedback=error_feedback, seed=seed, group=process_group,
                                    **options)
        self._position: dict[torch.Tensor, int] | None = None  # parameter -> place in model order
        self._shapes: list[list[int]] | None = None            # saved or learned, model order
        self._relearn = False       # after load_state_dict: parameters may be new objects
        self._buckets: list[_Bucket] = []                       # kept until the last bucket
        self._by_index: dict[int, list[tuple[int, ...]]] = {}   # bucket index -> its units, last step
        self._this_step: dict[int, list[tuple[int, ...]]] = {}
        self._refusing: str | None = None  # this backward's buckets are refused on every rank (why)
        self._saved_rank: tuple[int, int] | None = None  # a loaded state's rank and world, checked at the next step

    # ------------------------------------------------------------------ what users call
    @property
    def reducer(self) -> Any:
        """The reducer of the whole model in model scope (None before its first step); in
        bucket scope the :class:`~sparsecomm.reducers.buckets.BucketReducer` itself."""
        if self.scope == "bucket":
            return self.engine
        units = self.engine.units
        return units[0][1] if len(units) == 1 else None

    @property
    def stats(self) -> dict[str, Any]:
        return self.engine.stats

    @property
    def skipped(self) -> bool:
        return bool(self.engine.stat("skipped", False))

    def begin_epoch(self, epoch: int, lr: float, epochs: float) -> None:
        """Pass the training context to the method (see ``Reducer.begin_epoch``)."""
        self.engine.begin_epoch(epoch, lr, epochs)

    def describe(self) -> dict[str, Any]:
        """What the method decided or fitted: in model scope its reducer's ``describe()``; in
        bucket scope the buckets of the last step, each with its parameters and its reducer's."""
        if self.scope == "model":
            units = self.engine.last_units
            return units[0][1].describe() if units else {}
        return self.engine.describe()

    def state_dict(self) -> dict[str, Any]:
        """The method's state (residuals by parameter, each bucket's reducer), the parameter
        shapes in model order, and the rank and world size that saved it."""
        rank, world = _rank_and_world(self.process_group)
        return {"format": STATE_FORMAT, **self._settings(), "scope": self.scope, "rank": rank, "world_size": world,
                "parameter_shapes": self._shapes, "reducer": self.engine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (same method and settings; the scope may differ),
        also into a fresh DDP model: the parameter order is learned again at the next step and
        checked against the saved one.

        Each rank must load the state it saved itself (residuals differ between ranks). With the
        process group initialised this is a collective: every rank calls it, the ranks compare
        what they loaded, and when any rank holds another rank's state (or one of another world
        size) every rank raises the same ValueError naming them. Without a process group the
        comparison is made at the first hook call, before anything is reduced."""
        self._load(state)
        if self._saved_rank is not None and dist.is_available() and dist.is_initialized():
            saved, self._saved_rank = self._saved_rank, None
            _agree_on_ranks(saved, self.process_group)

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self._settings(), "scope": self.requested_scope, "state": self.state_dict()}

    def __setstate__(self, saved: dict[str, Any]) -> None:
        settings = dict(saved["settings"])
        self.__init__(settings.pop("method"), settings.pop("density"), scope=saved.get("scope", "auto"),
                      method_options=settings.pop("options"), **settings)
        self._load(saved["state"])

    def _settings(self) -> dict[str, Any]:
        return {"method": self.method, "density": self.density, "error_feedback": self.error_feedback,
                "seed": self.seed, "options": self.options}

    def _load(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") not in _FORMATS:
            raise ValueError(f"not a ReducerHookState state (expected format {STATE_FORMAT!r})")
        wrong = setting_differences(state, self._settings(), "state")
        if wrong:
            raise ValueError("hook state does not match this ReducerHookState (" + "; ".join(wrong) + ")")
        saved = state["reducer"]
        rank, world = state.get("rank"), state.get("world_size")
        if rank is None and isinstance(saved, dict):
            rank, world = saved.get("rank"), saved.get("world_size")
        if state.get("scope") not in (None, self.scope):
            log.info("reducer_hook: a state saved in %s scope resumes in %s scope (residuals and per-tensor state "
                     "go on by parameter; each bucket's own state starts afresh)", state["scope"], self.scope)
        self._discard_buckets(RuntimeError("load_state_dict during a backward pass"))
        self.engine.close()
        self.engine = BucketReducer(self.method, self.density, error_feedback=self.error_feedback, seed=self.seed,
                                    group=self.process_group, **self.options)
        if saved is not None:
            self.engine.load_state_dict(saved)
        self._shapes = state["parameter_shapes"]
        self._relearn = True
        self._by_index = {}
        self._saved_rank = None if rank is None else (int(rank), int(world))

    # ------------------------------------------------------------------ what the hook does
    def _on_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """Reduce ``bucket`` now (bucket scope, once the order is known) or keep it for the last
        one. Returns the bucket's Future."""
        buffer = bucket.buffer()
        index = bucket.index()
        if buffer.layout != torch.strided:
            self._discard_buckets(RuntimeError("sparse gradient bucket"))
            shapes = [list(p.shape) for p in bucket.parameters()]
            raise ValueError(f"reducer_hook: DDP bucket {index} holds sparse gradients (parameters of shapes "
                             f"{shapes}); sparsecomm reducers average dense gradients only (e.g. nn.Embedding(sparse=False))")
        if index == 0:
            self._begin_backward()
        future = torch.futures.Future(devices=[buffer.device]) if buffer.is_cuda else torch.futures.Future()
        entry = _Bucket(index, bucket.parameters(), bucket.gradients(), future, buffer)
        try:
            if self.scope == "model" or self._position is None or self._relearn:
                self._buckets.append(entry)
                if bucket.is_last():
                    self._reduce_kept(self._buckets)
                    self._buckets = []
            else:
                self._reduce_bucket(entry, bucket.is_last())
            if bucket.is_last():
                self._end_backward()
        except BaseException as exc:
            self._discard_buckets(exc)
            if not future.done():
                future.set_exception(exc)
            raise
        return future

    def _begin_backward(self) -> None:
        if self._buckets:  # an earlier backward stopped before its last bucket
            log.warning("reducer_hook: dropping %d buckets of an unfinished backward pass", len(self._buckets))
            self._discard_buckets(RuntimeError("backward pass abandoned before its last bucket"))
        self.engine.abandon()
        self._this_step, self._refusing = {}, None
        if self._saved_rank is not None:  # a state loaded without a process group: compare now, on every rank
            saved, self._saved_rank = self._saved_rank, None
            _agree_on_ranks(saved, self.process_group)

    def _reduce_kept(self, buckets: list[_Bucket]) -> None:
        """At the last bucket: learn the order if needed, then reduce the model at once (model
        scope) or bucket by bucket (bucket scope), here, and complete every Future."""
        params = [p for b in reversed(buckets) for p in b.params]
        if self._position is None or (self._relearn and set(params) != set(self._position)):
            self._learn_order(params, [g for b in reversed(buckets) for g in b.grads])
        self._relearn = False
        device = buckets[0].buffer.device
        if self.scope == "model":
            ordered: list[torch.Tensor | None] = [None] * len(self._position)
            for p, g in zip(params, (g for b in reversed(buckets) for g in b.grads)):
                i = self._position.get(p)
                if i is None or ordered[i] is not None:
                    ordered = None
                    break
                ordered[i] = g
            key = tuple(range(len(self._position)))
            if ordered is None or any(g is None for g in ordered):
                self._fail_everywhere(params, [self.engine.units_for(key, device)[0][0]])
            units = self.engine.units_for(key, device)
            self.engine.reduce_now(units, ordered)
        else:
            for b in buckets:
                positions = self._positions_of(b.params)
                if positions is None:
                    self._fail_everywhere(params, self._units_of_last_step(b.index, b.index + 1))
                units = self.engine.units_for(positions, device)
                self._this_step[b.index] = [u.positions for u, _ in units]
                self.engine.reduce_now(units, b.grads)
        self.engine.finish()
        for b in buckets:
            b.future.set_result(b.buffer)

    def _reduce_bucket(self, entry: _Bucket, last: bool) -> None:
        """Bucket scope: start reducing ``entry`` on the worker thread; its Future completes
        when that is done. At the last bucket, wait for all of them (so that nothing of this
        hook is in flight when DDP goes on) and raise the first error."""
        positions = None if self._refusing else self._positions_of(entry.params)
        if positions is None:
            if self._refusing is None:
                unseen = sum(p not in self._position for p in entry.params)
                self._refusing = (f"reducer_hook: DDP bucket {entry.index} holds {len(entry.params)} parameters, "
                                  f"{unseen} of them not seen at the first step ({len(self._position)} parameters): "
                                  f"one ReducerHookState serves one DDP model (load_state_dict moves it to another)")
            self._refuse(self._units_of_last_step(entry.index, entry.index + 1 if not last else None))
        else:
            units = self.engine.units_for(positions, entry.buffer.device)
            self._this_step[entry.index] = [u.positions for u, _ in units]
            future, buffer = entry.future, entry.buffer

            def done(error: BaseException | None) -> None:
                if error is None:
                    future.set_result(buffer)
                else:
                    future.set_exception(error)

            self.engine.submit(units, entry.grads, done)
        if last:
            try:
                self.engine.finish()
            except LayoutMismatchError as exc:
                if self._refusing is not None:
                    raise LayoutMismatchError(self._refusing) from exc
                raise

    def _end_backward(self) -> None:
        if self._this_step:
            self._by_index = self._this_step
        self._this_step = {}

    def _positions_of(self, params: list[torch.Tensor]) -> list[int] | None:
        position = self._position
        assert position is not None
        out = [position.get(p) for p in params]
        return None if any(i is None for i in out) else out  # type: ignore[return-value]

    def _units_of_last_step(self, first: int, end: int | None) -> list[Any]:
        """The units the other ranks reduce for buckets ``first`` to ``end`` (None: to the last)
        of this step, as the last step had them."""
        keys = [k for i in sorted(self._by_index) if i >= first and (end is None or i < end)
                for k in self._by_index[i]]
        units = [self.engine.live_unit(k) for k in keys]
        return [u for u in units if u is not None]

    def _refuse(self, units: list[Any]) -> None:
        assert self._refusing is not None
        self.engine.refuse(units, self._refusing)

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
        self.engine.set_shapes(shapes, grads[0].dtype if grads else None)
        log.debug("reducer_hook: %s in %s scope over %d parameters (%d elements)", self.method, self.scope,
                  len(params), sum(p.numel() for p in params))

    def _fail_everywhere(self, params: list[torch.Tensor], units: list[Any]) -> None:
        """The buckets do not hold the parameters of the first step. Make the reduces the other
        ranks start now fail on every rank (their handshake says so), so no rank is left waiting
        in a collective; then raise here with the reason."""
        unseen = sum(p not in self._position for p in params)
        reason = (f"reducer_hook: this step's DDP buckets hold {len(params)} parameters, {unseen} of them not seen "
                  f"at the first step ({len(self._position)} parameters): one ReducerHookState serves one DDP "
                  f"model (load_state_dict moves it to another)")
        self.engine.refuse(units, reason)
        try:
            self.engine.finish()
        except LayoutMismatchError as exc:
            raise LayoutMismatchError(reason) from exc
        raise LayoutMismatchError(reason)

    def _discard_buckets(self, exc: BaseException) -> None:
        for b in self._buckets:
            if not b.future.done():
                b.future.set_exception(exc)
        self._buckets = []


def _rank_and_world(group: Any) -> tuple[int | None, int | None]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return None, None


def _agree_on_ranks(saved: tuple[int, int], group: Any) -> None:
    """Every rank learns which rank saved the state each rank loaded (one small all-gather) and
    all raise the same ValueError when any rank holds another rank's state or a state of
    another world size."""
    comm = reducers.make_communicator(group)
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    row = torch.tensor([saved[0], saved[1], comm.rank, comm.size], dtype=torch.int64, device=device)
    table = comm.all_gather(row).cpu().tolist()
    wrong = [(mine, by, world) for by, world, mine, size in table if by != mine or world != size]
    if not wrong:
        return
    parts = [f"rank {mine} was given the hook state saved by rank {by}"
             + (f" of a world of {world}" if world != comm.size else "") for mine, by, world in wrong]
    raise ValueError(f"reducer_hook: {'; '.join(parts)} (this is rank {comm.rank} of {comm.size}): every rank must "
                     f"load the state it saved itself (residuals differ between ranks: save one file per rank)")


# No ``from __future__ import annotations`` here: DDP checks these annotations as objects.
def reducer_hook(state: ReducerHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: average the bucket's gradients with ``state``'s method (see the
    module docstring). Register with ``ddp_model.register_comm_hook(state, reducer_hook)``."""
    return state._on_bucket(bucket)
