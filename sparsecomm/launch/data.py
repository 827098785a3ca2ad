"""A job's data: rank 0 (or a plain run, before its workers start) runs ``prepare_dataset.sh``
for the job's task; the other ranks wait for the ``.prepared`` marker it leaves."""
from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ..data.prepare.catalog import DATASETS
from ..data.prepare.manifest import MARKER

__all__ = ["folder", "prepare", "wait_prepared", "UNPREPARED"]

# Tasks whose data nobody prepares (logreg reads a LIBSVM file the user provides).
UNPREPARED = ("logreg",)


def folder(task: str) -> str | None:
    """The folder of ``task``'s data under the data directory; None for a task whose data is
    not prepared (:data:`UNPREPARED`)."""
    if task in UNPREPARED:
        return None
    return DATASETS[task].folder if task in DATASETS else task


def prepare(script: Path, data_dir: str, task: str) -> int:
    """Run ``script`` (prepare_dataset.sh) for ``task`` into ``data_dir``; its exit status
    (128 + N when signal N ended it). A Ctrl-C meanwhile goes to the script alone, which says
    what it stopped; when the script died of it, :class:`KeyboardInterrupt` is raised after."""
    interrupted: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.default_int_handler:
        signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        code = subprocess.run([str(script), "--data-dir", data_dir, task]).returncode
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted and code == -signal.SIGINT:
        raise KeyboardInterrupt
    return 128 - code if code < 0 else code


def wait_prepared(data_dir: str, task: str, say: Callable[[str], None], every_s: int = 120,
                  sleep: Callable[[float], None] = time.sleep) -> None:
    """Wait until ``task``'s folder in ``data_dir`` has its marker, calling ``say`` with a line
    on the way in and every ``every_s`` seconds after (rank 0 prepares it; if rank 0 fails,
    the launcher stops the job)."""
    where = f"{data_dir}/{folder(task)}"
    waited = 0
    while not Path(where, MARKER).exists():
        if waited % every_s == 0:
            say(f"waiting for rank 0 to prepare {task} in {where}")
        sleep(1)
        waited += 1
