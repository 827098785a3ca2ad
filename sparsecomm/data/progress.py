"""Progress bars for long downloads, unpacks and checks: tqdm's, on a terminal only."""
from __future__ import annotations

from contextlib import nullcontext

__all__ = ["byte_bar"]


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def byte_bar(total: int | None, desc: str):
    """A context manager yielding a bar with ``update(nbytes)``; shown only when stderr is a
    terminal (tqdm's ``disable=None``), and a silent stand-in when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:  # prepare_dataset.sh may run on a bare python3
        return nullcontext(_NoBar())
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=None, leave=False)
