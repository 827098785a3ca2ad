"""Command line of the trainer: python -m sparsecomm.train --preset NAME [options].

Settings come from a YAML preset, then from the convenience flags (the variables run.sh
exposes), then from --set section.key=value overrides, in that order.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..commandline import OneLineParser
from ..config import ConfigError, RunConfig, load_config
from .presets import available_presets, choose_preset, find_preset, preset_dirs, preset_info

__all__ = ["main", "preset_dirs", "find_preset", "resolve_config"]

log = logging.getLogger("sparsecomm")

EXAMPLES = """\
examples:
  python -m sparsecomm.train --preset mnist-cnn --reducer topk --density 0.01
  python -m sparsecomm.train --task ml-100k                 (chooses the preset ncf-ml100k)
  python -m sparsecomm.train --preset lstm-ptb-small --set optimizer.lr=10 --set reducer.options={num_blocks: 512}
  torchrun --nproc_per_node 2 -m sparsecomm.train --preset mnist-cnn
  python -m sparsecomm.train --preset mnist-cnn --reducer exdyna --virtual-workers 64
  python -m sparsecomm.train --list-presets | --list-reducers

Ctrl-C, SIGTERM or SIGUSR1 make every worker checkpoint and stop at the same step (exit 128 +
the signal number); running the same command again resumes. Bad settings stop with one line
and exit code 2, and so does a run directory another job is using (--wait-for-run waits for it).
"""

# --wait-for-run without a number: how long to wait for another job to let go of the run directory.
WAIT_DEFAULT_S = 600.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m sparsecomm.train", epilog=EXAMPLES,
                                                description="Train one benchmark with one gradient reducer, on one worker or "
                                            "as one rank of a job (torchrun, run.sh, SLURM or MPI).")
    p.add_argument("--preset", help="preset name or YAML file (see --list-presets); without it, one is chosen "
                                    "from --task and --model")
    p.add_argument("--task", "--dataset", dest="task", help="task / dataset (e.g. cifar10, ptb, ml-100k)")
    p.add_argument("--model", help="model name (e.g. resnet18, lstm_lm, neumf)")
    p.add_argument("--reducer", help="reducer name (see --list-reducers)")
    p.add_argument("--density", type=float, help="target density of the reducer")
    p.add_argument("--epochs", type=float, help="training epochs")
    p.add_argument("--seed", type=int)
    p.add_argument("--data-dir", help="the data directory (default: the preset's, or ./data)")
    p.add_argument("--output-dir", help="where run directories are created (default ./runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set optimizer.lr=0.05 (repeatable)")
    p.add_argument("--wait-for-run", type=_seconds, nargs="?", const=WAIT_DEFAULT_S, metavar="SECONDS",
                   help="when another job is using the run directory, wait up to SECONDS (default "
                        f"{WAIT_DEFAULT_S:g}; also SPARSECOMM_WAIT_FOR_RUN) for it to end, then resume, instead of "
                        "stopping at once (a requeued SLURM job whose old workers are still checkpointing)")
    p.add_argument("--fresh", action="store_true",
                   help="start over instead of resuming; an earlier run's directory is moved aside, not deleted")
    p.add_argument("--print-config", action="store_true", help="check and print the resolved settings, then exit")
    p.add_argument("--check", action="store_true",
                   help="check the settings (and, with --workers, the run directory), print key=value lines "
                        "(preset, task, gpus, workers, run_dir), then exit")
    p.add_argument("--workers", help="with --check: the worker count the job will have, or 'auto' (one per GPU "
                                     "of this machine, else 2: run.sh's plain runs)")
    p.add_argument("--virtual-workers", type=_positive, metavar="W",
                   help="simulate W workers in this one process (each with its own shard, batch, reducer and "
                        "residual; same results as W processes, no network time): to study methods at scale")
    p.add_argument("--list-presets", action="store_true", help="list the presets with their descriptions and exit")
    p.add_argument("--list-reducers", action="store_true",
                   help="list the reducers with their options and defaults, then exit")
    p.add_argument("--log-level", default=os.environ.get("SPARSECOMM_LOG", "INFO"))
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The settings named by the command line; without ``--preset`` the preset is chosen from
    ``--task`` and ``--model``."""
    flags = {"task": args.task, "model": args.model, "reducer.name": args.reducer,
             "reducer.density": args.density, "epochs": args.epochs, "seed": args.seed,
             "data.dir": args.data_dir, "output_dir": args.output_dir}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    name = args.preset
    if name is None:
        if args.task is None and args.model is None:
            raise ConfigError("no preset given: name one with --preset NAME (--list-presets shows them), or name "
                              "--task and/or --model to have one chosen")
        from ..tasks import models_by_task

        name, why = choose_preset(args.task, args.model, models_by_task())
        log.info("no preset named: using %s, %s", name, why)
    return load_config(find_preset(name), overrides, preset_name=name)


def list_presets() -> str:
    rows = [preset_info(name) for name in available_presets()]
    width = max((len(r.name) for r in rows), default=0)
    return "\n".join(f"{r.name:<{width}}  {r.description or f'{r.model} on {r.task}'}" for r in rows)


def list_reducers() -> str:
    from .. import reducers
    from ..reducers.registry import COMMON_OPTIONS

    lines = []
    for name in reducers.available():
        cls = reducers.lookup(name)
        options = ", ".join(f"{k}={v!r}" for k, v in reducers.method_options(name).items()) or "none"
        lines.append(f"{name:<12} {cls.summary}\n{'':<12} options: {options}")
    lines.append(f"every method also takes: density (0.001), error_feedback (true), "
                 f"{', '.join(COMMON_OPTIONS)}; set them with --reducer, --density and "
                 f"--set reducer.options={{key: value}}")
    return "\n".join(lines)


