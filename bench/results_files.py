"""Result files of the benchmarks: an earlier run's file is set aside, never overwritten."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def keep_earlier(out: str | Path) -> Path | None:
    """If ``out`` exists (an earlier run's results), rename it to the first free ``stem.N.suffix``
    beside it (N = 1, 2, ...) and say so on stdout; return the new name, or None if there was
    nothing to keep. Call it once, before a run starts writing ``out``."""
    out = Path(out)
    if not out.exists():
        return None
    n = 1
    while (aside := out.with_name(f"{out.stem}.{n}{out.suffix}")).exists():
        n += 1
    out.rename(aside)
    print(f"{out}: an earlier run's results, kept as {aside}", flush=True)
    return aside


def write(out: str | Path, settings: dict[str, Any], results: Any, **more: Any) -> None:
    """Write a run's results to ``out`` as JSON (an earlier file there is set aside first): the
    command line, ``settings``, ``results``, torch's version and ``more``; say so on stdout."""
    import torch

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keep_earlier(out)
    with open(out, "w") as f:
        json.dump({"command": " ".join([sys.executable] + sys.argv), "settings": settings, "results": results,
                   **more, "torch": str(torch.__version__)}, f, indent=1)
    print(f"wrote {out}")
