"""The cost model: the alpha-beta forms, the fit, the collectives a method makes as recorded on
virtual workers, and the predictor's command line."""
import json
import math

import pytest
import torch

import tiny_data
from sparsecomm.tools import costmodel
from sparsecomm.tools import predict as predictor

SHAPES = [torch.Size([40, 30]), torch.Size([30]), torch.Size([7, 11])]


def _grads(P, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = sum(s.numel() for s in SHAPES)
    return [torch.randn(d, generator=g) for _ in range(P)]


def _links(alpha=1e-4, efficiency=0.5, gamma=0.0):
    return costmodel.Links(costmodel.Cost(alpha, efficiency, gamma), costmodel.Cost(alpha, efficiency, gamma))


def test_alpha_beta_forms():
    links = _links(1e-4, 0.5, 2e-10)
    n, P, rate = 4_000_000, 8, 1e9
    beta = 8 / (0.5 * rate) + 2e-10
    assert costmodel.collective_seconds("all_reduce", n, P, links, rate) == pytest.approx(
        2 * (P - 1) * 1e-4 + 2 * (P - 1) / P * n * beta)
    assert costmodel.collective_seconds("all_gather", n, P, links, rate) == pytest.approx((P - 1) * (1e-4 + n * beta))
    assert costmodel.collective_seconds("broadcast", n, P, links, rate) == pytest.approx(3 * (1e-4 + n * beta))
    assert costmodel.collective_seconds("exchange", n, P, links, rate) == pytest.approx(1e-4 + n * beta)
    assert costmodel.collective_seconds("all_reduce", n, 1, links, rate) == 0.0
    with pytest.raises(ValueError, match="unknown collective 'scatter'"):
        costmodel.collective_seconds("scatter", n, P, links, rate)


def test_fit_recovers_the_links_it_was_made_from(tmp_path):
    truth = costmodel.Links(costmodel.Cost(3e-4, 0.8, 1e-10), costmodel.Cost(1e-4, 0.6, 3e-10))
    points = [{"collective": kind, "bytes": n, "hosts": P, "rate": "x", "rate_bps": rate,
               "seconds": costmodel.collective_seconds(kind, n, P, truth, rate or math.inf)}
              for kind in ("all_reduce", "all_gather") for n in (16e3, 256e3, 4e6) for P in (2, 4)
              for rate in (1e8, 1e9, None)]
    links = costmodel.fit(points)
    for kind in ("all_reduce", "all_gather"):
        got, want = links.cost(kind), truth.cost(kind)
        assert got.alpha == pytest.approx(want.alpha, rel=1e-6) and got.gamma == pytest.approx(want.gamma, rel=1e-6)
        assert got.efficiency == pytest.approx(want.efficiency, rel=1e-6)
    links.save(tmp_path / "links.json")
    assert costmodel.Links.load(tmp_path / "links.json") == links
    other = links.replaced(alpha=0.01, gamma=0.0)
    assert other.all_gather.alpha == other.all_reduce.alpha == 0.01 and other.all_reduce.gamma == 0.0
    assert other.all_reduce.efficiency == links.all_reduce.efficiency
    assert links.replaced(gamma=1e-9).all_gather.alpha == links.all_gather.alpha
    with pytest.raises(ValueError, match="at least three timed all_reduces"):
        costmodel.fit(points[:2])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="is not a links file"):
        costmodel.Links.load(tmp_path / "bad.json")


@pytest.mark.parametrize("P", [1, 3, 4])
def test_profile_records_the_collectives_rank_0_starts(P):
    """What the recording communicator lists adds up to the bytes the reducer counted, and the
    dense method is one all-reduce of the whole gradient."""
    d = sum(s.numel() for s in SHAPES)
    exact = costmodel.profile("exact", _grads(P), SHAPES, 1.0)
    [last] = exact.steps[-1:]
    if P > 1:  # the whole gradient in one all-reduce, and a handshake of a few numbers
        assert costmodel.Collective("all_reduce", 4 * d) in last
        assert sum(c.nbytes for c in last) - 4 * d < 100
    else:
        assert last == []
    for method in ("topk", "exdyna", "gtopk", "powersgd"):
        prof = costmodel.profile(method, _grads(P), SHAPES, 0.05)
        if P > 1:  # alone, a worker counts what it would send but starts no collective
            sent = [sum(c.nbytes for c in step) for step in prof.steps]
            assert sum(sent) / len(sent) == pytest.approx(prof.bytes_sent), method
        assert 0 < prof.density <= 1 and prof.t_select >= 0
    gtopk = costmodel.profile("gtopk", _grads(P), SHAPES, 0.05)
    assert sum(c.kind == "exchange" for c in gtopk.steps[-1]) == (math.ceil(math.log2(P)) if P > 1 else 0)


