"""The task interface: a model, its data shard, its loss and its evaluation."""
from __future__ import annotations

import abc
import copy
import dataclasses
from typing import Any, Callable, ClassVar, Iterator, TypeVar

import torch
from torch import nn

from ..models import available_models, check_model_options
from ..config import RunConfig
from ..launch.job import Job

__all__ = ["Task", "load_on_main_first"]


class Task(abc.ABC):
    """One benchmark as the training loop sees it.

    Every rank builds the same task; ``batches`` yields this rank's own, disjoint part of the
    training data, and every rank gets the same number of batches per epoch (collectives need
    it). ``evaluate`` is a collective: each rank scores its own part of the evaluation data,
    the sums are added over ranks, and every rank returns the same numbers.
    """

    names: ClassVar[tuple[str, ...]] = ()
    models: ClassVar[tuple[str, ...]] = ()      # the models this task can train
    option_names: ClassVar[tuple[str, ...]] = ()  # the keys of task_options it takes
    required_options: ClassVar[tuple[str, ...]] = ()
    metric: ClassVar[str] = "accuracy"          # the headline metric, for summary.json's "best"
    higher_is_better: ClassVar[bool] = True
    metric_split: ClassVar[str] = "test"

    def __init__(self, cfg: RunConfig, job: Job) -> None:
        self.check(cfg)
        self.cfg = cfg
        self.job = job
        self.device = job.device

    @classmethod
    def models_for(cls, task: str) -> tuple[str, ...]:
        """The models that can train on ``task`` (one of :attr:`names`)."""
        return cls.models

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Raise ``ValueError`` naming the bad value and the allowed ones when ``cfg`` does not
        fit this task (model, task options); cheap, reads no data."""
        if cfg.model not in available_models():
            raise ValueError(f"unknown model {cfg.model!r}; available: {', '.join(available_models())}")
        check_model_options(cfg.model, cfg.model_options)
        models = cls.models_for(cfg.task)
        if cfg.model not in models:
            raise ValueError(f"model {cfg.model!r} does not fit task {cfg.task!r}; models for {cfg.task}: "
                             f"{', '.join(models)}")
        unknown = sorted(set(cfg.task_options) - set(cls.option_names))
        if unknown:
            raise ValueError(f"unknown task option(s) {', '.join(map(repr, unknown))} for task {cfg.task!r}; "
                             f"allowed: {', '.join(cls.option_names) or 'none'}")
        missing = [k for k in cls.required_options if not cfg.task_options.get(k)]
        if missing:
            raise ValueError(f"task {cfg.task!r} needs task_options.{missing[0]} (--set task_options.{missing[0]}=...)")

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The model, built from ``cfg.model`` and ``cfg.model_options`` plus what the data
        dictates (class count, vocabulary size, user and item counts)."""

    @abc.abstractmethod
    def steps_per_epoch(self) -> int:
        """Training batches per epoch, the same on every rank."""

    @abc.abstractmethod
    def batches(self, epoch: int, start: int) -> Iterator[Any]:
        """This rank's training batches of ``epoch``, from batch ``start`` on (for resuming)."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Forward pass and the scalar training loss of one batch."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> list[dict[str, Any]]:
        """Evaluation records, one per split: ``{"split": "test", "accuracy": ...}``."""

    @classmethod
    def synthetic_step(cls, cfg: RunConfig, batch_size: int) -> tuple[int, Callable[[], None]] | None:
        """Without reading any data: the training examples of ``cfg.task`` as published, and a
        function that runs one forward and backward of ``cfg.model`` on a random batch of this
        task's shape (to price a run before its data is prepared); None where either is unknown."""
        return None

    def train_examples(self) -> int | None:
        """Training examples in the data set (tokens for a language model); None if unknown."""
        return None

    def place(self) -> None:
        """Derive what depends on this worker's rank and the world size (batch size, shard,
        per-worker state) from ``self.job``; called by the constructor and by :meth:`worker`."""

    def worker(self, rank: int, world: int) -> "Task":
        """This task as logical worker ``rank`` of ``world`` simulated in this process (virtual
        workers): a shallow copy sharing the loaded data, with its own shard, batch size and
        per-worker state. Its ``evaluate`` would cover only its share: evaluate on ``self``."""
        view = copy.copy(self)
        view.job = dataclasses.replace(self.job, rank=rank, world=world)
        view.place()
        return view

    def begin_epoch(self, epoch: int) -> None:
        """Called before the first batch of every epoch (also when resuming mid-epoch)."""

    def state_dict(self) -> dict[str, Any]:
        """Task state a mid-epoch resume needs (e.g. a language model's hidden state)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def option(self, key: str, default: Any) -> Any:
        """A ``task_options`` value (unknown keys are refused by :meth:`check`)."""
        return self.cfg.task_options.get(key, default)


T = TypeVar("T")


def load_on_main_first(job: Job, load: Callable[[], T]) -> T:
    """Run ``load`` on rank 0 first, then on the other ranks: data that is decoded or
    preprocessed once and cached is then built by one process and read by the others. If
    rank 0 fails, every rank raises (instead of the others waiting forever)."""
    value: Any = None
    error: BaseException | None = None
    if job.is_main:
        try:
            value = load()
        except Exception as exc:  # re-raised below, after telling the other ranks
            error = exc
    failed = job.any(error is not None)  # a collective: the other ranks wait here for rank 0
    if error is not None:
        raise error
    if failed:
        raise RuntimeError("rank 0 failed to load the data (see its log)")
    return value if job.is_main else load()
