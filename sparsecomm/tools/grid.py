"""The grid of a sweep: one preset, reducers x densities x seeds, each point a normal run.sh
job with its own run directory. Lists are parsed and every point's whole configuration checked
before anything runs; a grid is saved to a file that each task of a SLURM job array reads its
point from (``python -m sparsecomm sweep --entry FILE INDEX``).

Importing this module does not import torch; :func:`check` does.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

__all__ = ["GridError", "Point", "Grid", "State", "parse_list", "parse_density", "parse_seed", "build", "check",
           "state", "shell_exports", "DENSE"]

# The method without a density: one run per seed, whatever the densities (as run names and the
# compare table treat it).
DENSE = "exact"

# run.sh's variables that say what to run; the ones a sweep leaves to the preset are set empty so
# that the caller's environment cannot leak into a grid point.
_RUN_VARS = ("PRESET", "MODEL", "DATASET", "REDUCER", "DENSITY", "EPOCHS", "SEED", "EXTRA_ARGS", "DATA_DIR",
             "OUTPUT_DIR")


class GridError(ValueError):
    """A grid that cannot run; the message is one line naming the bad value and the allowed ones."""


# ---------------------------------------------------------------------- the lists
def parse_density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise GridError(f"{text!r} is not a number; densities are numbers in (0, 1], e.g. 0.01,0.001") from None
    if not (0 < value <= 1):
        raise GridError(f"density {text} is outside (0, 1]; densities are numbers in (0, 1], e.g. 0.01,0.001")
    return value


def parse_seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise GridError(f"{text!r} is not an integer; seeds are integers, e.g. 0,1,2") from None


def parse_list(option: str, text: str | None, item: Callable[[str], Any] = str, hint: str = "") -> list[Any]:
    """A comma-separated list, each item parsed by ``item``; duplicates dropped, order kept.
    ``hint`` says what the items may be (it ends the error messages)."""
    hint = hint or "a comma-separated list"
    if text is None or not text.strip():
        raise GridError(f"{option} is empty, so the grid has no point; give {hint}")
    out: list[Any] = []
    for raw in text.split(","):
        raw = raw.strip()
        if not raw:
            raise GridError(f"{option} {text!r} has an empty item; give {hint}")
        try:
            value = item(raw)
        except GridError as exc:
            raise GridError(f"{option}: {exc}") from None
        if value not in out:
            out.append(value)
    return out


# ---------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Point:
    """One run of the grid; ``run_dir`` and ``epochs`` are filled in by :func:`check`."""

    reducer: str
    density: float | None  # None for the dense method
    seed: int
    run_dir: str = ""
    epochs: float = 0.0

    @property
    def label(self) -> str:
        """``exdyna c=0.01 seed 1``, ``exact seed 0``."""
        return f"{self.reducer}{'' if self.density is None else f' c={self.density:g}'} seed {self.seed}"


@dataclass
class Grid:
    """A preset, the trainer settings every point shares, the worker count of each run, and the points."""

    preset: str
    points: list[Point]
    workers: int
    data_dir: str
    output_dir: str
    settings: list[str] = field(default_factory=list)  # --set KEY=VALUE items, in order

    def trainer_args(self, point: Point) -> list[str]:
        """The trainer's command line for ``point`` (what run.sh builds from :meth:`env`)."""
        args = ["--preset", self.preset, "--reducer", point.reducer, "--seed", str(point.seed),
                "--data-dir", self.data_dir, "--output-dir", self.output_dir]
        if point.density is not None:
            args += ["--density", repr(point.density)]
        return args + [f"--set={s}" for s in self.settings]

    def env(self, point: Point) -> dict[str, str]:
        """run.sh's variables for ``point`` (NPROC aside: it depends on who starts run.sh)."""
        values = {"PRESET": self.preset, "REDUCER": point.reducer, "SEED": str(point.seed),
                  "DENSITY": "" if point.density is None else repr(point.density),
                  "EXTRA_ARGS": shlex.join(f"--set={s}" for s in self.settings),
                  "DATA_DIR": self.data_dir, "OUTPUT_DIR": self.output_dir}
        return {name: values.get(name, "") for name in _RUN_VARS}

    @property
    def key(self) -> str:
        """A name for this grid, the same for the same command: ``<preset>-<hash>``."""
        text = json.dumps([self.preset, self.workers, self.data_dir, self.output_dir, self.settings,
                           [(p.reducer, p.density, p.seed) for p in self.points]])
        return f"{Path(self.preset).stem}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Grid":
        try:
            data = json.loads(Path(path).read_text())
            data["points"] = [Point(**p) for p in data["points"]]
            return cls(**data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise GridError(f"cannot read the sweep's grid file {path}: {exc}") from None


def build(preset: str, reducers: list[str], densities: list[float] | None, seeds: list[int], workers: int,
          data_dir: str, output_dir: str, settings: list[str]) -> Grid:
    """The grid in order: reducers, then densities (not for the dense method), then seeds."""
    needs_density = [r for r in reducers if r != DENSE]
    if needs_density and not densities:
        raise GridError(f"--densities is missing: {', '.join(needs_density)} need(s) at least one density in "
                        f"(0, 1] (only {DENSE} ignores density)")
    from ..config import ConfigError
    from ..train.presets import find_preset

    try:
        found = find_preset(preset)
    except ConfigError as exc:
        raise GridError(f"--preset: {exc}") from None
    if Path(preset).is_file():  # run.sh runs in the repository root: a preset file by its absolute path
        preset = str(found.resolve())
    points = [Point(r, d, s) for r in reducers for d in ([None] if r == DENSE else densities or []) for s in seeds]
    return Grid(preset, points, workers, str(Path(data_dir).resolve()), str(Path(output_dir).resolve()),
                list(settings))


def check(grid: Grid) -> Grid:
    """Every point's whole configuration checked as the trainer's ``--check --workers N`` checks
    it, with its run directory and epochs filled in; :class:`GridError` on the first fault."""
    from .. import reducers
    from ..config import ConfigError
    from ..train.checks import check_run
    from ..train.cli import parse_args, resolve_config
    from ..train.records import run_name

    known = reducers.available()
    for name in dict.fromkeys(p.reducer for p in grid.points):
        if name not in known:
            raise GridError(f"--reducers: unknown reducer {name!r}; available: {', '.join(known)}")
    checked, seen = [], {}
    for point in grid.points:
        try:
            cfg = check_run(resolve_config(parse_args(grid.trainer_args(point))), grid.workers)
        except ConfigError as exc:
            raise GridError(f"{point.label}: {exc}") from None
        run_dir = str(Path(cfg.output_dir) / run_name(cfg, grid.workers))
        if run_dir in seen:
            raise GridError(f"{point.label} and {seen[run_dir]} would share the run directory {run_dir}; "
                            f"give densities that differ in their first 6 digits")
        seen[run_dir] = point.label
        checked.append(dataclasses.replace(point, run_dir=run_dir, epochs=float(cfg.epochs)))
    return dataclasses.replace(grid, points=checked)


# ---------------------------------------------------------------------- progress
@dataclass(frozen=True)
class State:
    """Where a point stands: ``finished``, else what running it will do (``action``)."""

    finished: bool
    action: str


def state(point: Point) -> State:
    """Finished: a current summary.json says complete, for at least the configured epochs."""
    from .runs import is_run, load_run

    run_dir = Path(point.run_dir)
    if is_run(run_dir):
        run = load_run(run_dir)
        if run.status == "complete":
            done = float(run.summary.get("epochs") or 0.0)
            if done >= point.epochs - 1e-9:
                return State(True, "complete")
            return State(False, f"complete for {done:g} epochs; continuing to {point.epochs:g}")
    latest = run_dir / "checkpoints" / "latest.json"
    try:
        tag = json.loads(latest.read_text())["tag"]
        return State(False, f"resuming from checkpoint {tag}")
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return State(False, "starting over (no checkpoint; the earlier records are moved aside)")
    return State(False, "starting")


def shell_exports(env: dict[str, str]) -> str:
    """``export NAME=value`` lines, shell-quoted, for ``eval`` in bash."""
    return "".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items())
