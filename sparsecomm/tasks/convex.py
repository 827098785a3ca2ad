"""Logistic regression on a LIBSVM-format file: the convex study of sparsifiers with error
feedback (the "rethinking" paper's set-up)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data import eval_range, load_libsvm, shard_indices
from ..models import build_model
from . import register_task
from .base import Task, load_on_main_first


@register_task
class LogisticRegressionTask(Task):
    """Regularised logistic loss ``mean loss + l2/2 ||w||^2`` on the training file (the
    objective reported as ``loss``), accuracy on the training file and, if given, a test file.
    Options: ``path`` (LIBSVM file, relative to the data directory unless absolute),
    ``test_path``, ``l2`` (0)."""

    names = ("logreg",)
    models = ("logreg",)
    option_names = ("path", "test_path", "l2")
    required_options = ("path",)
    metric = "loss"
    higher_is_better = False
    metric_split = "train"

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.parallel == "fsdp" and cfg.task_options.get("l2"):
            raise ValueError("task logreg's l2 penalty reads the parameters outside forward, which FSDP shards (its "
                             "gradient would skip the method): set task_options.l2=0 or parallel=replicated")

    def __init__(self, cfg, job) -> None:
        super().__init__(cfg, job)
        self.l2 = float(self.option("l2", 0.0))
        train_path = self._resolve(self.option("path", None))
        test_path = self.option("test_path", None)
        self.X, self.y = load_on_main_first(job, lambda: load_libsvm(train_path))
        self.classes = int(self.y.max()) + 1 if self.y.numel() else 2
        self.test = None
        if test_path:
            self.test = load_libsvm(self._resolve(test_path), num_features=self.X.shape[1])
        self.model: nn.Module | None = None
        self.place()

    def train_examples(self) -> int:
        return len(self.y)

    def place(self) -> None:
        self.batch_size = self.cfg.batch_per_worker(self.job.world)

    def _resolve(self, path: str) -> Path:
        p = Path(path)
        return p if p.is_absolute() else Path(self.cfg.data.dir) / p

    def build_model(self) -> nn.Module:
        self.model = build_model(self.cfg.model, num_features=self.X.shape[1], num_classes=max(2, self.classes),
                                 **self.cfg.model_options)
        return self.model

    def steps_per_epoch(self) -> int:
        return (len(self.y) // self.job.world) // self.batch_size

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        shard = shard_indices(len(self.y), self.job.rank, self.job.world, epoch, self.cfg.seed)
        bs = self.batch_size
        for b in range(start, self.steps_per_epoch()):
            rows = shard[b * bs:(b + 1) * bs]
            yield self.X[rows].to(self.device), self.y[rows].to(self.device)

    def _data_loss(self, logits: torch.Tensor, y: torch.Tensor, reduction: str) -> torch.Tensor:
        if logits.ndim == 1:  # binary: one logit per example
            return F.binary_cross_entropy_with_logits(logits, y.to(logits.dtype), reduction=reduction)
        return F.cross_entropy(logits, y, reduction=reduction)

    def _penalty(self, model: nn.Module) -> torch.Tensor:
        weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
        return 0.5 * self.l2 * sum(w.pow(2).sum() for w in weights)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        loss = self._data_loss(model(x), y, "mean")
        return loss + self._penalty(model) if self.l2 else loss

    def evaluate(self, model: nn.Module) -> list[dict[str, Any]]:
        out = []
        for split, (X, y) in (("train", (self.X, self.y)), ("test", self.test)) if self.test else \
                (("train", (self.X, self.y)),):
            start, end = eval_range(len(y), self.job.rank, self.job.world)
            loss = correct = 0.0
            for a in range(start, end, self.cfg.data.eval_batch_size):
                b = min(a + self.cfg.data.eval_batch_size, end)
                x, t = X[a:b].to(self.device), y[a:b].to(self.device)
                logits = model(x)
                loss += float(self._data_loss(logits, t, "sum"))
                pred = (logits > 0).long() if logits.ndim == 1 else logits.argmax(dim=1)
                correct += float((pred == t).sum())
            loss, correct, n = self.job.sum([loss, correct, float(end - start)])
            objective = loss / n + (float(self._penalty(model)) if self.l2 else 0.0)
            out.append({"split": split, "loss": objective, "accuracy": correct / n})
        return out
