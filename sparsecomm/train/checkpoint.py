"""Checkpoints that survive being interrupted while they are written.

A checkpoint is a folder ``checkpoints/<tag>/`` holding ``shared.pt`` (written by rank 0:
model, optimizer, progress) and one ``rank-<r>.pt`` per rank (its reducer state and
residual, its RNG states). Every file is written to a temporary name, flushed, fsync'ed and
renamed; only when every rank has finished does rank 0 atomically replace ``latest.json``
with a pointer to the new folder and delete the previous one. A reader therefore always finds
a complete checkpoint. Files are read with ``torch.load(weights_only=True)``.

The run directory must be on a file system every rank sees (as on any cluster with a shared
home or scratch).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .distributed import Job

__all__ = ["CheckpointError", "Checkpoints", "write_atomic"]

FORMAT = "sparsecomm.checkpoint/1"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: truncated, foreign, or of another job."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, make it durable, then rename
    it to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt or holding objects weights_only refuses
        raise CheckpointError(f"checkpoint file {path} cannot be read ({type(exc).__name__}: {exc}); "
                              f"it may be truncated or not a sparsecomm checkpoint") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint file {path} is not a sparsecomm checkpoint (expected format {FORMAT!r})")
    return obj


class Checkpoints:
    """The checkpoints of one run directory, seen from one rank."""

    def __init__(self, run_dir: Path, job: Job) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.job = job

    @property
    def pointer(self) -> Path:
        return self.root / "latest.json"

    def exists(self) -> bool:
        return self.pointer.is_file()

    def save(self, tag: str, shared: dict[str, Any], local: dict[str, Any], info: dict[str, Any]) -> Path:
        """Write one checkpoint (a collective: every rank calls it with its own ``local``)."""
        job = self.job
        folder = self.root / tag
        if job.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        job.barrier()
        folder.mkdir(parents=True, exist_ok=True)  # on file systems slow to show rank 0's folder
        write_atomic(folder / f"rank-{job.rank}.pt",
                     lambda f: torch.save({"format": FORMAT, "rank": job.rank, "world": job.world, **local}, f))
        if job.is_main:
            write_atomic(folder / "shared.pt",
                         lambda f: torch.save({"format": FORMAT, "world": job.world, **shared}, f))
        job.barrier()
        if job.is_main:
            previous = self._current_tag()
            text = json.dumps({"format": FORMAT, "tag": tag, "world": job.world, **info}, indent=1).encode()
            write_atomic(self.pointer, lambda f: f.write(text))
            if previous and previous != tag:
                shutil.rmtree(self.root / previous, ignore_errors=True)
        job.barrier()
        return folder

    def _current_tag(self) -> str | None:
        if not self.pointer.is_file():
            return None
        try:
            return json.loads(self.pointer.read_text()).get("tag")
        except (OSError, ValueError):
            return None

    def load(self) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """(shared, this rank's local, pointer info) of the latest checkpoint."""
        try:
            info = json.loads(self.pointer.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint pointer {self.pointer} cannot be read ({exc})") from None
        if not isinstance(info, dict) or info.get("format") != FORMAT or "tag" not in info:
            raise CheckpointError(f"checkpoint pointer {self.pointer} is not a sparsecomm checkpoint pointer")
        if info.get("world") != self.job.world:
            raise CheckpointError(f"checkpoint {self.root / info['tag']} was written by {info.get('world')} workers; "
                                  f"this job has {self.job.world}. Resume with the same worker count, or start "
                                  f"a fresh run")
        folder = self.root / info["tag"]
        shared = _load(folder / "shared.pt")
        local = _load(folder / f"rank-{self.job.rank}.pt")
        if local.get("rank") != self.job.rank:
            raise CheckpointError(f"checkpoint file {folder / f'rank-{self.job.rank}.pt'} belongs to rank {local.get('rank')}")
        return shared, local, info
