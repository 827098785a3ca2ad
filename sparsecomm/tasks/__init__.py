"""Benchmark tasks by name: image classification, language modelling, recommendation and
convex logistic regression."""
from __future__ import annotations

from ..config import RunConfig
from ..launch.job import Job
from .base import Task

__all__ = ["Task", "register_task", "available_tasks", "task_class", "models_by_task", "build_task"]

_TASKS: dict[str, type[Task]] = {}


def register_task(cls: type[Task]) -> type[Task]:
    for name in cls.names:
        if name in _TASKS and _TASKS[name] is not cls:
            raise ValueError(f"task name {name!r} is already registered by {_TASKS[name].__name__}")
        _TASKS[name] = cls
    return cls


def available_tasks() -> list[str]:
    return sorted(_TASKS)


def task_class(name: str) -> type[Task]:
    cls = _TASKS.get(name)
    if cls is None:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")
    return cls


def models_by_task() -> dict[str, list[str]]:
    """Every task with the models it can train."""
    return {name: list(cls.models_for(name)) for name, cls in sorted(_TASKS.items())}


def build_task(cfg: RunConfig, job: Job) -> Task:
    return task_class(cfg.task)(cfg, job)


from . import convex, image, language, recommendation  # noqa: E402,F401  (registers the tasks)
