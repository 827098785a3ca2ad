"""What a run writes, and where: ``config.yaml``, ``metrics.jsonl`` and ``summary.json`` in
one directory per run (written by rank 0), optionally TensorBoard event files."""
from __future__ import annotations

import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig

__all__ = ["run_name", "Recorder", "environment"]

log = logging.getLogger(__name__)


def run_name(cfg: RunConfig, world: int) -> str:
    """A directory name made of the settings that tell runs apart."""
    if cfg.name:
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", cfg.name)
    r = cfg.reducer
    parts = [cfg.task, cfg.model, r.name]
    if r.name != "exact":
        parts.append(f"c{r.density:g}")
        if not r.error_feedback:
            parts.append("noef")
    parts += [f"P{world}", f"b{cfg.batch_per_worker(world)}", f"seed{cfg.seed}"]
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", "-".join(parts))


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


def environment(world: int, backend: str, device: str) -> dict[str, Any]:
    """Versions and places: what a reader of the run needs besides the settings."""
    import numpy
    import torch

    import sparsecomm

    return {
        "world_size": world,
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
        "launcher": {k: os.environ[k] for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "TORCHELASTIC_RUN_ID")
                     if k in os.environ},
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
