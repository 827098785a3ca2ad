"""bench/reducers.py --compare-with: a research folder's reducers timed beside ours.

The research code is a fake written here, in the shape of the ExDyna authors' gradient_reducers.py
(a base ``Reducer(random_seed, device, timer)`` that draws a 128 Mi-value buffer nobody reads,
``reduce(grad_in, grad_out, memory_out)`` rebinding the output lists' entries), so the test
depends on no checkout."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
sys.path.insert(0, BENCH)

import research_code  # noqa: E402

FAKE = textwrap.dedent('''
    import numpy as np
    import torch

    class Reducer:
        def __init__(self, random_seed, device, timer):
            self.rng = np.random.RandomState(random_seed)
            M = 1024 * 1024
            self.precalc_numbers = torch.from_numpy(self.rng.randn(128 * M)).to(device).type(torch.float32)
            self.n_workers = torch.distributed.get_world_size()
            self.device = device
            self.timer = timer

    class TopKReducer(Reducer):
        """Top-k of the flat vector, union of indices, all-reduce of the values there."""
        def __init__(self, random_seed, device, timer, compression=1 / 244):
            super().__init__(random_seed, device, timer)
            self.compression = compression

        def reduce(self, grad_in, grad_out, memory_out):
            with self.timer("reduce.flatpack", verbosity=2):
                flat = torch.cat([t.reshape(-1) for t in grad_in])
                k = int(self.compression * flat.numel())
            with self.timer("reduce.topk", verbosity=2):
                _, idx = torch.topk(flat.abs(), k, sorted=False)
            with self.timer("reduce.gather", verbosity=2):
                lists = [torch.empty_like(idx) for _ in range(self.n_workers)]
                torch.distributed.all_gather(lists, idx)
                union = torch.unique(torch.cat(lists))
                values = flat[union].contiguous()
                torch.distributed.all_reduce(values)
            with self.timer("reduce.combine", verbosity=2):
                avg = torch.zeros_like(flat)
                avg[union] = values / self.n_workers
                at = 0
                for i, t in enumerate(grad_out):
                    grad_out[i] = avg[at:at + t.numel()].reshape(t.shape)
                    at += t.numel()
            with self.timer("reduce.memory", verbosity=2):
                flat[union] = 0.0
                at = 0
                for i, m in enumerate(memory_out):
                    memory_out[i] = flat[at:at + m.numel()].reshape(m.shape)
                    at += m.numel()
            print("progress line the harness captures")
            return 0, values.numel()

    class CLTKReducer(Reducer):
        def __init__(self, random_seed, device, timer, compression=1 / 244):
            raise RuntimeError("needs a GPU")

    class AccordionTopKReducer(Reducer):
        pass
''')


@pytest.fixture
def research(tmp_path):
    folder = tmp_path / "research"
    folder.mkdir()
    (folder / "gradient_reducers.py").write_text(FAKE)
    return folder


def bench_main(monkeypatch, capsys, *args):
    """bench/reducers.py's main() in this process (for errors raised before any worker starts):
    (exit code, stderr lines)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_reducers", os.path.join(BENCH, "reducers.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["reducers.py", *args])
    with pytest.raises(SystemExit) as e:
        module.main()
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def run_bench(*args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(BENCH, "reducers.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_compare_two_gloo_workers(research, tmp_path):
    """The real entry, 2 gloo processes: their top-k beside our global_topk (union), same
    gradients; a class that cannot be built is reported and the run goes on; Accordion is named
    as not compared; the 128 Mi draw is skipped (else construction alone takes seconds and 1 GiB).
    An earlier run's results at --out are set aside, not overwritten."""
    out = tmp_path / "out.json"
    out.write_text('{"earlier": true}')
    r = run_bench("--compare-with", str(research), "--workers", "2", "--models", "tiny", "--steps", "2",
                  "--warmup", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "out.1.json").read_text()) == {"earlier": True}
    assert f"{out}: an earlier run's results, kept as {tmp_path / 'out.1.json'}" in r.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["research_code"]["path"] == str(research)
    methods = data["results"]["tiny"]["compare"]["methods"]
    assert set(methods) == {"TopKReducer", "CLTKReducer"}
    topk = methods["TopKReducer"]
    assert topk["ours"] == "global_topk" and topk["ours_options"] == {"exchange": "union"}
    # the same algorithm on the same gradients: the same number of coordinates in the average
    assert topk["theirs_density"] == pytest.approx(topk["ours_density"])
    assert 0 < topk["theirs_density"] < 0.01
    # conservation sum_w (x_w - m_w) = P avg on both sides
    assert topk["check"]["theirs"] < 1e-6 and topk["check"]["ours"] < 1e-6
    assert topk["ratio"] > 0 and len(topk["per_step"]["theirs_step"]) == 2
    assert topk["theirs_comm"] > 0 and topk["theirs_select"] > 0
    assert any("precalc_numbers" in a for a in topk["adapted"])
    assert topk["printed_lines"] == 3  # one per step (warm-up included), not on our stdout
    assert "progress line" not in r.stdout
    assert methods["CLTKReducer"]["error"] == "their CLTKReducer cannot be constructed: RuntimeError: needs a GPU"
    assert "AccordionTopKReducer" in data["results"]["tiny"]["compare"]["not_compared"]
    assert "TopKReducer" in r.stdout and "not compared" in r.stdout
    assert "ERROR: their CLTKReducer cannot be constructed: RuntimeError: needs a GPU" in r.stdout


def test_missing_path_is_one_line(tmp_path, monkeypatch, capsys):
    code, err = bench_main(monkeypatch, capsys, "--compare-with", str(tmp_path / "nowhere"))
    assert code == 2
    assert err == [f"reducers.py: error: --compare-with {tmp_path / 'nowhere'}: no such folder"]


def test_folder_without_reducers_names_where_they_are(tmp_path):
    (tmp_path / "cnn-lstm").mkdir()
    (tmp_path / "cnn-lstm" / "gradient_reducers.py").write_text(FAKE)
    with pytest.raises(research_code.ResearchCodeError) as e:
        research_code.locate(str(tmp_path))
    assert str(e.value) == (f"--compare-with {tmp_path}: no gradient_reducers.py in it "
                            f"(found in {tmp_path / 'cnn-lstm'}: pass one of those)")
    (tmp_path / "plain").write_text("")
    with pytest.raises(research_code.ResearchCodeError, match="not a folder"):
        research_code.locate(str(tmp_path / "plain"))


def test_broken_and_unmatched_research_code(tmp_path, monkeypatch, capsys):
    (tmp_path / "gradient_reducers.py").write_text("import nonexistent_module_xyz\n")
    with pytest.raises(research_code.ResearchCodeError, match="importing gradient_reducers.py failed: "
                                                                "ModuleNotFoundError"):
        research_code.load(str(tmp_path))
    (tmp_path / "gradient_reducers.py").write_text("class FancyReducer:\n    pass\n")
    code, err = bench_main(monkeypatch, capsys, "--compare-with", str(tmp_path))
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"reducers.py: error: --compare-with {tmp_path}: no reducer class there that has a "
                             "counterpart here (known: ExactReducer, ")
    module = research_code.load(str(tmp_path))
    assert research_code.pairs(module) == ([], {"FancyReducer": "no counterpart here"})
