"""bench/duplex.py: every collective of the same bytes runs, is checked and is timed on a real
2-process gloo group; wrong results and bad settings are refused (the netlab run itself is a
benchmark, not a test)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_time_each_collective_with_and_without_a_busy_thread(tmp_path):
    result = tmp_path / "rows.json"
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "PYTHONPATH": str(ROOT)}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "bench" / "duplex.py"), "worker", "--values", "1000",
                                       "--busy", "0,5", "--repeats", "2", "--result", str(result)], env=env, cwd=ROOT))
    for p in procs:
        assert p.wait(timeout=120) == 0
    rows = json.loads(result.read_text())
    assert [(r["busy_ms"], r["collective"]) for r in rows] == [
        (b, k) for b in (0.0, 5.0) for k in ("all_reduce", "all_gather", "send_recv", "all_to_all")]
    assert all(r["bytes"] == 2000 and r["repeats"] == 2 for r in rows)
    assert all(r["min"] <= r["median"] <= r["max"] for r in rows)


def test_a_result_that_is_not_what_the_other_worker_sent_is_caught(tmp_path):
    import torch
    import torch.distributed as dist
    sys.path.insert(0, str(ROOT / "bench"))
    import duplex
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        rows = [duplex.row_of(r, 64) for r in range(2)]
        duplex.check("all_gather", torch.cat(rows), 64)
        duplex.check("send_recv", rows[1], 64)  # rank 0's peer is rank 1
        duplex.check("all_reduce", rows[0] + rows[1], 64)
        wrong = torch.cat(rows)
        wrong[70] += 1
        with pytest.raises(RuntimeError, match="all_to_all: rank 0 did not receive"):
            duplex.check("all_to_all", wrong, 64)
        with pytest.raises(RuntimeError):
            duplex.check("send_recv", rows[0], 64)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("args, message", [
    (["--kinds", "all_reduce,broadcast"], "unknown collective 'broadcast'"),
    (["--repeats", "0"], "--repeats must be at least 1, got 0"),
    (["--busy", "0,-5"], "--busy: milliseconds >= 0"),
])
def test_bad_settings_are_refused_before_anything_starts(args, message):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "duplex.py"), "run", *args],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr
