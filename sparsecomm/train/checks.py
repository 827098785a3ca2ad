"""Everything about a run that can be checked in one process, in seconds, before any data is
prepared or any worker starts: the settings, the model against the task, the task's and the
reducer's options, and the run directory."""
from __future__ import annotations

import math
from pathlib import Path

from .. import reducers
from ..reducers.buckets import resolve_scope
from ..tasks import task_class
from ..config import ConfigError, RunConfig
from .records import check_run_dir, run_name

__all__ = ["check_run", "check_optimizer", "check_sharded", "reducer_scope"]


def check_optimizer(cfg: RunConfig, reducer: reducers.Reducer) -> None:
    """A reducer that applies momentum itself (DGC) trains with plain SGD: a momentum, Nesterov
    or Adam in the optimizer would apply a second one (one line naming both ways out)."""
    opt = cfg.optimizer
    if reducer.applies_momentum and (opt.name != "sgd" or opt.momentum > 0 or opt.nesterov):
        got = f"{opt.name}" + (f" with momentum {opt.momentum:g}" if opt.name == "sgd" else "") + \
            (" (nesterov)" if opt.nesterov else "")
        raise ConfigError(f"reducer {cfg.reducer.name!r} applies momentum itself, so the optimizer must be plain SGD, "
                          f"got {got}: set optimizer.momentum=0 (and optimizer.nesterov=false, optimizer.name=sgd), "
                          f"or turn the reducer's momentum off with reducer.options={{momentum: 0}}")


def check_sharded(workers: int, virtual: bool) -> None:
    """``parallel=fsdp`` needs real processes, two at least (one line naming the way out)."""
    if virtual:
        raise ConfigError("parallel=fsdp shards the model over real processes; virtual workers share one model "
                          "(drop --virtual-workers or set parallel=replicated)")
    if workers < 2:
        raise ConfigError(f"parallel=fsdp needs at least 2 processes (FSDP reduces nothing on one), got {workers}")


def reducer_scope(cfg: RunConfig) -> str:
    """The scope the run reduces in, ``"bucket"`` or ``"model"`` (``reducer.scope``, ``"auto"``
    resolved: bucket scope for a method whose result on a tensor depends on that tensor alone),
    or ``"module"`` under ``parallel=fsdp`` (each FSDP unit reduced by its reduce-scatter as
    backward reaches it). Raises :class:`ConfigError` for a bad ``reducer.scope`` or
    ``reducer.bucket_mb``, for bucket scope with a method that overlaps by its own parameter
    hooks (OMGS, AGTF), and for a scope other than ``auto`` under ``parallel=fsdp``."""
    rc = cfg.reducer
    try:
        scope = resolve_scope(rc.scope, rc.name, rc.options)
    except ValueError as exc:
        raise ConfigError(f"reducer.{exc}") from None
    if cfg.parallel == "fsdp":
        if rc.scope != "auto":
            raise ConfigError(f"reducer.scope={rc.scope}: under parallel=fsdp each FSDP unit is reduced by its "
                              f"reduce-scatter as backward reaches it; leave reducer.scope=auto")
        return "module"
    if not (rc.bucket_mb > 0 and math.isfinite(rc.bucket_mb)):
        raise ConfigError(f"reducer.bucket_mb must be a positive number of megabytes, got {rc.bucket_mb!r}")
    if scope == "bucket" and reducers.lookup(rc.name).attach is not reducers.Reducer.attach:
        raise ConfigError(f"reducer.scope=bucket: {rc.name!r} overlaps its exchange with backward by its own "
                          f"parameter hooks; use reducer.scope=auto or model")
    return scope


def check_run(cfg: RunConfig, workers: int | None = None, virtual: bool = False) -> RunConfig:
    """Raise :class:`ConfigError` with one line naming the first bad value (and the allowed
    ones); with ``workers`` (``virtual``: simulated in one process), also check the per-worker
    batch and that the run directory of a job that size can be written. Returns ``cfg``."""
    cfg.validate()
    data = Path(cfg.data.dir)
    if data.exists() and not data.is_dir():
        raise ConfigError(f"the data directory {data} is a file, not a folder; set DATA_DIR (--data-dir) to a folder")
    try:
        task_class(cfg.task).check(cfg)
        rc = cfg.reducer
        reducer = reducers.build(rc.name, density=rc.density, error_feedback=rc.error_feedback,
                                 group=reducers.SoloCommunicator(), seed=cfg.seed, **rc.options)
        check_optimizer(cfg, reducer)
        reducer_scope(cfg)
        if workers is not None:
            cfg.batch_per_worker(workers)
            if cfg.parallel == "fsdp":
                check_sharded(workers, virtual)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(str(exc)) from None
    if workers is not None:
        check_run_dir(Path(cfg.output_dir) / run_name(cfg, workers, virtual))
    return cfg
