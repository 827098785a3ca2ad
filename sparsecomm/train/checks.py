"""Everything about a run that can be checked in one process, in seconds, before any data is
prepared or any worker starts: the settings, the model against the task, the task's and the
reducer's options, and the run directory."""
from __future__ import annotations

from pathlib import Path

from .. import reducers
from ..tasks import task_class
from ..config import ConfigError, RunConfig
from .records import check_run_dir, run_name

__all__ = ["check_run", "check_optimizer", "check_sharded"]


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
