"""Run configuration (shared by the trainer and the tasks): typed sections, loaded from a YAML preset and overridden from the
command line (``section.key=value``). Unknown keys are errors that list the allowed ones."""
from __future__ import annotations

import copy
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

__all__ = ["RunConfig", "DataConfig", "OptimizerConfig", "ScheduleConfig", "ReducerConfig", "RecordsConfig",
           "load_config", "apply_overrides", "ConfigError"]


PARALLEL = ("replicated", "fsdp")  # how the model is spread over the ranks (docs/reducers.md, FSDP2)


class ConfigError(ValueError):
    """A preset or override that does not fit the configuration schema."""


@dataclass
class DataConfig:
    dir: str = "data"                 # the data directory (prepare_dataset.sh's layout)
    batch_size: int = 32              # per worker
    global_batch_size: int | None = None  # if set: split across workers (batch_size = this // workers)
    eval_batch_size: int = 256        # per worker, evaluation only
    cache_dir: str | None = None      # where decoded/preprocessed data is cached (default: beside the data)


@dataclass
class OptimizerConfig:
    name: str = "sgd"                 # sgd | adam
    lr: float = 0.1                   # base learning rate, for reference_batch samples on one worker
    reference_batch: int | None = None  # lr is scaled by batch_size / reference_batch (None: no batch scaling)
    scale_with_workers: bool = False  # lr is also multiplied by the worker count
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    decay_norm_and_bias: bool = True  # False: no weight decay on normalisation weights and biases
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass
class ScheduleConfig:
    warmup_epochs: float = 0.0        # linear warm-up length
    warmup_from: float | None = None  # learning rate at the start of warm-up (None: the unscaled base lr)
    decay: str = "step"               # step: x gamma at each milestone | cosine: to 0 at the last epoch
    milestones: list[float] = field(default_factory=list)  # epochs at which lr is multiplied by gamma (decay step)
    gamma: float = 0.1


@dataclass
class ReducerConfig:
    name: str = "exact"
    density: float = 0.001
    error_feedback: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    scope: str = "auto"               # auto | bucket | model: bucket by bucket during backward, or the whole model after it
    bucket_mb: float = 25.0           # bucket scope: buckets of about this many MB, cut from the last layers as DDP does


@dataclass
class RecordsConfig:
    log_every: int = 50               # training lines in metrics.jsonl every this many steps
    eval_every: int = 1               # epochs between evaluations
    eval_every_steps: int = 0         # also evaluate every this many steps (0: by epochs only; accuracy against time)
    eval_on_stop: bool = False        # also evaluate when a signal stops the run early (max_steps always does)
    checkpoint_every: int = 1         # epochs between checkpoints (0: only on signals and at the end)
    progress: bool = True             # a tqdm progress bar on rank 0
    tensorboard: bool = False         # also write TensorBoard event files (needs the tensorboard package)
    profile: bool = False             # synchronise CUDA around phases so the time split is true


