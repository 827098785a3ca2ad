"""What a run writes, and where: ``config.yaml``, ``metrics.jsonl`` and ``summary.json`` in
one directory per run (written by rank 0), optionally TensorBoard event files."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, RunConfig, load_config
from ..lock import Holder, RunLock

__all__ = ["run_name", "differences", "Recorder", "environment", "RECORD_FILES", "check_run_dir", "set_aside",
           "run_lock", "RunInUse"]

log = logging.getLogger(__name__)

RECORD_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "reducer.json")

# Settings that do not change what a run computes (paths, records, length, device), or that
# the name already shows.
_UNNAMED = ("name", "description", "preset", "output_dir", "epochs", "max_steps", "device", "records",
            "data.dir", "data.cache_dir", "data.eval_batch_size",
            "task", "model", "seed", "reducer.name", "reducer.density", "reducer.error_feedback",
            "data.batch_size", "data.global_batch_size")
_MAX_READABLE = 40


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def differences(cfg: RunConfig) -> dict[str, Any]:
    """The settings of ``cfg`` that differ from its preset's (from the defaults without a
    preset) and change what the run computes, beyond those the name shows anyway."""
    if cfg.preset:
        from .presets import find_preset

        base = load_config(find_preset(cfg.preset)).to_dict()
    else:
        base = RunConfig().to_dict()
    mine, theirs = _flat(cfg.to_dict()), _flat(base)
    return {k: v for k, v in sorted(mine.items())
            if v != theirs.get(k) and not any(k == u or k.startswith(u + ".") for u in _UNNAMED)}


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "_".join(_short(v) for v in value)
    if isinstance(value, dict):
        return "_".join(f"{k}{_short(v)}" for k, v in sorted(value.items()))
    return str(value)


def _setting(key: str, value: Any) -> str:
    """``lr0.05``; ``l2_0.0001`` where the key ends in a digit."""
    return f"{key}{'_' if key[-1:].isdigit() else ''}{_short(value)}"


def run_name(cfg: RunConfig, world: int, virtual: bool = False) -> str:
    """A directory name made of the settings that tell runs apart: task, model, method,
    density, workers (``P4``; ``V64`` for 64 virtual workers in one process), batch, seed, then
    what else differs from the preset, written out while short (``lr0.05``) and as a hash of it
    otherwise (``x1a2b3c4d``; config.yaml has them all)."""
    if cfg.name:
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", cfg.name)
    r = cfg.reducer
    parts = [cfg.task, cfg.model, r.name]
    if r.name != "exact":
        parts.append(f"c{r.density:g}")
        if not r.error_feedback:
            parts.append("noef")
    parts += [f"{'V' if virtual else 'P'}{world}", f"b{cfg.batch_per_worker(world)}", f"seed{cfg.seed}"]
    diff = differences(cfg)
    if diff:
        readable = "-".join(_setting(k.rsplit(".", 1)[-1], v) for k, v in diff.items())
        if len(readable) > _MAX_READABLE or len({k.rsplit('.', 1)[-1] for k in diff}) < len(diff):
            text = json.dumps(diff, sort_keys=True, default=str)
            readable = "x" + hashlib.sha1(text.encode()).hexdigest()[:8]
        parts.append(readable)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(parts))


def check_run_dir(run_dir: Path) -> None:
    """Raise :class:`ConfigError` (one line) when the run directory cannot be created or
    written, or a record file's name is taken by a folder."""
    run_dir = Path(run_dir)
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"cannot create the run directory {run_dir}: {path} is a file, not a folder; "
                                  f"choose another --output-dir (OUTPUT_DIR)")
            if not os.access(path, os.W_OK | os.X_OK):
                raise ConfigError(f"cannot write the run directory {run_dir}: {path} is not writable")
            break
    for name in (*RECORD_FILES, "checkpoints"):
        path = run_dir / name
        wrong = path.exists() and (path.is_dir() if name != "checkpoints" else not path.is_dir())
        if wrong:
            kind = "a folder" if path.is_dir() else "a file"
            raise ConfigError(f"{path} is {kind}, where the run keeps its {name}; move it away or choose "
                              f"another --output-dir (OUTPUT_DIR)")


