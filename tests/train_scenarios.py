"""Functions the cluster's workers run for the training tests."""
from __future__ import annotations

import os
import signal
from typing import Any

from sparsecomm.config import load_config
from sparsecomm.launch.job import join
from sparsecomm.train.loop import Stopped, Trainer


def train(overrides: list[str], fresh: bool = False, signal_rank: int | None = None,
          signal_step: int | None = None, signum: int = signal.SIGTERM) -> dict[str, Any]:
    """Train with ``overrides``; optionally deliver ``signum`` to rank ``signal_rank`` (-1: every
    rank, as Ctrl-C does) during step ``signal_step``. Returns the summary, or
    ``{"stopped": reason, "signum": n, "step": s}``."""
    cfg = load_config(None, overrides)
    job = join("cpu")
    trainer = Trainer(cfg, job, fresh=fresh)
    if signal_rank is not None and job.rank in (signal_rank, job.rank if signal_rank == -1 else None):
        loss = trainer.task.loss

        def loss_with_signal(model, batch):
            if trainer.step == signal_step:
                os.kill(os.getpid(), signum)
            return loss(model, batch)

        trainer.task.loss = loss_with_signal
    try:
        return trainer.run()
    except Stopped as stop:
        return {"stopped": str(stop), "signum": stop.signum, "step": trainer.step}
