"""Reading run directories (``config.yaml``, ``metrics.jsonl``, ``summary.json``), finished or
not: a run still in progress or interrupted has no ``summary.json`` and may end with a line
cut short; what is missing is listed in :attr:`Run.problems` instead of raised."""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..train.meter import TIME_PARTS

__all__ = ["Run", "Headline", "distinct_names", "load_run", "find_runs", "is_run", "task_headline", "NotARunError",
           "TIME_PARTS", "STATUSES"]

log = logging.getLogger(__name__)


# Run.status values: summary.json written with complete=true; written with complete=false;
# no (current) summary.json: running, or stopped before the end without one; no metrics lines yet.
STATUSES = ("complete", "incomplete", "in progress", "empty")

# Folders inside a run that never hold runs (not searched by find_runs).
_NOT_RUNS = ("checkpoints", "tensorboard")


class NotARunError(ValueError):
    """A path that is neither a run directory nor a folder holding run directories."""


@dataclass(frozen=True)
class Headline:
    """The task's headline metric: its name, the evaluation split it is read from, its direction."""

    metric: str
    split: str
    higher_is_better: bool


@dataclass
class Run:
    """One run directory as read: settings, training lines, evaluation lines, summary (None
    when absent or older than the metrics), and the problems met while reading."""

    path: Path
    config: dict[str, Any]
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    summary: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)

    # ------------------------------------------------------------------ settings
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def task(self) -> str:
        return str(self.config.get("task") or (self.summary or {}).get("task") or "unknown")

    @property
    def model(self) -> str:
        return str(self.config.get("model") or (self.summary or {}).get("model") or "unknown")

    @property
    def reducer(self) -> dict[str, Any]:
        """The ``reducer`` section: name, density, error_feedback, options."""
        section = dict(self.config.get("reducer") or {})
        if "name" not in section and self.summary:
            section["name"] = self.summary.get("reducer")
            section["density"] = self.summary.get("target_density")
        return section

    @property
    def method(self) -> str:
        return str(self.reducer.get("name") or "unknown")

    @property
    def target_density(self) -> float | None:
        """The configured density; None for the dense ``exact`` method, which has none."""
        density = self.reducer.get("density")
        return None if self.method == "exact" or density is None else float(density)

    @property
    def workers(self) -> int | None:
        world = (self.config.get("environment") or {}).get("world_size")
        if world is None and self.summary:
            world = self.summary.get("workers")
        return None if world is None else int(world)

    # ------------------------------------------------------------------ progress
    @property
    def status(self) -> str:
        """One of :data:`STATUSES`."""
        if self.summary is not None:
            return "complete" if self.summary.get("complete") else "incomplete"
        return "in progress" if self.train or self.evals else "empty"

    @property
    def steps_done(self) -> int:
        if self.summary is not None and "steps" in self.summary:
            return int(self.summary["steps"])
        return max((int(r.get("step", 0)) for r in self.train + self.evals), default=0)

    @property
    def steps_per_epoch(self) -> int | None:
        for record in self.train + self.evals:
            step, epoch = record.get("step"), record.get("epoch")
            if step and epoch:
                return max(round(step / epoch), 1)
        if self.summary and self.summary.get("steps") and self.summary.get("epochs"):
            return max(round(self.summary["steps"] / self.summary["epochs"]), 1)
        return None

    @property
    def total_steps(self) -> int | None:
        """Steps the configured epochs take: the summary's, else from the epoch length the lines
        tell (None when none does yet)."""
        if self.summary is not None and self.summary.get("total_steps") is not None:
            return int(self.summary["total_steps"])
        per_epoch, epochs = self.steps_per_epoch, self.config.get("epochs")
        if per_epoch is None or epochs is None:
            return None
        return math.ceil(float(epochs) * per_epoch)

    @property
    def wall_time(self) -> float | None:
        if self.summary is not None and self.summary.get("wall_time") is not None:
            return float(self.summary["wall_time"])
        times = [r["time"] for r in self.train + self.evals if isinstance(r.get("time"), (int, float))]
        return max(times) if times else None

    # ------------------------------------------------------------------ measurements
    def mean(self, key: str) -> float | None:
        """Mean over the training lines of one per-step measurement (None without any)."""
        values = [float(r[key]) for r in self.train if isinstance(r.get(key), (int, float))]
        return sum(values) / len(values) if values else None

    @property
    def density(self) -> float | None:
        """Achieved density: the summary's mean over every step, else the training lines' mean."""
        if self.summary is not None and self.summary.get("mean_density") is not None:
            return float(self.summary["mean_density"])
        return self.mean("density")

    def bytes_per_step(self, kind: str = "sent") -> float | None:
        """Mean bytes per worker per step, ``kind`` ``sent`` or ``wire``."""
        if kind not in ("sent", "wire"):
            raise ValueError(f"bytes kind {kind!r}: expected 'sent' or 'wire'")
        s = self.summary
        if s is not None and s.get("steps") and s.get(f"total_bytes_{kind}") is not None:
            return float(s[f"total_bytes_{kind}"]) / s["steps"]
        return self.mean(f"bytes_{kind}")

    def series(self, metric: str, split: str, x: str = "epoch") -> list[tuple[float, float]]:
        """(x, value) of one metric over the evaluation lines of one split, in order."""
        return [(float(r[x]), float(r[metric])) for r in self.evals
                if r.get("split") == split and isinstance(r.get(metric), (int, float))
                and isinstance(r.get(x), (int, float))]

    def final_and_best(self, head: Headline) -> tuple[float | None, float | None]:
        """The last and the best value of the headline metric so far."""
        values = [v for _, v in self.series(head.metric, head.split, "step")]
        if not values:
            return None, None
        return values[-1], (max if head.higher_is_better else min)(values)

    def headline(self) -> Headline | None:
        """The headline metric as the summary names it (the split: the one its best came
        from); None without a current summary."""
        s = self.summary
        if not s or not s.get("metric"):
            return None
        higher = bool(s.get("higher_is_better", True))
        best = s.get("best") or {}
        splits = [r["split"] for r in self.evals if r.get("step") == best.get("step")
                  and r.get(s["metric"]) == best.get("value") and "split" in r]
        if not splits:
            splits = [r["split"] for r in self.evals if s["metric"] in r and "split" in r]
        return Headline(s["metric"], splits[0] if splits else "test", higher)


