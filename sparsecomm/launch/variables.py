"""run.sh's variables (what to run) and the trainer options they stand for."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

__all__ = ["Variables", "DEFAULT_PRESET"]

# The preset of a run that names neither a preset, nor a model, nor a data set.
DEFAULT_PRESET = "resnet18-cifar10"

# variable -> the trainer option it sets ("" leaves the option out)
_OPTIONS = {"data_dir": "--data-dir", "output_dir": "--output-dir", "preset": "--preset", "model": "--model",
            "dataset": "--task", "reducer": "--reducer", "density": "--density", "epochs": "--epochs",
            "seed": "--seed"}


@dataclass(frozen=True)
class Variables:
    """The values of run.sh's variables block, as text ("" for an empty one); ``data_dir`` and
    ``output_dir`` with run.sh's defaults already applied."""

    data_dir: str
    output_dir: str
    preset: str = ""
    model: str = ""
    dataset: str = ""
    reducer: str = ""
    density: str = ""
    epochs: str = ""
    seed: str = ""
    nproc: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Variables:
        """The variables run.sh exported (PRESET, MODEL, ..., DATA_DIR, OUTPUT_DIR)."""
        return cls(**{f.name: env.get(f.name.upper()) or "" for f in fields(cls)})

    def check(self) -> None:
        """Raise :class:`~sparsecomm.launch.launcher.LaunchError` naming the variable when DENSITY,
        EPOCHS or SEED is not a number of its kind (the trainer would name its option instead,
        --density, which a run.sh user never typed)."""
        from .launcher import LaunchError

        def number(text: str) -> float | None:
            try:
                value = float(text)
            except ValueError:
                return None
            return value if value == value and abs(value) != float("inf") else None

        density, epochs = number(self.density), number(self.epochs)
        if self.density and not (density is not None and 0 < density <= 1):
            raise LaunchError(f"DENSITY must be a number in (0, 1], got '{self.density}'")
        if self.epochs and not (epochs is not None and epochs > 0):
            raise LaunchError(f"EPOCHS must be a positive number (fractions allowed), got '{self.epochs}'")
        if self.seed:
            try:
                int(self.seed)
            except ValueError:
                raise LaunchError(f"SEED must be an integer, got '{self.seed}'") from None

    @property
    def named_preset(self) -> str:
        """The preset the variables name: PRESET, else :data:`DEFAULT_PRESET` when neither
        MODEL nor DATASET is set, else "" (the trainer chooses one that fits them)."""
        return self.preset or ("" if self.model or self.dataset else DEFAULT_PRESET)

    def trainer_args(self, more: Sequence[str] = ()) -> list[str]:
        """The trainer's options for these variables, then ``more`` (EXTRA_ARGS and run.sh's
        own arguments, in that order)."""
        values = {**{name: getattr(self, name) for name in _OPTIONS}, "preset": self.named_preset}
        args: list[str] = []
        for name, option in _OPTIONS.items():
            if values[name] or name in ("data_dir", "output_dir"):
                args += [option, values[name]]
        return [*args, *more]
