"""bench/scaling.py end to end on tiny MNIST files: the scaling study on virtual workers (rows
per worker count and method, rows skipped for memory, later calls adding to earlier results,
the figure) and the convergence study (whole trainer runs, earlier rows kept)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_data

ROOT = Path(__file__).resolve().parents[1]


def scaling(*args):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "scaling.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    tiny_data.write_mnist(root, "mnist")
    return root


def test_scaling_study_rows_skips_and_later_calls(data_dir, tmp_path):
    common = ["--models", "mnist_cnn", "--steps", "2", "--warmup", "1", "--pretrain", "1",
              "--data-dir", str(data_dir), "--out", str(tmp_path / "out"), "--figures", str(tmp_path / "fig")]
    scaling(*common, "--workers", "2,3,100000", "--methods", "topk,exdyna")
    results = json.loads((tmp_path / "out" / "scaling.json").read_text())
    by = results["models"]["mnist_cnn"]
    rows = {(r["method"], r["W"]): r for r in by["rows"]}
    assert set(rows) == {(m, W) for m in ("topk", "exdyna") for W in (2, 3, 100000)}
    for m in ("topk", "exdyna"):  # a million workers' residuals do not fit: said, not attempted
        assert "of memory" in rows[m, 100000]["skipped"] and "density" not in rows[m, 100000]
    k, d = by["k"], by["d"]
    for W in (2, 3):
        topk = rows["topk", W]
        local = topk["local_density_mean"]  # k per tensor, rounded: within 1% of k / d, the same on every worker
        assert topk["local_density_min"] == topk["local_density_max"] == local == pytest.approx(k / d, rel=0.01)
        assert local <= topk["density"] <= W * local  # the union of W selections
        assert rows["exdyna", W]["density"] > 0
    # top-k sends its k pairs whatever W; what arrives grows with W
    assert rows["topk", 2]["bytes_sent"] == rows["topk", 3]["bytes_sent"]
    assert rows["topk", 3]["bytes_wire"] > rows["topk", 2]["bytes_wire"]
    assert (tmp_path / "fig" / "scaling-mnist_cnn.png").stat().st_size > 0
    assert "skipped: needs" in (tmp_path / "out" / "scaling.md").read_text()
    # a later call with the same settings adds its cells and keeps the others
    scaling(*common, "--workers", "2", "--methods", "sage")
    later = json.loads((tmp_path / "out" / "scaling.json").read_text())["models"]["mnist_cnn"]["rows"]
    assert {(r["method"], r["W"]) for r in later} == set(rows) | {("sage", 2)}
    assert next(r for r in later if (r["method"], r["W"]) == ("topk", 3)) == rows["topk", 3]
    # every W skipped: the skipped rows, and no empty figure
    common[common.index("--out") + 1] = str(tmp_path / "none")
    common[common.index("--figures") + 1] = str(tmp_path / "none-fig")
    scaling(*common, "--workers", "100000", "--methods", "topk")
    assert "| topk | 100000 | skipped: needs" in (tmp_path / "none" / "scaling.md").read_text()
    assert not list((tmp_path / "none-fig").glob("*.png"))


def test_convergence_study_trains_and_keeps_earlier_rows(data_dir, tmp_path):
    args = ["--convergence", "--models", "logreg", "--workers", "2,3", "--methods", "exact,topk",
            "--global-batch", "12", "--data-dir", str(data_dir), "--out", str(tmp_path)]
    scaling(*args)
    rows = json.loads((tmp_path / "convergence.json").read_text())
    assert [(r["W"], r["method"], r["batch_per_worker"]) for r in rows] == \
        [(2, "exact", 6), (2, "topk", 6), (3, "exact", 4), (3, "topk", 4)]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and r["steps"] > 0
        assert r["density"] == 1 if r["method"] == "exact" else 0 < r["density"] < 1
    again = scaling(*args)  # measured already: kept, not trained again
    assert again.stderr.count("measured by an earlier call, kept") == 4
    assert json.loads((tmp_path / "convergence.json").read_text()) == rows


def test_a_method_has_one_colour_in_every_panel(tmp_path, monkeypatch):
    """The load-imbalance panel draws five of the nine methods; their colours are the legend's."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.colors
    import matplotlib.pyplot as plt

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import scaling as bench_scaling

    keys = ("density", "bytes_sent", "bytes_wire", "t_select_ms", "busy_ms", "imbalance")
    rows = [{"method": m, "W": W, **{k: 1.0 + i + W for k in keys}}
            for i, m in enumerate(bench_scaling.METHODS) for W in (8, 32)]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    bench_scaling.figures({"density": 0.001, "batch": 8, "models": {"m": {"rows": rows, "d": 1000, "k": 1}}}, tmp_path)
    [fig] = figures
    colours: dict[str, set] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_label() in bench_scaling.METHODS:
                colours.setdefault(line.get_label(), set()).add(matplotlib.colors.to_hex(line.get_color()))
    assert set(colours) == set(bench_scaling.METHODS)
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({c for cs in colours.values() for c in cs}) == len(bench_scaling.METHODS)
