"""Run directories as an interrupted run leaves them, made from finished ones; their records
compared."""
import json
import shutil
from pathlib import Path


def cut_short(src: Path, dst: Path, keep_lines: int) -> Path:
    """A copy of a finished run as an interrupted one looks: no summary.json, no checkpoints,
    metrics.jsonl cut in the middle of a line."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "summary.json"))
    lines = (src / "metrics.jsonl").read_text().splitlines(keepends=True)
    (dst / "metrics.jsonl").write_text("".join(lines[:keep_lines]) + lines[keep_lines][:25])
    return dst


def records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's lines without what differs between two runs of the same steps (times)."""
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("t_") and k != "time"}
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def assert_same_records(straight: Path, resumed: Path, stopped_at: int | None = None) -> None:
    """The records of an uninterrupted run and of one stopped and resumed are the same, except
    that a stop at max_steps (``stopped_at``) adds a training line and an evaluation there."""
    a_lines, b_lines = records(straight), records(resumed)
    if stopped_at is not None:
        kinds = {("split" in line, line.get("split")) for line in a_lines if line["step"] == stopped_at}
        added = [l for l in b_lines if l["step"] == stopped_at and ("split" in l, l.get("split")) not in kinds]
        assert {"split" in l for l in added} == {False, True}, "the stop at max_steps wrote its line and evaluated"
        b_lines = [l for l in b_lines if l not in added]
    assert a_lines == b_lines