def test_step_seconds_adds_the_parts():
    links = _links(1e-4, 1.0)
    prof = costmodel.profile("exact", _grads(2), SHAPES, 1.0)
    t = costmodel.step_seconds(0.01, prof, links, 1e9)
    assert t["step"] == pytest.approx(0.01 + prof.t_select + t["comm"])
    assert t["comm"] == pytest.approx(sum(costmodel.collective_seconds(c.kind, c.nbytes, 2, links, 1e9)
                                          for step in prof.steps for c in step) / len(prof.steps))
    assert t["comm"] > 2 * 1e-4 + 4 * sum(s.numel() for s in SHAPES) * 8 / 1e9  # the all-reduce and more
    assert costmodel.step_seconds(0.01, prof, links, 1e9, select=0.5)["select"] == 0.5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    tiny_data.write_libsvm(root, "tiny.svm", n=256, features=16)
    links = root / "links.json"
    _links(1e-4, 0.9).save(links)
    return root, links


def test_predict_prints_every_cell(setup, capsys, caplog, tmp_path):
    root, links = setup
    caplog.set_level("INFO", logger="sparsecomm.tools.predict")
    out = tmp_path / "rows.json"
    rc = predictor.main(["--preset", "logreg", "--workers", "2,3", "--bandwidth", "100mbit,10gbit", "--reducers",
                         "exact,topk,exdyna", "--density", "0.1", "--links", str(links), "--data-dir", str(root),
                         "--set", "task_options.path=tiny.svm", "--out", str(out), "--scope", "model"])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 2 * 2 * 3
    for r in rows:
        assert r["step"] == pytest.approx(r["compute"] + r["select"] + r["comm"]) and r["compute"] > 0
        if r["method"] == "exact":
            assert r["speedup"] == 1.0
    slow = {r["method"]: r["comm"] for r in rows if r["workers"] == 3 and r["rate"] == "100mbit"}
    fast = {r["method"]: r["comm"] for r in rows if r["workers"] == 3 and r["rate"] == "10gbit"}
    assert all(slow[m] > fast[m] for m in slow)
    assert "speedup" in capsys.readouterr().out
    said = [r.getMessage() for r in caplog.records]  # where it is, as it goes: no long silence
    assert [m.split(" in ")[0] for m in said if m.startswith("P=")] == [
        "P=2 (1 of 2): 2 workers' gradients", "P=2: exact on 2 virtual workers, 3 steps",
        "P=2: topk on 2 virtual workers, 3 steps", "P=2: exdyna on 2 virtual workers, 3 steps",
        "P=3 (2 of 2): 3 workers' gradients", "P=3: exact on 3 virtual workers, 3 steps",
        "P=3: topk on 3 virtual workers, 3 steps", "P=3: exdyna on 3 virtual workers, 3 steps"]