def _gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer (the number of virtual workers), got {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def wait_for_run(args: argparse.Namespace) -> float:
    """Seconds to wait for another job to let go of the run directory: ``--wait-for-run``, else
    ``SPARSECOMM_WAIT_FOR_RUN``, else 0 (stop at once)."""
    if args.wait_for_run is not None:
        return args.wait_for_run
    text = os.environ.get("SPARSECOMM_WAIT_FOR_RUN", "").strip()
    if not text:
        return 0.0
    try:
        return _seconds(text)
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"SPARSECOMM_WAIT_FOR_RUN {exc}") from None


def _workers(text: str) -> int:
    if text == "auto":
        return _gpus() or 2
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--workers must be a positive integer or 'auto', got {text!r}")
    return int(text)


def _is_main() -> bool:
    return os.environ.get("RANK", "0") in ("", "0")


def _fail(message: str) -> int:
    """One line on rank 0 (every rank finds the same fault in the settings), exit code 2."""
    if _is_main():
        print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # before training started (a stop during training checkpoints)
        if _is_main():
            print("interrupted before training started; nothing to save", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.list_presets:
        print(list_presets())
        return 0
    if args.list_reducers:
        print(list_reducers())
        return 0
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("sparsecomm").setLevel(args.log_level.upper())
    if not _is_main():
        logging.getLogger("sparsecomm.train.cli").setLevel(logging.WARNING)
    virtual = args.virtual_workers or 0
    try:
        from ..launch.job import multiprocess_launch, virtual_conflict
        from .checks import check_run

        launch = multiprocess_launch() if virtual else None
        if launch is not None:
            return _fail(virtual_conflict(virtual, *launch))
        workers = virtual or (_workers(args.workers) if args.check and args.workers is not None else None)
        cfg = check_run(resolve_config(args), workers, virtual=bool(virtual))
        wait_s = wait_for_run(args)
    except ConfigError as exc:
        return _fail(str(exc))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    if args.check:
        from pathlib import Path

        from .records import RunInUse, run_lock, run_name

        run_dir = None if workers is None else Path(cfg.output_dir) / run_name(cfg, workers, bool(virtual))
        # Another job on the run directory stops a start in seconds, before any data or worker (the
        # trainer's lock decides; this only looks). Rank 0 looks, as the trainer's rank 0 decides.
        holder = run_lock(run_dir).holder() if run_dir is not None and _is_main() and not wait_s else None
        if holder is not None:
            return _fail(str(RunInUse(run_dir, holder)))
        gpus = _gpus()
        print(f"preset={cfg.preset or ''}\ntask={cfg.task}\ngpus={gpus}", flush=True)
        if run_dir is not None:
            print(f"workers={workers}\nrun_dir={run_dir}", flush=True)
            if _is_main() and not virtual and (cfg.device == "cpu" or (cfg.device == "auto" and not gpus)):
                _say_cpu_cost(cfg, workers)
        return 0
    return _train(cfg, args.fresh, virtual, wait_s)


def _say_cpu_cost(cfg: RunConfig, workers: int) -> None:
    """Before any data is prepared: what the job costs on this CPU (rank 0, on stderr)."""
    from .estimate import QUICK_PRESET, cpu_notice

    quick = None if cfg.preset == QUICK_PRESET else load_config(find_preset(QUICK_PRESET), preset_name=QUICK_PRESET)
    print(f"note: {cpu_notice(cfg, workers, quick)}", file=sys.stderr, flush=True)


def _train(cfg: RunConfig, fresh: bool, virtual: int = 0, wait_s: float = 0.0) -> int:
    from .checkpoint import CheckpointError
    from ..launch.job import join, leave, lost_ranks
    from .loop import Stopped, Trainer

    try:
        job = join(cfg.device, watchdog=True, virtual=virtual)
    except (ValueError, RuntimeError) as exc:
        log.error("%s", exc)
        return 2
    trainer = None
    try:
        trainer = Trainer(cfg, job, fresh=fresh, wait_s=wait_s)
        trainer.run()
    except Stopped as stop:
        if job.is_main:
            _report(trainer)
            log.warning("%s; %s", stop, "run the same command again to resume" if stop.signum
                        else "raise max_steps (or leave it out) and run the command again to go on")
        leave()
        return 128 + stop.signum if stop.signum else 0
    except KeyboardInterrupt:
        if job.is_main:
            log.warning("interrupted%s; nothing was saved after the last checkpoint",
                        "" if trainer is None else f" at step {trainer.step}")
        return 130
    except ConfigError as exc:
        if job.is_main:
            log.error("%s", exc)
        leave()
        return 2
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        log.error("%s", exc)
        leave()
        return 2
    except RuntimeError as exc:
        if job.world > 1:
            lost = lost_ranks()
            if lost is None or lost:
                who = "rank 0 or the launcher (the job's rendezvous store is unreachable)" if lost is None \
                    else f"rank(s) {', '.join(map(str, lost))}"
                log.error("lost %s: a collective failed (%s); stopping this rank too",
                          who, str(exc).strip().splitlines()[-1][:300])
                return 1
        raise
    leave()
    if job.is_main:
        _report(trainer)
    return 0


def _report(trainer) -> None:
    """The run's closing lines (rank 0): what it reached and what it cost."""
    from .report import report

    if trainer is not None and trainer.summary is not None:
        log.info("%s", report(trainer.summary, str(trainer.run_dir.parent)))
