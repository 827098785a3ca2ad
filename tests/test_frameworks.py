"""The frameworks' examples on 2 CPU processes: PyTorch Lightning's DDPStrategy
(examples/lightning_hook.py) and Hugging Face Accelerate (examples/accelerate_hook.py) with a
sparsecomm method as DDP's communication hook, checkpoints holding every rank's hook state, and
an exact resume. Each skipped, with the reason, where its package is absent
(``pip install -e .[lightning]``, ``.[accelerate]``)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], cwd: Path, example: str = "lightning_hook.py") -> str:
    """Run an example (Lightning starts its second process itself; the others run under torchrun)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    start = [sys.executable] if example == "lightning_hook.py" else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    done = subprocess.run([*start, str(ROOT / "examples" / example), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _digest(out: str) -> str:
    found = re.search(r"epoch (\d+): loss [0-9.]+, density [0-9.]+, parameters ([0-9a-f]+)", out)
    assert found, out
    return found.group(2)


@pytest.mark.parametrize("method,scope", [("topk", "bucket")])  # ("exdyna", "model") passes too: 2 minutes more
def test_lightning_trains_with_the_hook_and_resumes_exactly(tmp_path, method, scope):
    pytest.importorskip("lightning", reason="PyTorch Lightning is not installed (pip install -e .[lightning])")
    common = ["--method", method, "--scope", scope, "--devices", "2", "--examples", "256"]
    straight = _run(common + ["--epochs", "4"], tmp_path)
    assert f"{method} in {scope} scope, 2 processes, epoch 4" in straight
    first = _run(common + ["--epochs", "2", "--save", str(tmp_path / "half.ckpt")], tmp_path)
    resumed = _run(common + ["--epochs", "4", "--resume", str(tmp_path / "half.ckpt")], tmp_path)
    assert _digest(first) != _digest(straight), "no training after the checkpoint"
    assert _digest(resumed) == _digest(straight), (straight, resumed)


def test_accelerate_trains_with_the_hook_and_resumes_exactly(tmp_path):
    pytest.importorskip("accelerate", reason="Hugging Face Accelerate is not installed (pip install -e .[accelerate])")
    common = ["--method", "topk", "--scope", "bucket", "--examples", "256"]
    run = lambda *more: _run(common + list(more), tmp_path, "accelerate_hook.py")  # noqa: E731
    straight = run("--epochs", "2")
    assert "topk in bucket scope, 2 processes, epoch 2" in straight
    first = run("--epochs", "1", "--save", str(tmp_path / "half"))
    resumed = run("--epochs", "1", "--load", str(tmp_path / "half"))
    assert _digest(first) != _digest(straight), "no training after the checkpoint"
    assert _digest(resumed) == _digest(straight), (straight, resumed)
