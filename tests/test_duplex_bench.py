"""bench/duplex.py: every collective of the same bytes runs and is timed on a real 2-process
gloo group (the netlab run itself is a benchmark, not a test)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

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
    assert all(r["min"] >= 0.005 for r in rows if r["busy_ms"] == 5.0)  # the wait follows the busy time


def test_an_unknown_collective_is_refused_with_the_allowed_ones():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "duplex.py"), "run", "--kinds", "all_reduce,broadcast"],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert done.returncode == 2
    assert "unknown collective 'broadcast'" in done.stderr and "all_gather" in done.stderr
