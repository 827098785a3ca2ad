"""Word-level language modelling on WikiText-2 and Penn Treebank with the LSTM model."""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Corpus, batchify, eval_range, shard_columns
from ..models import build_model
from . import register_task
from .base import Task, load_on_main_first


@register_task
class LanguageModelling(Task):
    """Perplexity on the validation and test splits (dropout off).

    Training: the token stream is folded into ``batch * P`` columns; worker r takes columns
    r::P (disjoint text streams, the same number of steps everywhere) and walks them in
    windows of ``bptt`` tokens, carrying the LSTM state across windows within an epoch.
    Evaluation: the targets of a split are cut into P contiguous ranges, each folded into
    ``eval_batch_size`` columns (a remainder shorter than that is scored as one more column),
    so every target token is predicted exactly once. Options: ``bptt`` (35).
    """

    names = ("wikitext2", "ptb")
    models = ("lstm_lm",)
    option_names = ("bptt",)
    metric = "perplexity"
    higher_is_better = False

    def __init__(self, cfg, job) -> None:
        super().__init__(cfg, job)
        self.bptt = int(self.option("bptt", 35))
        self.corpus = load_on_main_first(job, lambda: Corpus(cfg.data.dir, cfg.task))
        self._folded: dict[int, torch.Tensor] = {}  # shared by worker views: the stream in batch x P columns
        self.model: nn.Module | None = None
        self.place()

    def train_examples(self) -> int:
        return self.corpus.train.numel()

    def place(self) -> None:
        job = self.job
        self.batch_size = self.cfg.batch_per_worker(job.world)
        columns = self.batch_size * job.world
        if columns not in self._folded:
            self._folded.clear()
            self._folded[columns] = batchify(self.corpus.train, columns)
        self.train = shard_columns(self._folded[columns], job.rank, job.world).to(job.device)
        self.hidden: Any = None

    def build_model(self) -> nn.Module:
        self.model = build_model(self.cfg.model, vocab_size=len(self.corpus.dictionary), **self.cfg.model_options)
        return self.model

    def steps_per_epoch(self) -> int:
        return math.ceil((self.train.shape[0] - 1) / self.bptt)

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        if start == 0:  # a new epoch starts from a zero state; a resumed one keeps the restored state
            self.hidden = None
        for b in range(start, self.steps_per_epoch()):
            i = b * self.bptt
            n = min(self.bptt, self.train.shape[0] - 1 - i)
            yield self.train[i:i + n], self.train[i + 1:i + 1 + n]

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        hidden = model.init_hidden(x.shape[1]) if self.hidden is None else model.detach_hidden(self.hidden)
        logits, self.hidden = model(x, hidden)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def evaluate(self, model: nn.Module) -> list[dict[str, Any]]:
        out = []
        for split in ("valid", "test"):
            tokens = getattr(self.corpus, split)
            if tokens is None:
                continue
            total, count = self._score(model, tokens)
            total, count = self.job.sum([total, count])
            loss = total / count
            out.append({"split": split, "loss": loss, "perplexity": math.exp(min(loss, 700.0))})
        return out

    def _score(self, model: nn.Module, tokens: torch.Tensor) -> tuple[float, float]:
        start, end = eval_range(tokens.numel() - 1, self.job.rank, self.job.world)
        inputs, targets = tokens[start:end], tokens[start + 1:end + 1]
        cols = min(self.cfg.data.eval_batch_size, max(1, inputs.numel()))
        length = inputs.numel() // cols
        pieces = [(inputs[:length * cols].view(cols, length).t(), targets[:length * cols].view(cols, length).t())]
        if inputs.numel() > length * cols:
            pieces.append((inputs[length * cols:, None], targets[length * cols:, None]))
        total = 0.0
        for x, y in pieces:
            x, y = x.to(self.device), y.to(self.device)
            hidden = model.init_hidden(x.shape[1])
            for i in range(0, x.shape[0], self.bptt):
                logits, hidden = model(x[i:i + self.bptt], hidden)
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i:i + self.bptt].reshape(-1),
                                               reduction="sum"))
        return total, float(inputs.numel())

    def state_dict(self) -> dict[str, Any]:
        if self.hidden is None:
            return {"hidden": None}
        return {"hidden": tuple(h.detach().cpu() for h in self.hidden)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        hidden = state.get("hidden")
        self.hidden = None if hidden is None else tuple(h.to(self.device) for h in hidden)