def run_lock(run_dir: Path) -> RunLock:
    """The lock that makes a run directory one job's: ``<output dir>/.locks/<run name>.lock``,
    beside the run directories rather than inside one, so that it stays put when a run is moved
    aside (see :mod:`sparsecomm.lock`)."""
    run_dir = Path(run_dir)
    return RunLock(run_dir.parent / ".locks" / f"{run_dir.name}.lock", f"run directory {run_dir}")


class RunInUse(ConfigError):
    """A run directory another live job holds; the message is one line: the run, the holder,
    what to do."""

    def __init__(self, run_dir: Path, holder: Holder, waited_s: float = 0.0) -> None:
        stop = f"stop it ({holder.how_to_stop()}; it checkpoints first)"
        if waited_s:
            todo = f"still after waiting {waited_s:g} s: wait longer (--wait-for-run SECONDS) or {stop}"
        else:
            todo = f"let it finish, {stop}, or start this one with --wait-for-run to wait for it and then resume"
        super().__init__(f"the run directory {run_dir} is in use by another job: {holder.describe()}; {todo}")
        self.holder = holder


def set_aside(run_dir: Path) -> Path | None:
    """Move an earlier run's directory out of the way (``<name>.<YYYYmmdd-HHMMSS>``) and return
    where it went; None when there is nothing to keep."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir.with_name(f"{run_dir.name}.{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = run_dir.with_name(f"{run_dir.name}.{stamp}-{n}")
    run_dir.rename(target)
    return target


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(world: int, backend: str, device: str, virtual: bool = False) -> dict[str, Any]:
    """Versions and places: what a reader of the run needs besides the settings. ``virtual``:
    the ``world`` workers were simulated in one process."""
    import numpy
    import torch

    import sparsecomm
    from ..launch.job import launch_record

    return {
        "world_size": world,
        "virtual": virtual,
        "backend": backend,
        "device": device,
        "git_commit": _git_commit(),
        "sparsecomm": sparsecomm.__version__,
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "numpy": str(numpy.__version__),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
        "launcher": launch_record(),
    }


class Recorder:
    """Rank 0's writer of one run's records (other ranks hold a silent one)."""

    def __init__(self, run_dir: Path, active: bool, tensorboard: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.active = active
        self._file = None
        self._board = None
        if not active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("records.tensorboard is on but the tensorboard package is not installed; "
                                   "pip install tensorboard, or set records.tensorboard=false") from None
            self._board = SummaryWriter(str(self.run_dir / "tensorboard"))

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    def write_config(self, cfg: RunConfig, env: dict[str, Any]) -> None:
        if not self.active:
            return
        text = yaml.safe_dump({**cfg.to_dict(), "environment": env}, sort_keys=False)
        (self.run_dir / "config.yaml").write_text(text)

    def open(self, keep_until_step: int | None) -> None:
        """Start appending to metrics.jsonl; on resume, first drop lines written after the
        checkpoint being resumed (they will be written again)."""
        if not self.active:
            return
        path = self.metrics_path
        if keep_until_step is None:
            path.write_text("")
        elif path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by the interruption
                if record.get("step", 0) <= keep_until_step:
                    kept.append(line)
            path.write_text("".join(k + "\n" for k in kept))
        self._file = open(path, "a", buffering=1)

    def log(self, record: dict[str, Any]) -> None:
        if not self.active or self._file is None:
            return
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        if self._board is not None:
            step = record.get("step", 0)
            prefix = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                    self._board.add_scalar(f"{prefix}/{key}", value, step)

    def write_summary(self, summary: dict[str, Any]) -> None:
        if not self.active:
            return
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=True) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._board is not None:
            self._board.close()
            self._board = None
