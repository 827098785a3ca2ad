"""bench/gpu_check.sh rehearsed on CPU (``--device cpu``: the same parts with small sizes), so a
broken part shows here before a GPU is lent: every part runs and writes its results, and the
exact top-k check finds the search bit-identical to the torch reference."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_rehearses_every_part_on_cpu(tmp_path):
    out = tmp_path / "gpu"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "cpu", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=560)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    for part in ("environment", "reducers", "memory", "fused", "topk", "train"):
        assert (out / f"{part}.txt").exists(), part
    topk = json.loads((out / "topk.json").read_text())
    assert topk["failures"] == [] and topk["device"] == "cpu, one thread"
    passes = topk["speed"]["tiny"]["passes"]
    assert {"layer_search", "global_search", "layer_reference", "global_torch_topk"} <= passes.keys()
    assert "all cases bit-identical" in (out / "topk.txt").read_text()
    reducers = json.loads((out / "reducers.json").read_text())
    assert {"topk:torch", "topk:fused", "global_topk:fused"} <= reducers["results"]["tiny"]["methods"].keys()
    assert "gpu_check: results in" in done.stdout and "0 part(s) failed" in done.stdout


def test_gpu_check_refuses_an_unknown_device(tmp_path):
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--device", "tpu", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--device must be cuda or cpu, not tpu" in done.stderr
