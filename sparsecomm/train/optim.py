"""Optimizers and the learning-rate schedule of the published set-ups."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..config import OptimizerConfig, ScheduleConfig

__all__ = ["build_optimizer", "peak_lr", "LearningRate"]


def _no_decay(name: str, param: nn.Parameter, module: nn.Module) -> bool:
    return param.ndim <= 1  # biases and normalisation weights/biases


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, lr: float) -> torch.optim.Optimizer:
    """SGD (optionally Nesterov) or Adam over the model's parameters. With
    ``decay_norm_and_bias=False``, 1-D parameters (biases, BatchNorm/LayerNorm weights) get no
    weight decay, as in the CIFAR set-ups."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.weight_decay and not cfg.decay_norm_and_bias:
        decay = [p for n, p in params if not _no_decay(n, p, model)]
        rest = [p for n, p in params if _no_decay(n, p, model)]
        groups: Iterable = [{"params": decay, "weight_decay": cfg.weight_decay},
                            {"params": rest, "weight_decay": 0.0}]
    else:
        groups = [{"params": [p for _, p in params], "weight_decay": cfg.weight_decay}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    raise ValueError(f"unknown optimizer {cfg.name!r}; allowed: sgd, adam")


def peak_lr(cfg: OptimizerConfig, batch_size: int, workers: int) -> float:
    """The base lr scaled by ``batch_size / reference_batch`` and, if asked, by the worker count
    (Goyal et al. 2017's linear scaling rule)."""
    lr = cfg.lr
    if cfg.reference_batch:
        lr *= batch_size / cfg.reference_batch
    if cfg.scale_with_workers:
        lr *= workers
    return lr


class LearningRate:
    """lr at a fractional epoch: a linear warm-up from ``warmup_from`` to the peak over
    ``warmup_epochs``, then either the peak multiplied by ``gamma`` at every milestone passed
    (``decay="step"``) or a cosine from the peak to 0 at ``epochs`` (``decay="cosine"``).

    A warm-up never starts above its peak. The published CIFAR set-ups warm up from 0.1 to
    0.1 x (batch/128) x P, which is a warm-up for their 4 to 16 workers; with fewer workers or
    smaller batches the peak falls under 0.1 and the schedule would start high and descend (at
    2 workers of 32 images: from 0.1 to 0.05, which drives ResNet-18's loss from 2.3 to 10 in
    its first steps). There the warm-up starts from the lr of one worker's batch, ``peak /
    workers`` (Goyal et al. 2017's gradual warm-up); :attr:`lowered_start` says so."""

    def __init__(self, peak: float, base: float, cfg: ScheduleConfig, epochs: float = 0.0,
                 workers: int = 1) -> None:
        self.peak = peak
        start = base if cfg.warmup_from is None else cfg.warmup_from
        self.lowered_start = cfg.warmup_epochs > 0 and start > peak
        self.start = peak / max(workers, 1) if self.lowered_start else start
        self.epochs = epochs
        self.cfg = cfg
        if cfg.decay == "cosine" and not epochs > cfg.warmup_epochs:
            raise ValueError(f"a cosine schedule needs more epochs ({epochs:g}) than warm-up epochs "
                             f"({cfg.warmup_epochs:g})")

    def __call__(self, epoch: float) -> float:
        cfg = self.cfg
        if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
            return self.start + (self.peak - self.start) * epoch / cfg.warmup_epochs
        if cfg.decay == "cosine":
            done = min((epoch - cfg.warmup_epochs) / (self.epochs - cfg.warmup_epochs), 1.0)
            return self.peak * 0.5 * (1.0 + math.cos(math.pi * done))
        lr = self.peak
        for m in cfg.milestones:
            if epoch >= m:
                lr *= cfg.gamma
        return lr
