"""Progress of long work (downloads, decoding, training epochs), readable where it is written.

On a terminal: tqdm's bar, redrawn in place. Anywhere else (a SLURM output file, ``nohup``, a
pipe): a bar's carriage returns would make one very long line, so progress is a plain log line
at most every ``every`` seconds, and one at the end when the work took longer than that. Needs
only the standard library (tqdm when there is a terminal): ``prepare_dataset.sh`` may run on a
bare python3.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

__all__ = ["progress", "byte_progress", "LineProgress", "on_terminal"]

log = logging.getLogger(__name__)

EVERY = 60.0  # seconds between plain progress lines


def on_terminal() -> bool:
    return sys.stderr.isatty()


class LineProgress:
    """tqdm's calls (``update``, ``set_postfix``, ``close``, a context manager), written as a
    plain line at most every ``every`` seconds: ``what: 12,000/50,000 img (24%), 8.4k img/s,
    5 s left``."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", every: float = EVERY,
                 scale: bool = False, logger: logging.Logger | None = None) -> None:
        self.total, self.desc, self.unit, self.every, self.scale = total, desc, unit, every, scale
        self.log = logger or log
        self.n = 0
        self.postfix = ""
        self._start = self._last = time.monotonic()
        self._closed = False
        self._said = -1  # the count the last line said

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every:
            self._last = now
            self._say(now)

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def line(self, now: float | None = None) -> str:
        took = (now or time.monotonic()) - self._start
        rate = self.n / took if took > 0 else 0.0
        done = f"{self._count(self.n)}" + (f"/{self._count(self.total)}" if self.total else "")
        parts = [f"{self.desc}: {done} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts.append(f"{self._count(rate)} {self.unit}/s")
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"{_seconds((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _count(self, value: float | None) -> str:
        if value is None:
            return "?"
        if self.scale:
            for step, prefix in ((1 << 30, "Gi"), (1 << 20, "Mi"), (1 << 10, "ki")):
                if value >= step:
                    return f"{value / step:.1f} {prefix}"
            return f"{value:.0f} "
        return f"{value:,.0f}" if value >= 100 or float(value).is_integer() else f"{value:.3g}"

    def close(self) -> None:
        if not self._closed and self.n != self._said and time.monotonic() - self._start >= self.every:
            self._say(time.monotonic())
        self._closed = True

    def _say(self, now: float) -> None:
        self._said = self.n
        self.log.info("%s", self.line(now))

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else (f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h")


class _Silent(LineProgress):
    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass


def progress(total: int | None, desc: str, unit: str = "it", show: bool = True, every: float = EVERY,
             logger: logging.Logger | None = None) -> Any:
    """A bar on a terminal, plain lines (through ``logger``) elsewhere, nothing when ``show``
    is false."""
    if not show:
        return _Silent(total, desc, unit)
    bar = _tqdm()
    if bar is None:
        return LineProgress(total, desc, unit, every, logger=logger)
    return bar(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


def byte_progress(total: int | None, desc: str, every: float = EVERY, logger: logging.Logger | None = None) -> Any:
    """As :func:`progress`, counting bytes (``update(nbytes)``)."""
    bar = _tqdm()
    if bar is None:
        return LineProgress(total, desc, "B", every, scale=True, logger=logger)
    return bar(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False)


def _tqdm() -> Any:
    """tqdm's bar class on a terminal where tqdm is installed, else None."""
    if not on_terminal():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm
