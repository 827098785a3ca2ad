"""Image classification: CIFAR-10/100 with the CIFAR networks, MNIST / Fashion-MNIST with the
small CNN."""
from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageDataset, eval_range, load_images, shard_indices
from ..models import build_model
from . import register_task
from .base import Task, load_on_main_first


@register_task
class ImageClassification(Task):
    """Top-1 (and top-5) accuracy on the test split; cross-entropy training on disjoint,
    reshuffled shards with the published augmentation (a deterministic function of seed,
    epoch and example, so resuming mid-epoch sees the same images)."""

    names = ("cifar10", "cifar100", "mnist", "fashion-mnist")
    metric = "accuracy"
    CIFAR_MODELS = ("resnet18", "resnet20", "resnet152", "vgg16", "vgg19", "senet18", "googlenet")

    # Training images, image shape and classes, as published.
    PUBLISHED = {"cifar10": (50_000, (3, 32, 32), 10), "cifar100": (50_000, (3, 32, 32), 100),
                 "mnist": (60_000, (1, 28, 28), 10), "fashion-mnist": (60_000, (1, 28, 28), 10)}

    @classmethod
    def models_for(cls, task: str) -> tuple[str, ...]:
        return cls.CIFAR_MODELS if task.startswith("cifar") else ("mnist_cnn",)

    @classmethod
    def synthetic_step(cls, cfg, batch_size: int):
        examples, shape, classes = cls.PUBLISHED[cfg.task]
        model = build_model(cfg.model, **{"num_classes": classes, **cfg.model_options})
        x, y = torch.randn(batch_size, *shape), torch.randint(classes, (batch_size,))

        def step() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        return examples, step

    def __init__(self, cfg, job) -> None:
        super().__init__(cfg, job)
        name, data = cfg.task, cfg.data
        train, test = load_on_main_first(job, lambda: (
            load_images(data.dir, name, "train", cache_dir=data.cache_dir, progress=job.is_main),
            load_images(data.dir, name, "test", cache_dir=data.cache_dir, progress=job.is_main)))
        self.classes = train.classes
        self.train = ImageDataset(train, train=True, seed=cfg.seed, device=job.device)
        self.test = ImageDataset(test, train=False, device=job.device)
        self.place()

    def train_examples(self) -> int:
        return len(self.train)

    def place(self) -> None:
        self.batch_size = self.cfg.batch_per_worker(self.job.world)

    def build_model(self) -> nn.Module:
        options = {"num_classes": len(self.classes), **self.cfg.model_options}
        return build_model(self.cfg.model, **options)

    def steps_per_epoch(self) -> int:
        return (len(self.train) // self.job.world) // self.batch_size

    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        self.train.set_epoch(epoch)
        shard = shard_indices(len(self.train), self.job.rank, self.job.world, epoch, self.cfg.seed)
        bs = self.batch_size
        for b in range(start, self.steps_per_epoch()):
            x, y = self.train.batch(shard[b * bs:(b + 1) * bs])
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    def evaluate(self, model: nn.Module) -> list[dict[str, Any]]:
        start, end = eval_range(len(self.test), self.job.rank, self.job.world)
        correct = top5 = loss = 0.0
        k = min(5, len(self.classes))
        for a in range(start, end, self.cfg.data.eval_batch_size):
            x, y = self.test.batch(torch.arange(a, min(a + self.cfg.data.eval_batch_size, end)))
            x, y = x.to(self.device), y.to(self.device)
            logits = model(x)
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            best = logits.topk(k, dim=1).indices
            correct += float((best[:, 0] == y).sum())
            top5 += float((best == y[:, None]).any(dim=1).sum())
        correct, top5, loss, n = self.job.sum([correct, top5, loss, float(end - start)])
        return [{"split": "test", "accuracy": correct / n, "top5": top5 / n, "loss": loss / n}]
