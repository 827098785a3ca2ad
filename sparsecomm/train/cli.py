"""Command line of the trainer: ``python -m sparsecomm.train --preset NAME [options]``.

Settings come from a YAML preset, then from the convenience flags (the variables ``run.sh``
exposes), then from ``--set section.key=value`` overrides, in that order.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import ConfigError, RunConfig, load_config

__all__ = ["main", "preset_dirs", "find_preset"]

log = logging.getLogger("sparsecomm")

REPO = Path(__file__).resolve().parents[2]


def preset_dirs() -> list[Path]:
    """Folders searched for presets given by name: the benchmark folders of the repository."""
    return [REPO / "cnn-lstm" / "presets", REPO / "ncf" / "presets"]


def available_presets() -> list[str]:
    return sorted(p.stem for d in preset_dirs() if d.is_dir() for p in d.glob("*.yaml"))


def find_preset(name: str) -> Path:
    """A preset file: a path, or a name (with or without .yaml) from the benchmark folders."""
    path = Path(name)
    if path.is_file():
        return path
    for folder in preset_dirs():
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets()) or 'none'}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sparsecomm.train", description=__doc__.split("\n")[0])
    p.add_argument("--preset", help="preset name or YAML file; see --list-presets")
    p.add_argument("--task", "--dataset", dest="task", help="task / dataset (e.g. cifar10, ptb, ml-100k)")
    p.add_argument("--model", help="model name (sparsecomm.models)")
    p.add_argument("--reducer", help="reducer name (sparsecomm.reducers)")
    p.add_argument("--density", type=float, help="target density of the reducer")
    p.add_argument("--epochs", type=float, help="training epochs")
    p.add_argument("--seed", type=int)
    p.add_argument("--data-dir", help="the data directory (default: the preset's, or ./data)")
    p.add_argument("--output-dir", help="where run directories are created (default ./runs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any setting, e.g. --set optimizer.lr=0.05 (repeatable)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--log-level", default=os.environ.get("SPARSECOMM_LOG", "INFO"))
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> RunConfig:
    flags = {"task": args.task, "model": args.model, "reducer.name": args.reducer,
             "reducer.density": args.density, "epochs": args.epochs, "seed": args.seed,
             "data.dir": args.data_dir, "output_dir": args.output_dir}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)
    preset = find_preset(args.preset) if args.preset else None
    return load_config(preset, overrides)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list_presets:
        print("\n".join(available_presets()))
        return 0
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = resolve_config(args).validate()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0

    from .distributed import join, leave, lost_ranks
    from .loop import Stopped, Trainer

    try:
        job = join(cfg.device, watchdog=True)
    except (ValueError, RuntimeError) as exc:
        log.error("%s", exc)
        return 2
    try:
        trainer = Trainer(cfg, job, fresh=args.fresh)
        summary = trainer.run()
    except Stopped as stop:
        log.warning("%s; checkpoint written, rerun the same command to resume", stop)
        leave()
        return 128 + stop.signum if stop.signum else 0
    except (ValueError, FileNotFoundError) as exc:
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
        best = summary.get("best")
        log.info("done: %s in %s; best %s %s", summary["run"], trainer.run_dir,
                 summary["metric"], "n/a" if best is None else f"{best['value']:.4g} (epoch {best['epoch']:g})")
    return 0
