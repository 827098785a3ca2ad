"""bench/network.py: the configurations a run trains and its wall time per step, and one worker
training every scope on a 1-process group (the netlab run itself is a benchmark, not a test)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import network  # noqa: E402
import tiny_data  # noqa: E402


def test_each_method_runs_in_each_scope_and_the_dense_ones_once_per_scope():
    configs = network._configs(["exact", "topk", "fp16"], [0.01, 0.001], ["bucket", "model"])
    assert configs == [("exact", 1.0, "bucket"), ("exact", 1.0, "model"), ("topk", 0.01, "bucket"),
                       ("topk", 0.01, "model"), ("topk", 0.001, "bucket"), ("topk", 0.001, "model"),
                       ("fp16", 1.0, "bucket"), ("fp16", 1.0, "model")]


def test_the_step_is_the_wall_time_between_training_lines():
    lines = [{"step": 5, "time": 2.0}, {"step": 10, "time": 3.0}, {"step": 15, "time": 4.5}]
    assert network.step_seconds(lines) == pytest.approx(0.25)
    assert network.step_seconds(lines[:1]) is None


def test_one_worker_trains_in_both_scopes_says_which_ran_and_skips_what_cannot_run(tmp_path):
    data = tiny_data.write_mnist(tmp_path / "data", n_train=640)
    result = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "network.py"), "worker", "--models", "mnist_cnn",
                    "--methods", "topk,omgs", "--densities", "0.01", "--scopes", "bucket,model", "--steps", "6",
                    "--log-every", "2", "--data-dir", str(data), "--scratch", str(tmp_path),
                    "--result", str(result)], check=True, env={**env, "PYTHONPATH": str(ROOT)}, cwd=ROOT, timeout=300,
                          capture_output=True, text=True)
    rows = json.loads(result.read_text())
    assert [(r["method"], r["scope"]) for r in rows] == [("topk", "bucket"), ("topk", "model"), ("omgs", "model")]
    assert "skipped mnist_cnn omgs bucket: reducer.scope=bucket" in done.stdout
    assert all(r["t_iter"] > 0 and r["bytes_sent"] >= 0 for r in rows)
    assert "bucket" in network.table([{"hosts": 1, "rate": "none", **r} for r in rows])
