"""Checkpoints that survive being interrupted while they are written.

A checkpoint is a folder ``checkpoints/<tag>/`` holding ``shared.pt`` (written by rank 0:
model, optimizer, progress) and one ``rank-<r>.pt`` per rank (its reducer state and
residual, its RNG states); a process of virtual workers writes one per virtual worker, so
the folder looks the same, and the pointer says it was virtual. Every file is written to a temporary name, flushed, fsync'ed and
renamed; only when every rank has finished does rank 0 mark the folder complete, atomically
replace ``latest.json`` with a pointer to it, and delete all but the last two complete ones. A
reader therefore always finds a complete checkpoint, and a damaged latest one falls back to the
one before. Files are read with ``torch.load(weights_only=True)``.

The run directory must be on a file system every rank sees (as on any cluster with a shared
home or scratch).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..launch.job import Job

__all__ = ["CheckpointError", "Checkpoints", "write_atomic"]

log = logging.getLogger(__name__)

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
    """The checkpoints of one run directory, seen from one rank.

    The last two complete checkpoints are kept. A checkpoint is complete once every rank has
    written its file: rank 0 then writes ``complete.json`` into its folder and points
    ``latest.json`` at it. When the latest one cannot be read (a truncated file, an empty
    pointer) the ranks agree on the newest checkpoint every one of them can read, and say
    which file they passed over.
    """

    KEEP = 2

    def __init__(self, run_dir: Path, job: Job) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.job = job
        self.world = job.workers
        self.ranks = list(range(job.virtual)) if job.virtual else [job.rank]  # whose files this process keeps

    def _kind(self, world: Any, virtual: bool) -> str:
        return f"{world} {'virtual workers in one process' if virtual else 'workers'}"

    @property
    def pointer(self) -> Path:
        return self.root / "latest.json"

    def exists(self) -> bool:
        return self.pointer.is_file() or bool(self._complete_tags())

    def save(self, tag: str, shared: dict[str, Any], local: dict[str, Any] | list[dict[str, Any]],
             info: dict[str, Any]) -> Path:
        """Write one checkpoint (a collective: every rank calls it with its own ``local``; a
        process of virtual workers with a list, one per worker)."""
        job = self.job
        states = local if job.virtual else [local]
        folder = self.root / tag
        if job.is_main:
            folder.mkdir(parents=True, exist_ok=True)
        job.barrier()
        folder.mkdir(parents=True, exist_ok=True)  # on file systems slow to show rank 0's folder
        for rank, state in zip(self.ranks, states, strict=True):
            write_atomic(folder / f"rank-{rank}.pt",
                         lambda f: torch.save({"format": FORMAT, "rank": rank, "world": self.world, **state}, f))
        if job.is_main:
            write_atomic(folder / "shared.pt",
                         lambda f: torch.save({"format": FORMAT, "world": self.world, **shared}, f))
        job.barrier()
        if job.is_main:
            text = json.dumps({"format": FORMAT, "tag": tag, "world": self.world, "virtual": bool(job.virtual),
                               **info}, indent=1).encode()
            write_atomic(folder / "complete.json", lambda f: f.write(text))
            write_atomic(self.pointer, lambda f: f.write(text))
            keep = set(self._complete_tags()[:self.KEEP]) | {tag}
            for old in self.root.iterdir():
                if old.is_dir() and old.name not in keep and (old.name.startswith("step-")):
                    shutil.rmtree(old, ignore_errors=True)
        job.barrier()
        return folder

    def _complete_tags(self) -> list[str]:
        """Tags of the folders marked complete, newest (highest step) first."""
        found = []
        if self.root.is_dir():
            for marker in self.root.glob("*/complete.json"):
                try:
                    info = json.loads(marker.read_text())
                    found.append((int(info.get("step", -1)), marker.parent.name))
                except (OSError, ValueError, TypeError):
                    continue
        return [tag for _, tag in sorted(found, reverse=True)]

    def _pointed_tag(self) -> str | None:
        """The tag ``latest.json`` names; raises for a pointer of another world size."""
        try:
            info = json.loads(self.pointer.read_text())
        except (OSError, ValueError) as exc:
            if self.pointer.exists():
                log.warning("checkpoint pointer %s cannot be read (%s); looking for the newest complete checkpoint",
                            self.pointer, exc)
            return None
        if not isinstance(info, dict) or info.get("format") != FORMAT or "tag" not in info:
            log.warning("checkpoint pointer %s is not a sparsecomm checkpoint pointer; looking for the newest "
                        "complete checkpoint", self.pointer)
            return None
        saved, virtual = info.get("world"), bool(info.get("virtual", False))
        if saved != self.world or virtual != bool(self.job.virtual):
            raise CheckpointError(f"checkpoint {self.root / info['tag']} was written by {self._kind(saved, virtual)}; "
                                  f"this job has {self._kind(self.world, bool(self.job.virtual))}. Resume with the "
                                  f"same workers, or start a fresh run")
        return str(info["tag"])

    def load(self) -> tuple[dict[str, Any], Any, dict[str, Any]]:
        """(shared, this rank's local state, checkpoint info) of the newest checkpoint every rank
        can read (a collective); for a process of virtual workers, a list of local states, one
        per worker."""
        pointed = self._pointed_tag()
        candidates = ([pointed] if pointed else []) + [t for t in self._complete_tags() if t != pointed]
        problems: list[str] = []
        for tag in candidates:
            folder = self.root / tag
            loaded = None
            try:
                shared = _load(folder / "shared.pt")
                local = []
                for rank in self.ranks:
                    state = _load(folder / f"rank-{rank}.pt")
                    if state.get("rank") != rank or state.get("world") != self.world:
                        raise CheckpointError(f"checkpoint file {folder / f'rank-{rank}.pt'} belongs to rank "
                                              f"{state.get('rank')} of {state.get('world')} workers")
                    local.append(state)
                loaded = (shared, local if self.job.virtual else local[0], {"tag": tag, "step": shared.get("step")})
            except CheckpointError as exc:
                problems.append(str(exc))
            if self.job.all(loaded is not None):
                if tag != pointed and self.job.is_main:
                    log.warning("resuming from the previous complete checkpoint %s", folder)
                assert loaded is not None
                return loaded
            if loaded is None:
                log.warning("passing over checkpoint %s: %s", tag, problems[-1])
        files = "; ".join(problems) or f"no complete checkpoint in {self.root}"
        raise CheckpointError(f"no usable checkpoint in {self.root} ({files}); start afresh with --fresh "
                              f"(the run directory is kept aside)")
