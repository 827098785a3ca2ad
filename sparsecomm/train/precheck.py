"""The trainer's settings check (``python -m sparsecomm.train ARGS --check --workers N``) run in
this process, before any data is prepared or any worker starts, and its answer read.

The check itself says what is wrong (one line, on rank 0 only) and what a CPU run will cost;
here its key=value lines (preset, task, gpus, workers) become a :class:`Checked`.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Checked", "run_check", "read_answer"]


@dataclass(frozen=True)
class Checked:
    """What the check found: the preset it chose (or was given), the task whose data the run
    needs, the GPUs of this machine, and the job's worker count."""

    preset: str
    task: str
    gpus: int
    workers: str


def _status(exit: SystemExit) -> int:
    """The exit status a process ending with ``exit`` would have."""
    if exit.code is None or isinstance(exit.code, int):
        return exit.code or 0
    print(exit.code, file=sys.stderr)
    return 1


def run_check(args: Sequence[str], workers: str, rank: str) -> tuple[int, str]:
    """Check the trainer options ``args`` for a job of ``workers`` workers ("auto": one per GPU,
    else 2) as rank ``rank`` would; returns the check's exit status and what it printed on
    standard output. Its messages go to standard error as the trainer writes them."""
    from .cli import main

    out = io.StringIO()
    previous = os.environ.get("RANK")
    os.environ["RANK"] = rank
    try:
        with contextlib.redirect_stdout(out):
            try:
                status = main([*args, "--check", "--workers", workers])
            except SystemExit as exc:
                status = _status(exc)
            except Exception:  # a fault in the check, not in the settings: its traceback
                traceback.print_exc()
                status = 1
    finally:
        if previous is None:
            os.environ.pop("RANK", None)
        else:
            os.environ["RANK"] = previous
    return status, out.getvalue()


def read_answer(text: str) -> Checked | None:
    """The :class:`Checked` of the check's output ``text``; None when it holds no task (the
    options asked for something else, such as --help)."""
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    if "task" not in values:
        return None
    return Checked(values.get("preset", ""), values["task"], int(values.get("gpus") or 0), values.get("workers", ""))
