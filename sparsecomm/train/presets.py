"""Presets: one YAML file per published set-up, in the benchmark folders ``cnn-lstm/presets``
and ``ncf/presets``; found by name, listed with their descriptions, and chosen from a task
and a model when no preset is named."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from ..config import ConfigError

__all__ = ["preset_dirs", "available_presets", "find_preset", "Preset", "preset_info", "choose_preset",
           "DEFAULT_PRESET", "TASK_DEFAULTS"]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]

# The job run.sh runs when nothing is chosen.
DEFAULT_PRESET = "resnet18-cifar10"

# The preset whose recipe a task gets when only the task (or a model without a preset of its
# own on that task) is named.
TASK_DEFAULTS = {
    "cifar10": "resnet18-cifar10", "cifar100": "resnet18-cifar100", "mnist": "mnist-cnn",
    "fashion-mnist": "fashion-mnist-cnn", "ptb": "lstm-ptb", "wikitext2": "lstm-wikitext2",
    "ml-100k": "ncf-ml100k", "ml-1m": "ncf-ml1m", "ml-20m": "ncf-ml20m", "logreg": "logreg",
}


def preset_dirs() -> list[Path]:
    """Folders searched for presets given by name: the benchmark folders of the repository."""
    return [REPO / "cnn-lstm" / "presets", REPO / "ncf" / "presets"]


def available_presets() -> list[str]:
    return sorted(p.stem for d in preset_dirs() if d.is_dir() for p in d.glob("*.yaml"))


def find_preset(name: str) -> Path:
    """A preset file: a path, or a name (with or without .yaml) from the benchmark folders."""
    path = Path(name)
    if path.is_file():
        return path
    for folder in preset_dirs():
        for candidate in (folder / name, folder / f"{name}.yaml"):
            if candidate.is_file():
                return candidate
    raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available_presets()) or 'none'} "
                      f"(--list-presets describes them)")


@dataclass(frozen=True)
class Preset:
    name: str
    task: str
    model: str
    description: str


@lru_cache(maxsize=None)
def _read(path: Path) -> Preset:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"preset {str(path)!r} cannot be read: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {str(path)!r} must hold a mapping of settings")
    return Preset(path.stem, str(data.get("task", "")), str(data.get("model", "")),
                  str(data.get("description", "")))


def preset_info(name: str) -> Preset:
    return _read(find_preset(name))


def choose_preset(task: str | None, model: str | None, fits: dict[str, list[str]]) -> tuple[str, str]:
    """The preset to use when none is named but a task and/or a model is: ``(name, why)``.

    ``fits`` maps each task to the models it can train. A preset of exactly that task and
    model wins (the task's default preset first when several match); a model without a preset
    on that task gets the task's default recipe with the model replaced; a model named alone
    gets the first preset that uses it. Raises :class:`ConfigError` naming what would fit.
    """
    presets = [preset_info(n) for n in available_presets()]
    if task is not None and task not in fits:
        raise ConfigError(f"unknown task {task!r}; available: {', '.join(sorted(fits))}")
    if task is not None and model is not None and model not in fits[task]:
        raise ConfigError(f"model {model!r} does not fit task {task!r}; models for {task}: "
                          f"{', '.join(fits[task])}")
    matching = [p for p in presets if (task is None or p.task == task) and (model is None or p.model == model)]
    wanted = " and ".join(f"{k} {v}" for k, v in (("task", task), ("model", model)) if v is not None)
    if matching:
        default = TASK_DEFAULTS.get(task or matching[0].task)
        chosen = next((p for p in matching if p.name == default), matching[0])
        others = [p.name for p in matching if p is not chosen]
        why = f"the preset for {wanted}" + (f" (others: {', '.join(others)})" if others else "")
        return chosen.name, why
    if task is not None and model is not None and task in TASK_DEFAULTS:
        return TASK_DEFAULTS[task], f"the {task} recipe with model {model}"
    if model is not None:
        tasks = sorted(t for t, models in fits.items() if model in models)
        if not tasks:
            raise ConfigError(f"no task trains model {model!r}")
        raise ConfigError(f"no preset uses model {model!r}; name its task as well (DATASET/--task: "
                          f"{', '.join(tasks)})")
    raise ConfigError(f"no preset for {wanted}; presets: {', '.join(p.name for p in presets)}")
