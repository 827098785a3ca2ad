"""Wall-clock time per phase of a step, with nested phases pausing their parent."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["PhaseTimer"]


class PhaseTimer:
    """Accumulates seconds per phase name; entering a phase pauses the enclosing one.

    On CUDA, kernels run asynchronously and host clocks only see launch time. With
    ``sync=True`` the device is synchronised at every phase boundary, which makes the split
    true at the cost of the synchronisations (a profiling switch, off in normal runs).
    """

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.totals: dict[str, float] = {}
        self._stack: list[tuple[str, float]] = []
        self._cuda = False

    def reset(self, device: torch.device) -> None:
        self.totals = {}
        self._stack = []
        self._cuda = device.type == "cuda"

    def _now(self) -> float:
        if self.sync and self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        now = self._now()
        if self._stack:
            outer, since = self._stack[-1]
            self.totals[outer] = self.totals.get(outer, 0.0) + now - since
        self._stack.append((phase, now))
        try:
            yield
        finally:
            now = self._now()
            name, since = self._stack.pop()
            self.totals[name] = self.totals.get(name, 0.0) + now - since
            if self._stack:
                outer, _ = self._stack[-1]
                self._stack[-1] = (outer, now)
