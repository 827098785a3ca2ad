"""What a run measures, step by step: the names of the measurements, the meter that averages
them into ``metrics.jsonl``'s training lines and totals them for ``summary.json``, and the
pace that projects the run's length from its first steps. No heavy imports: the readers of
run directories (``sparsecomm.tools.runs``, ``plot``, ``compare``) take the names from here."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..units import duration

__all__ = ["TIME_PARTS", "PART_NAMES", "PER_STEP", "Moment", "Meter", "Pace"]

log = logging.getLogger(__name__)

# A step's time split, in the order a step runs, with the names figures and tables give them:
# loading the batch, forward, backward, the reducer's selection and its communication, the
# optimizer's step.
PART_NAMES = {"t_data": "data", "t_forward": "forward", "t_backward": "backward", "t_select": "select",
              "t_comm": "communicate", "t_step": "optimizer step"}
TIME_PARTS = tuple(PART_NAMES)

# Measured at every step and averaged into each training line: what the reducer achieved and
# sent (one worker's bytes) and the time split.
PER_STEP = ("density", "local_density", "bytes_sent", "bytes_wire") + TIME_PARTS

# Kept over the whole run for the summary (besides the time split).
_TOTALS = ("bytes_sent", "bytes_wire", "density", "local_density")


@dataclass(frozen=True)
class Moment:
    """Where a run stands after a step, as every rank sees it: the components of the loop
    decide from it whether their turn has come."""

    step: int
    epoch: float        # step / steps per epoch
    epoch_end: bool     # a whole epoch ended with this step
    last: bool          # the schedule's last step
    stop: str | None = None  # why the run stops here before its end (agreed by every rank)
    signal: int | None = None  # the signal that asked for the stop, if one did

    @property
    def epochs_done(self) -> int:
        return round(self.epoch) if self.epoch_end else int(self.epoch)


class Meter:
    """The per-step measurements of one run: summed over a window and written as one training
    line every ``log_every`` steps (and at the run's last step or a stop), and totalled for the
    summary. A method whose achieved density is off its target by more than ``density_factor``
    on more than half of the steps gets a warning."""

    def __init__(self, job: Any, log_every: int, density_factor: float = 2.0) -> None:
        self.job = job
        self.log_every = log_every
        self.density_factor = density_factor
        self.totals: dict[str, float] = {**{k: 0.0 for k in _TOTALS + TIME_PARTS},
                                         "steps": 0, "timed_steps": 0, "skipped": 0, "off_target": 0,
                                         "target": 0.0, "targeted_steps": 0}
        self._window: dict[str, float] = {}
        self._loss: Any = None  # a tensor on the device (summed without a synchronisation per step)
        self._count = 0

    def add(self, measured: dict[str, float], loss: Any, count: int, skipped: bool, target: float) -> None:
        """One step's measurements (:data:`PER_STEP`), its summed loss over ``count`` workers,
        whether the reducer skipped it, and the reducer's target density (0: none)."""
        for key in PER_STEP:
            self._window[key] = self._window.get(key, 0.0) + float(measured[key])
        self._window["n"] = self._window.get("n", 0.0) + 1
        for key in _TOTALS + TIME_PARTS:
            self.totals[key] += float(measured[key])
        self.totals["steps"] += 1
        self.totals["timed_steps"] += 1
        self.totals["skipped"] += int(skipped)
        if not skipped and target > 0:
            self.totals["target"] += target
            self.totals["targeted_steps"] += 1
            ratio = float(measured["density"]) / target
            self.totals["off_target"] += int(not 1 / self.density_factor <= ratio <= self.density_factor)
        loss = loss.double()
        self._loss = loss if self._loss is None else self._loss + loss
        self._count += count

    def running_loss(self) -> float | None:
        """This rank's mean loss since the last training line (for a progress bar)."""
        return float(self._loss) / self._count if self._count else None

    def should_log(self, at: Moment) -> bool:
        """Every ``log_every`` steps, at the last step and at a stop at ``max_steps``. A stop by
        a signal keeps its window in the checkpoint instead."""
        return self._regular(at) or (at.stop is not None and at.signal is None)

    def _regular(self, at: Moment) -> bool:
        return at.step % self.log_every == 0 or at.last

    def training_line(self, at: Moment) -> dict[str, Any] | None:
        """The means since the last line, with the loss averaged over every rank (a collective);
        None when no step was measured since. A regular line starts the window afresh; the line
        of a stop at ``max_steps`` leaves it, so a resumed run writes the lines an uninterrupted
        one would, plus this one."""
        n = self._window.get("n", 0.0)
        if not n:
            return None
        loss_sum, count = self.job.sum([float(self._loss) if self._loss is not None else 0.0, float(self._count)])
        line = {"step": at.step, "epoch": at.epoch, "loss": loss_sum / count if count else float("nan")}
        line.update({key: self._window.get(key, 0.0) / n for key in PER_STEP})
        if self._regular(at):
            self._window, self._loss, self._count = {}, None, 0
        return line

    def summary(self) -> dict[str, Any]:
        """The run's totals and means, as ``summary.json`` has them (``mean_target_density``: the
        reducer's own target over the steps that had one, which a method such as Accordion
        chooses itself; None when no step had one)."""
        t = self.totals
        steps, timed = max(t["steps"], 1), max(t.get("timed_steps", 0), 1)
        return {"mean_density": t["density"] / steps, "mean_local_density": t["local_density"] / steps,
                "total_bytes_sent": t["bytes_sent"], "total_bytes_wire": t["bytes_wire"],
                "bytes_sent_per_step": t["bytes_sent"] / steps, "skipped_steps": t["skipped"],
                "mean_target_density": self._mean_target(),
                "time_split": {k: t.get(k, 0.0) / timed for k in TIME_PARTS} if t.get("timed_steps") else None}

    def _mean_target(self) -> float | None:
        """The reducer's own target over the run; None unless every step that was not skipped
        had one and was counted (a run resumed from a checkpoint older than this total)."""
        t = self.totals
        counted = t["targeted_steps"]
        return t["target"] / counted if counted and counted == t["steps"] - t["skipped"] else None

    def warnings(self, target: float) -> list[str]:
        """What a reader of the results must know: a method that missed its target density."""
        t = self.totals
        counted = t["steps"] - t["skipped"]
        if counted and t["off_target"] > counted / 2:
            mean = t["density"] / max(t["steps"], 1)
            return [f"achieved density was more than {self.density_factor:g}x off the target {target:g} on "
                    f"{t['off_target']} of {counted} steps (mean {mean:.3g})"]
        return []

    # ------------------------------------------------------------------ checkpoints
    def shared_state(self) -> dict[str, float]:
        return dict(self.totals)

    def local_state(self) -> dict[str, Any]:
        return {"window": dict(self._window),
                "loss": [float(self._loss) if self._loss is not None else 0.0, self._count]}

    def load_state(self, shared: dict[str, float], local: dict[str, Any], device: Any) -> None:
        self.totals.update(shared)  # a checkpoint from before the time split was totalled lacks those keys
        self._window = dict(local["window"])
        import torch

        self._loss = torch.tensor(float(local["loss"][0]), dtype=torch.float64, device=device)
        self._count = int(local["loss"][1])


class Pace:
    """Says, once, ``at`` steps after the start (or a resume), how long an epoch and the rest of
    the run will take, measured over those steps less the first ``skip`` (allocation, caches,
    first collectives). On a CPU, a run of more than a day is said to be sized for GPUs. Only
    ``show`` (rank 0's) says it."""

    def __init__(self, show: bool, at: int = 30, skip: int = 5) -> None:
        self.show, self.at, self.skip = show, at, skip
        self._times: list[float] = []

    def tick(self, elapsed: float, step: int, steps_per_epoch: int, total_steps: int, device: str) -> None:
        if len(self._times) >= self.at:
            return
        self._times.append(elapsed)
        if len(self._times) < self.at or not self.show:
            return
        per_step = (self._times[-1] - self._times[self.skip - 1]) / (self.at - self.skip)
        left = total_steps - step
        message = (f"projected from steps {step - self.at + self.skip + 1}-{step}: {per_step * 1000:.4g} ms per step, "
                   f"{duration(per_step * steps_per_epoch)} per epoch ({steps_per_epoch} steps), "
                   f"{duration(per_step * left)} for the remaining {left} steps (evaluation not included)")
        if device == "cpu" and per_step * left > 86400:
            log.warning("%s: this set-up is sized for GPUs; on this CPU it would take %s", message,
                        duration(per_step * left))
        else:
            log.info("%s", message)
