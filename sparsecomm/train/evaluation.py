"""Evaluation during training: when a run evaluates, every result it got, and its best."""
from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import RecordsConfig
from .meter import Moment

__all__ = ["Evaluator"]

log = logging.getLogger(__name__)


class Evaluator:
    """Evaluates the task's model (a collective: every rank scores its part) at the end of
    every ``eval_every``-th epoch, every ``eval_every_steps`` steps, at the run's last step,
    and when the run stops early: always at ``max_steps``, at a signal when
    ``records.eval_on_stop`` asks for it. Keeps every result and the best of the task's
    headline metric."""

    def __init__(self, task: Any, records: RecordsConfig, is_main: bool) -> None:
        self.task = task
        self.records = records
        self.is_main = is_main
        self.results: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None

    def should_evaluate(self, at: Moment) -> bool:
        r = self.records
        if at.last or (at.stop is not None and (at.signal is None or r.eval_on_stop)):
            return True
        if at.epoch_end and at.epochs_done % max(r.eval_every, 1) == 0:
            return True
        return bool(r.eval_every_steps) and at.step % r.eval_every_steps == 0

    def evaluate(self, model: torch.nn.Module, at: Moment, elapsed: float, bytes_sent: float) -> list[dict[str, Any]]:
        """Score the model; the result lines (one per split), as ``metrics.jsonl`` has them."""
        model.eval()
        with torch.no_grad():
            results = self.task.evaluate(model)
        epoch = at.epochs_done if at.epoch_end else at.epoch
        lines = [{"step": at.step, "epoch": epoch, **result, "time": elapsed, "bytes_sent": bytes_sent}
                 for result in results]
        for line in lines:
            self.results.append(line)
            if line.get("split") == self.task.metric_split and self.task.metric in line:
                value = line[self.task.metric]
                better = self.best is None or (value > self.best["value"] if self.task.higher_is_better
                                               else value < self.best["value"])
                if better:
                    self.best = {"value": value, "epoch": epoch, "step": at.step, "time": elapsed}
        if self.is_main and results:
            log.info("epoch %s: %s", f"{epoch:.4g}", "; ".join(_said(r) for r in results))
        return lines

    def evaluated_at(self, step: int) -> bool:
        return any(line["step"] == step for line in self.results)

    def final(self) -> dict[str, dict[str, Any]]:
        """The last result of each split."""
        return {line["split"]: {k: v for k, v in line.items() if k != "split"} for line in self.results}

    def state(self) -> dict[str, Any]:
        return {"best": self.best, "evaluations": self.results}

    def load_state(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self.results = list(state["evaluations"])


def _said(result: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items())
