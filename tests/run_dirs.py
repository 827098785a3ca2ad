"""Run directories as an interrupted run leaves them, made from finished ones."""
import shutil
from pathlib import Path


def cut_short(src: Path, dst: Path, keep_lines: int) -> Path:
    """A copy of a finished run as an interrupted one looks: no summary.json, no checkpoints,
    metrics.jsonl cut in the middle of a line."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "summary.json"))
    lines = (src / "metrics.jsonl").read_text().splitlines(keepends=True)
    (dst / "metrics.jsonl").write_text("".join(lines[:keep_lines]) + lines[keep_lines][:25])
    return dst
