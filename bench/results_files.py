"""Result files of the benchmarks: an earlier run's file is set aside, never overwritten."""

from __future__ import annotations

from pathlib import Path


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
