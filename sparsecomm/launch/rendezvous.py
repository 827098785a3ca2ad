"""Where rank 0 listens, for a job whose launcher does not say it in MASTER_ADDR and MASTER_PORT.

The address comes, in this order, from ``MASTER_ADDR``/``MASTER_PORT`` (or the seeds' ``hostip``
and ``port``), from SLURM (the step's first node and a port derived from the job id), or from a
file under ``OUTPUT_DIR/.rendezvous/``: rank 0 writes its address and a free port there and the
other ranks read it (on several nodes that folder must be on a shared file system). A file older
than the reader's wait by more than :data:`STALE_S` is an earlier job's and is not read.
"""
from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from . import host, slurm
from .launcher import Launcher, LaunchError

__all__ = ["given", "for_launcher", "rendezvous_file", "publish", "is_current", "read_published", "wait_published",
           "STALE_S", "WAIT_S", "POLL_S"]

log = logging.getLogger(__name__)

STALE_S = 30    # a file this much older than the reader's wait belongs to an earlier job
WAIT_S = 120.0  # how long the other ranks wait for rank 0's file
POLL_S = 0.5


def given(env: Mapping[str, str]) -> tuple[str, str]:
    """The address and port the environment names ("" where it names none)."""
    return (env.get("MASTER_ADDR") or env.get("hostip") or "", env.get("MASTER_PORT") or env.get("port") or "")


def for_launcher(launcher: Launcher, env: Mapping[str, str], output_dir: str) -> tuple[str, str]:
    """The rendezvous address and port of a SLURM or MPI job (see the module's description).
    Raises :class:`LaunchError` when rank 0's given port is in use on its host, or when rank 0
    publishes nothing within :data:`WAIT_S`."""
    address, port = given(env)
    if not address and launcher.name == "slurm":
        try:
            address = slurm.first_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "")
        except subprocess.CalledProcessError as exc:
            raise LaunchError(f"`{' '.join(exc.cmd)}` failed (exit {exc.returncode}): {(exc.stderr or '').strip()}",
                              status=exc.returncode) from None
        port = port or str(slurm.job_port(env.get("SLURM_JOB_ID") or "0"))
    if address and port:
        if launcher.is_first and host.is_this_host(address) and not host.port_is_free(port):
            raise LaunchError(f"port {port} on {address} is in use; unset MASTER_PORT (or port) or pick another")
        return address, port
    path = rendezvous_file(output_dir, launcher.job_key)
    if launcher.is_first:
        address, port = address or host.own_address(), port or str(host.free_port())
        publish(path, address, port)
        return address, port
    return wait_published(path)


def rendezvous_file(output_dir: str, job_key: str) -> Path:
    """The file through which the ranks of job ``job_key`` agree on rank 0's address."""
    return Path(output_dir) / ".rendezvous" / (job_key or "job")


def publish(path: Path, address: str, port: str) -> None:
    """Write ``address port`` to ``path`` at once (a reader sees the whole line or no file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    partial.write_text(f"{address} {port}\n")
    partial.replace(path)
    log.debug("published %s:%s in %s", address, port, path)


def is_current(path: Path, started: int) -> bool:
    """Whether ``path`` holds something and was written no more than :data:`STALE_S` seconds
    before ``started`` (whole seconds since the epoch), so that it belongs to this job."""
    try:
        stat = path.stat()
    except OSError:
        return False
    return stat.st_size > 0 and int(stat.st_mtime) >= started - STALE_S


def read_published(path: Path) -> tuple[str, str]:
    """The address and port in a rendezvous file (its first line: address, then the rest)."""
    lines = path.read_text().splitlines()
    words = lines[0].split(None, 1) if lines else []
    return (words[0] if words else "", words[1].strip() if len(words) > 1 else "")


def wait_published(path: Path, wait_s: float = WAIT_S, poll_s: float = POLL_S,
                   now: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> tuple[str, str]:
    """Wait for rank 0's file at ``path`` (see :func:`is_current`) and read it; raises
    :class:`LaunchError` after ``wait_s`` seconds without it."""
    started = int(now())
    polls = 0
    while not is_current(path, started):
        sleep(poll_s)
        polls += 1
        if polls >= wait_s / poll_s:
            raise LaunchError(f"rank 0 did not publish its address in {path} within {_minutes(wait_s)}; on several "
                              f"nodes OUTPUT_DIR must be on a shared file system, or set MASTER_ADDR and MASTER_PORT "
                              f"(hostip/port)")
    return read_published(path)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} minutes" if seconds >= 120 else f"{seconds:g} s"
