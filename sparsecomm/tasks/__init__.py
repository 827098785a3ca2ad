"""Benchmark tasks by name: image classification, language modelling, recommendation and
convex logistic regression."""
from __future__ import annotations

from ..train.config import RunConfig
from ..train.distributed import Job
from .base import Task

__all__ = ["Task", "register_task", "available_tasks", "build_task"]

_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    for name in cls.names:
        if name in _TASKS and _TASKS[name] is not cls:
            raise ValueError(f"task name {name!r} is already registered by {_TASKS[name].__name__}")
        _TASKS[name] = cls
    return cls


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def build_task(cfg: RunConfig, job: Job) -> Task:
    cls = _TASKS.get(cfg.task)
    if cls is None:
        raise ValueError(f"unknown task {cfg.task!r}; available: {', '.join(available_tasks())}")
    return cls(cfg, job)


from . import convex, image, language, recommendation  # noqa: E402,F401  (registers the tasks)