@dataclass
class RunConfig:
    task: str = ""                    # cifar10, cifar100, mnist, fashion-mnist, wikitext2, ptb, ml-100k, ml-1m, ml-20m, logreg
    model: str = ""                   # a name from sparsecomm.models
    model_options: dict[str, Any] = field(default_factory=dict)
    task_options: dict[str, Any] = field(default_factory=dict)
    epochs: float = 1
    max_steps: int | None = None      # stop (with a checkpoint) after this many steps in total
    seed: int = 0
    clip_norm: float | None = None    # clip the averaged gradient to this L2 norm
    parallel: str = "replicated"      # replicated: every rank holds the model | fsdp: fully_shard, the method as its reduce-scatter
    device: str = "auto"              # auto | cpu | cuda
    output_dir: str = "runs"
    name: str | None = None           # run directory name (default: derived from the settings)
    description: str = ""
    preset: str | None = None         # the preset these settings started from (set when loading one)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    reducer: ReducerConfig = field(default_factory=ReducerConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def batch_per_worker(self, workers: int) -> int:
        """The per-worker batch: ``data.global_batch_size // workers`` when a global batch is
        set (the NCF set-ups), else ``data.batch_size``."""
        if self.data.global_batch_size is None:
            return self.data.batch_size
        per = self.data.global_batch_size // workers
        if per < 1:
            raise ConfigError(f"data.global_batch_size={self.data.global_batch_size} is smaller than the "
                              f"worker count {workers}")
        return per

    def validate(self) -> "RunConfig":
        problems = []
        if not self.task:
            problems.append("task is not set")
        if not self.model:
            problems.append("model is not set")
        if not (self.epochs > 0 and math.isfinite(self.epochs)):
            problems.append(f"epochs must be > 0, got {self.epochs!r}")
        if self.max_steps is not None and self.max_steps < 1:
            problems.append(f"max_steps must be >= 1, got {self.max_steps!r}")
        for key in ("batch_size", "eval_batch_size"):
            if getattr(self.data, key) < 1:
                problems.append(f"data.{key} must be >= 1, got {getattr(self.data, key)!r}")
        if self.optimizer.name not in ("sgd", "adam"):
            problems.append(f"optimizer.name must be one of ['sgd', 'adam'], got {self.optimizer.name!r}")
        if self.schedule.decay not in ("step", "cosine"):
            problems.append(f"schedule.decay must be one of ['step', 'cosine'], got {self.schedule.decay!r}")
        if self.schedule.decay == "cosine" and self.schedule.milestones:
            problems.append("schedule.milestones are for decay 'step'; a cosine schedule has none")
        if self.parallel not in PARALLEL:
            problems.append(f"parallel must be one of {list(PARALLEL)}, got {self.parallel!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            problems.append(f"device must be one of ['auto', 'cpu', 'cuda'], got {self.device!r}")
        if self.clip_norm is not None and not self.clip_norm > 0:
            problems.append(f"clip_norm must be > 0 or null, got {self.clip_norm!r}")
        if self.records.log_every < 1:
            problems.append(f"records.log_every must be >= 1, got {self.records.log_every!r}")
        if self.records.eval_every_steps < 0:
            problems.append(f"records.eval_every_steps must be >= 0 (0: off), got {self.records.eval_every_steps!r}")
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))
        return self


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the configuration'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown setting {where + key!r}; allowed in {where.rstrip('.') or 'the top level'}: "
                              f"{', '.join(names)}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value or {}, f"{where}{key}.")
        else:
            values[key] = _coerce(value, kind, where + key)
    return cls(**values)


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Check (and gently convert) a value against a simple type hint."""
    text = str(kind)
    if value is None:
        if "None" in text or kind is Any:
            return None
        raise ConfigError(f"{where} may not be null")
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind is int or text == "int | None":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if kind is float or text == "float | None":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if kind is str or text == "str | None":
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if text.startswith("list[float]"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (int, float)) for v in value):
            raise ConfigError(f"{where} must be a list of numbers, got {value!r}")
        return [float(v) for v in value]
    if text.startswith("tuple[float, float]"):
        if not isinstance(value, (list, tuple)) or len(value) != 2:
            raise ConfigError(f"{where} must be a pair of numbers, got {value!r}")
        return (float(value[0]), float(value[1]))
    if text.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    return value


def load_config(preset: str | Path | None = None, overrides: list[str] | None = None,
                preset_name: str | None = None) -> RunConfig:
    """The configuration of a preset file (YAML) with ``section.key=value`` overrides applied;
    ``preset`` in the result is ``preset_name`` (the name it was found by), else the file's path."""
    data: dict[str, Any] = {}
    if preset is not None:
        path = Path(preset)
        if not path.is_file():
            raise ConfigError(f"preset file {str(path)!r} does not exist")
        data = _preset_data(str(path.resolve()), path.stat().st_mtime_ns)
        data["preset"] = preset_name or str(path)
    data = apply_overrides(data, overrides or [])
    return _build(RunConfig, data, "")


def _preset_data(path: str, mtime_ns: int) -> dict[str, Any]:
    """A preset file's settings (a fresh copy; parsed once per version of the file)."""
    return copy.deepcopy(_parsed_preset(path, mtime_ns))


@functools.lru_cache(maxsize=64)
def _parsed_preset(path: str, mtime_ns: int) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"preset {path!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path!r} must hold a mapping of settings")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` assignments (values parsed as YAML) to a nested dict, in order."""
    data = _plain(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data