@pytest.mark.parametrize("args,message", [
    (["--preset", "nope"], "unknown preset 'nope'; known: "),
    (["--preset", "logreg", "--reducers", "exact,zip"], "unknown reducer 'zip'; registered: "),
    (["--preset", "logreg", "--scope", "layer"], "--scope must be one of auto, bucket, model, got 'layer'"),
    (["--preset", "logreg", "--bucket-mb", "0"], "--bucket-mb must be a positive number of MB, got 0.0"),
    (["--preset", "logreg", "--bandwidth", "10 gigs"], "rate '10 gigs' is not a rate; use a number with kbit"),
    (["--preset", "logreg", "--bandwidth", "unlimited"], "--bandwidth needs finite rates"),
    (["--preset", "logreg", "--workers", "8,0"], "--workers takes positive integers"),
    (["--preset", "logreg", "--alpha", "-1"], "--alpha must be a number of seconds >= 0, got -1.0"),
    (["--preset", "logreg", "--links", "/nonexistent/links.json"], "no fitted links at /nonexistent/links.json"),
])
def test_bad_input_is_one_line(setup, capsys, args, message):
    root, links = setup
    extra = [] if "--links" in args else ["--links", str(links)]
    assert predictor.main([*args, *extra, "--data-dir", str(root), "--set", "task_options.path=tiny.svm"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err, err


def test_another_devices_times_replace_the_measured_ones(setup, capsys, tmp_path):
    root, links = setup
    device = tmp_path / "gpu.json"
    device.write_text(json.dumps({"presets": {"logreg": {"compute_ms": 5.0, "select_ms": {"topk": 2.0}}}}))
    out = tmp_path / "rows.json"
    common = ["--preset", "logreg", "--workers", "2", "--bandwidth", "1gbit", "--links", str(links), "--data-dir",
              str(root), "--set", "task_options.path=tiny.svm", "--device", str(device)]
    assert predictor.main([*common, "--reducers", "exact,topk", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert rows["topk"]["compute"] == rows["exact"]["compute"] == 0.005
    assert rows["topk"]["select"] == pytest.approx(0.002) and rows["exact"]["select"] == 0.0
    capsys.readouterr()
    assert predictor.main([*common, "--reducers", "exact,sage"]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: {device} has no selection time for sage on logreg; "
                                                      f"it has: topk")


def _bucket(ready, seconds, size=10):
    """A bucket whose one all-reduce takes ``seconds`` on links of alpha 0, rate 8 bit/s."""
    return costmodel.Bucket(ready, costmodel.Profile("exact", 2, [[costmodel.Collective("all_reduce", 0)]], 0.0, 1.0,
                                                     0.0, 0.0), size), seconds


def test_overlapped_buckets_wait_for_backward_and_for_the_link(monkeypatch):
    """Each bucket starts when backward has made it and the bucket before it is done; what runs
    past backward's end is exposed."""
    times = {}
    monkeypatch.setattr(costmodel.Profile, "comm_seconds", lambda self, links, rate: times[id(self)])

    def buckets(*specs):
        out = []
        for ready, seconds in specs:
            b, t = _bucket(ready, seconds)
            times[id(b.profile)] = t
            out.append(b)
        return out

    links = _links()
    # ready at 0.5 and 1.0 of a 1 s backward, 0.3 s each: 0.5-0.8, then 1.0-1.3
    t = costmodel.overlapped_step_seconds(0.2, 1.0, buckets((0.5, 0.3), (1.0, 0.3)), links, 1e9)
    assert t["exposed"] == pytest.approx(0.3) and t["hidden"] == pytest.approx(0.5)
    assert t["step"] == pytest.approx(1.5) and t["comm"] == pytest.approx(0.6) and t["compute"] == pytest.approx(1.2)
    # ready early, but the link is busy: 0.1-0.7, then 0.7-1.3
    t = costmodel.overlapped_step_seconds(0.0, 1.0, buckets((0.1, 0.6), (0.2, 0.6)), links, 1e9)
    assert t["exposed"] == pytest.approx(0.3) and t["hidden"] == pytest.approx(0.75)
    # all hidden
    t = costmodel.overlapped_step_seconds(0.0, 1.0, buckets((0.1, 0.2), (0.5, 0.2)), links, 1e9)
    assert t["exposed"] == 0.0 and t["hidden"] == 1.0 and t["step"] == 1.0


def test_bucket_profiles_cut_the_gradient_as_ddp_does():
    """The buckets cover every element once, in the order backward makes them ready, and PyTorch's
    16-bit hooks are the same all-reduces at half the bytes."""
    d = sum(s.numel() for s in SHAPES)
    ready = [0.9, 0.5, 0.1]  # backward reaches the last parameter first
    buckets = costmodel.bucket_profiles("exact", _grads(3), SHAPES, ready, 1.0, bucket_mb=2e-4)
    assert sum(b.size for b in buckets) == d and len(buckets) > 1
    assert [b.ready for b in buckets] == sorted(b.ready for b in buckets)
    for b in buckets:
        assert costmodel.Collective("all_reduce", 4 * b.size) in b.profile.steps[-1]
        half = costmodel.halved(b.profile, "torch-fp16")
        assert [c.nbytes for c in half.steps[-1]] == [c.nbytes // 2 for c in b.profile.steps[-1]]
        assert half.t_select == 0.0


def test_predict_overlaps_buckets_and_prices_torchs_hooks(setup, tmp_path):
    root, links = setup
    out = tmp_path / "rows.json"
    assert predictor.main(["--preset", "logreg", "--workers", "3", "--bandwidth", "100mbit", "--reducers",
                           "exact,topk,exdyna,torch-fp16,torch-powersgd", "--density", "0.1", "--links", str(links),
                           "--data-dir", str(root), "--set", "task_options.path=tiny.svm", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert {m: r["scope"] for m, r in rows.items()} == {"exact": "bucket", "topk": "bucket", "exdyna": "model",
                                                       "torch-fp16": "bucket", "torch-powersgd": "bucket"}
    for r in rows.values():
        assert r["step"] == pytest.approx(r["compute"] + r["exposed"])
        assert 0 <= r["exposed"] <= r["select"] + r["comm"] + 1e-12 and 0 <= r["hidden"] <= 1
    assert rows["exdyna"]["hidden"] == 0.0
    assert rows["torch-fp16"]["bytes_sent"] == pytest.approx(rows["exact"]["bytes_sent"] / 2)


def test_a_fitted_efficiency_never_exceeds_the_rate():
    """Timings faster than the link rate allows (noise) fit efficiency 1, not more."""
    fast = costmodel.Links(costmodel.Cost(1e-4, 1.3, 0.0), costmodel.Cost(1e-4, 1.3, 0.0))
    points = [{"collective": kind, "bytes": n, "hosts": 2, "rate_bps": rate,
               "seconds": costmodel.collective_seconds(kind, n, 2, fast, rate)}
              for kind in ("all_reduce", "all_gather") for n in (16e3, 4e6) for rate in (1e8, 1e9)]
    links = costmodel.fit(points)
    assert links.all_reduce.efficiency == links.all_gather.efficiency == 1.0