def task_headline(runs: Iterable[Run]) -> Headline | None:
    """The headline metric of runs of one task: from any current summary, else from the
    task's class (imports the task registry, hence torch), else the first metric found."""
    runs = list(runs)
    for run in runs:
        head = run.headline()
        if head is not None:
            return head
    evals = [r for run in runs for r in run.evals]
    if not evals:
        return None
    keys = {k for r in evals for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    try:
        from ..tasks import task_class

        cls = task_class(runs[0].task)
        metric, split, higher = cls.metric, cls.metric_split, cls.higher_is_better
    except (ImportError, ValueError):  # a task this version does not know
        metric, split, higher = None, None, True
    if metric is not None and metric not in keys:  # an instance-level name such as hr@5 for top_k=5
        metric = next((k for k in sorted(keys) if k.split("@")[0] == metric.split("@")[0]), None)
    if metric is None:
        metric = next(k for r in evals for k in r
                      if k not in ("step", "epoch", "time", "bytes_sent", "split") and k in keys)
    splits = [r["split"] for r in evals if metric in r and "split" in r]
    if split not in splits:
        split = splits[0] if splits else "test"
    return Headline(metric, split, higher)


# ---------------------------------------------------------------------- reading
def distinct_names(runs: list[Run]) -> list[str]:
    """Each run's directory name, or, where runs share it (the same settings in two output
    folders), the shortest end of its path that tells it apart (``sweep-a/mnist-...``)."""
    parts = [run.path.resolve().parts for run in runs]
    depth = [1] * len(runs)
    while True:
        names = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        alike = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in alike and depth[i] < len(parts[i])]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


def is_run(path: Path) -> bool:
    """A run directory: one the trainer has written ``config.yaml`` or ``metrics.jsonl`` into."""
    path = Path(path)
    return path.is_dir() and ((path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file())


def load_run(path: Path) -> Run:
    """Read one run directory, tolerating one in progress or interrupted."""
    path = Path(path)
    if not is_run(path):
        raise NotARunError(f"{path} is not a run directory (no config.yaml or metrics.jsonl)")
    problems: list[str] = []
    config = _read_yaml(path / "config.yaml", problems)
    train, evals = _read_metrics(path / "metrics.jsonl", problems)
    summary = _read_summary(path / "summary.json", problems)
    if summary is not None:
        last = max((int(r.get("step", 0)) for r in train + evals), default=0)
        if last > int(summary.get("steps", last)):
            problems.append(f"summary.json is from step {summary.get('steps')} but metrics.jsonl goes on to "
                            f"step {last} (resumed, in progress)")
            summary = None
    if not train and not evals:
        problems.append("no metrics lines yet")
    return Run(path, config, train, evals, summary, problems)


def find_runs(paths: Iterable[Path]) -> list[Path]:
    """The run directories among ``paths``: each run as given, a folder holding runs (at any
    depth) expanded to them in name order; anything else logged as a warning and skipped.
    Each run once, in the order first met."""
    found: dict[Path, Path] = {}
    for path in map(Path, paths):
        if is_run(path):
            runs = [path]
        elif path.is_dir():
            runs = sorted(_runs_below(path))
            if not runs:
                log.warning("%s: not a run directory and holds none (no config.yaml or metrics.jsonl); skipped",
                            path)
        else:
            log.warning("%s: %s; skipped", path, "not a directory" if path.exists() else "no such directory")
            runs = []
        for run in runs:
            found.setdefault(run.resolve(), run)
    return list(found.values())


def _runs_below(root: Path) -> list[Path]:
    runs = []
    for folder, subdirs, _ in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _NOT_RUNS]
        here = Path(folder)
        if here != root and is_run(here):
            runs.append(here)
            subdirs[:] = []  # a run's own folders hold no runs
    return runs


def _read_yaml(path: Path, problems: list[str]) -> dict[str, Any]:
    if not path.is_file():
        problems.append("no config.yaml")
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        problems.append(f"config.yaml unreadable ({exc.__class__.__name__})")
        return {}
    return data if isinstance(data, dict) else {}


def _read_metrics(path: Path, problems: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    if not path.is_file():
        problems.append("no metrics.jsonl")
        return train, evals
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    bad = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad.append(number)
            continue
        if isinstance(record, dict):
            (evals if "split" in record else train).append(record)
        else:
            bad.append(number)
    if bad and bad[-1] == len(lines) and not text.endswith("\n"):
        problems.append("the last line of metrics.jsonl is cut short")
        bad.pop()
    if bad:
        problems.append(f"metrics.jsonl line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} unreadable")
    return train, evals


def _read_summary(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        problems.append("no summary.json (in progress or interrupted)")
        return None
    try:
        summary = json.loads(path.read_text())
    except ValueError:
        problems.append("summary.json unreadable (cut short?)")
        return None
    return summary if isinstance(summary, dict) else None
