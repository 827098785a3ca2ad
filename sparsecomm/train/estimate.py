"""What a run will cost on this machine's CPU, said before any data is prepared: the run's
steps (from the data set's published size) times one forward and backward of its model on a
random batch, timed here with the threads each worker will have."""
from __future__ import annotations

import math
import os
import shlex
import time
from dataclasses import dataclass

import torch

from ..config import RunConfig
from ..tasks import task_class
from ..units import duration, seconds

__all__ = ["CpuEstimate", "estimate_on_cpu", "cpu_notice"]

# A run that takes longer than this on the CPU gets a suggestion of one that does not.
_LONG = 3600.0
# The quick set-up suggested instead: a preset that trains in minutes on a CPU.
QUICK_PRESET = "mnist-cnn"


@dataclass(frozen=True)
class CpuEstimate:
    steps: int          # steps of the whole run
    per_step: float     # seconds of one forward and backward, measured here

    @property
    def seconds(self) -> float:
        return self.steps * self.per_step


def estimate_on_cpu(cfg: RunConfig, workers: int, repeats: int = 2) -> CpuEstimate | None:
    """Time ``repeats`` forward and backward passes (after one untimed) of the run's model on a
    random batch, on the CPU threads one of ``workers`` workers gets; None for a task whose
    published size or input shape is not known."""
    batch = cfg.batch_per_worker(workers)
    probe = task_class(cfg.task).synthetic_step(cfg, batch)
    if probe is None:
        return None
    examples, step = probe
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    try:
        step()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        per_step = (time.perf_counter() - start) / repeats
    finally:
        torch.set_num_threads(threads)
    steps = math.ceil(cfg.epochs * ((examples // workers) // batch))
    return CpuEstimate(steps, per_step)


def cpu_notice(cfg: RunConfig, workers: int, quick: RunConfig | None = None) -> str:
    """One paragraph for a job that will train on the CPU: how long it will take here and,
    when that is over an hour, a set-up that finishes in minutes."""
    name = cfg.preset or f"{cfg.model} on {cfg.task}"
    head = f"no GPU here: the {workers} worker(s) train on the CPU"
    found = estimate_on_cpu(cfg, workers)
    if found is None:
        return f"{head}; the trainer projects the run's length after its first 30 steps"
    text = (f"{head}. {name}: {found.steps:,} steps of {cfg.batch_per_worker(workers)} examples per worker, "
            f"{seconds(found.per_step)} each for forward and backward here (timed now on random data), "
            f"about {duration(found.seconds)} in all (communication and evaluation not included)")
    if found.seconds > _LONG and quick is not None:
        fast = estimate_on_cpu(quick, workers)
        if fast is not None:
            # A mirror the user named for this job is needed for the quick one's data too (offline).
            mirror = os.environ.get("SPARSECOMM_DATA_URL")
            given = f"SPARSECOMM_DATA_URL={shlex.quote(mirror)} " if mirror else ""
            text += (f". For a run that finishes in minutes on this CPU: {given}PRESET={QUICK_PRESET} ./run.sh "
                     f"(about {duration(fast.seconds)})")
    return text

