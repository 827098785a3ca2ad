"""Recommendation: NeuMF on MovieLens with the standard leave-latest-out protocol."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import eval_range, hit_rate_ndcg, load_ncf, shard_indices, training_negatives
from ..models import build_model
from . import register_task
from .base import Task, load_on_main_first

RATINGS = {"ml-100k": "ml-100k/u.data", "ml-1m": "ml-1m/ratings.dat", "ml-20m": "ml-20m/ratings.csv"}


@register_task
class Recommendation(Task):
    """HR@10 and NDCG@10 of each user's held-out latest item against ``test_negatives``
    sampled items; binary cross-entropy training on every positive and ``negatives`` fresh
    negatives per positive each epoch (seeded by seed and epoch), shuffled into disjoint
    shards. Options: ``negatives`` (4), ``test_negatives`` (100), ``min_ratings`` (20),
    ``top_k`` (10)."""

    names = tuple(RATINGS)
    models = ("neumf",)
    option_names = ("negatives", "test_negatives", "min_ratings", "top_k")
    metric = "hr@10"

    def __init__(self, cfg, job) -> None:
        super().__init__(cfg, job)
        self.negatives = int(self.option("negatives", 4))
        self.top_k = int(self.option("top_k", 10))
        path = Path(cfg.data.dir) / RATINGS[cfg.task]
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; "
                                    f"run `./prepare_dataset.sh --data-dir {cfg.data.dir} {cfg.task}`")
        self.data = load_on_main_first(job, lambda: load_ncf(
            path, min_ratings=int(self.option("min_ratings", 20)),
            test_negatives=int(self.option("test_negatives", 100)), seed=cfg.seed))
        self.examples = len(self.data.train_users) * (1 + self.negatives)
        self._negatives: dict[int, tuple[np.ndarray, ...]] = {}  # shared by worker views: one epoch's examples
        self.metric = f"hr@{self.top_k}"
        self.place()

    def train_examples(self) -> int:
        return self.examples

    def place(self) -> None:
        self.batch_size = self.cfg.batch_per_worker(self.job.world)
        self._epoch: int | None = None
        self._arrays: tuple[torch.Tensor, ...] = ()

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.model, num_users=self.data.num_users, num_items=self.data.num_items,
                           **self.cfg.model_options)

    def steps_per_epoch(self) -> int:
        return (self.examples // self.job.world) // self.batch_size

    def _epoch_examples(self, epoch: int) -> tuple[torch.Tensor, ...]:
        if self._epoch != epoch:
            if epoch not in self._negatives:
                self._negatives.clear()
                self._negatives[epoch] = training_negatives(self.data.train_users, self.data.train_items,
                                                            self.data.num_items, self.negatives, self.cfg.seed, epoch)
            users, items, labels = self._negatives[epoch]
            shard = shard_indices(self.examples, self.job.rank, self.job.world, epoch, self.cfg.seed).numpy()
            self._arrays = tuple(torch.from_numpy(np.ascontiguousarray(a[shard])).to(self.device)
                                 for a in (users, items, labels))
            self._epoch = epoch
        return self._arrays

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        users, items, labels = self._epoch_examples(epoch)
        bs = self.batch_size
        for b in range(start, self.steps_per_epoch()):
            yield users[b * bs:(b + 1) * bs], items[b * bs:(b + 1) * bs], labels[b * bs:(b + 1) * bs]

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        users, items, labels = batch
        return F.binary_cross_entropy_with_logits(model(users, items), labels)

    def evaluate(self, model: nn.Module) -> list[dict[str, Any]]:
        d = self.data
        start, end = eval_range(d.num_users, self.job.rank, self.job.world)
        hits = ndcg = 0.0
        step = max(1, self.cfg.data.eval_batch_size)
        for a in range(start, end, step):
            users = np.arange(a, min(a + step, end))  # row u of the test arrays is user u
            candidates = np.concatenate([d.test_items[users, None], d.test_negatives[users]], axis=1)
            u = torch.from_numpy(np.repeat(users, candidates.shape[1])).to(self.device)
            i = torch.from_numpy(candidates.reshape(-1)).to(self.device)
            h, n = hit_rate_ndcg(model(u, i).view(len(users), -1), k=self.top_k)
            hits += float(h.double().sum())
            ndcg += float(n.double().sum())
        hits, ndcg, count = self.job.sum([hits, ndcg, float(end - start)])
        return [{"split": "test", f"hr@{self.top_k}": hits / count, f"ndcg@{self.top_k}": ndcg / count}]
