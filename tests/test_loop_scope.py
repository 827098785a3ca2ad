"""The training loop's scopes (``reducer.scope``): each group of parameters reduced during
backward by the same BucketReducer the DDP hook uses, or the whole model after backward; the
same results on gloo processes (overlapped) as on virtual workers (in turn), resume, records,
and bad settings."""
import json

import pytest
import torch
import yaml

import tiny_data
import train_scenarios as ts
from sparsecomm.config import ConfigError, load_config
from sparsecomm.launch.job import join
from sparsecomm.train.loop import Trainer
from test_training import overrides, run_solo
from test_virtual import _state, _train_virtual

BUCKETS = ["reducer.bucket_mb=0.05"]  # the MNIST CNN (8 tensors, 0.1 MB) in 3 groups


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data.write_all(tmp_path_factory.mktemp("data"))


def _end(run_dir, workers):
    _, shared, ranks = _state(run_dir, workers)
    return shared["model"], [r["reducer"]["residual"] for r in ranks]


def _same_end(a, b, what):
    (model_a, res_a), (model_b, res_b) = a, b
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), f"{what}: {key} differs"
    for r, (x, y) in enumerate(zip(res_a, res_b, strict=True)):
        assert torch.equal(x, y), f"{what}: rank {r}'s residual differs"


@pytest.mark.parametrize("reducer,scope", [("topk", "auto"), ("exdyna", "bucket")])
def test_bucket_scope_on_processes_matches_virtual_workers(clusters, data_dir, tmp_path, reducer, scope):
    """2 gloo processes reducing each group on a worker thread during backward end with the
    model and residuals of 2 virtual workers reducing the same groups after their backwards;
    for layer-wise top-k also with those of model scope (its meaning per tensor is the same)."""
    extra = [f"reducer.scope={scope}", *BUCKETS]
    real = clusters(2).run(ts.train, overrides("mnist", data_dir, tmp_path / "real", reducer, extra))
    assert real[0]["scope"] == "bucket" and real[0]["steps"] > 2
    trainer, summary = _train_virtual(overrides("mnist", data_dir, tmp_path / "virtual", reducer, extra), 2)
    assert summary["scope"] == "bucket" and summary["steps"] == real[0]["steps"]
    processes = _end(next((tmp_path / "real").iterdir()), 2)
    _same_end(processes, _end(trainer.run_dir, 2), "processes against virtual workers")
    if reducer == "topk":
        model = clusters(2).run(ts.train, overrides("mnist", data_dir, tmp_path / "model", reducer,
                                                    ["reducer.scope=model"]))
        assert model[0]["scope"] == "model"
        _same_end(processes, _end(next((tmp_path / "model").iterdir()), 2), "bucket scope against model scope")


def test_bucket_scope_resumes_bit_exactly(clusters, data_dir, tmp_path):
    """Stopped at max_steps and resumed, 2 processes in bucket scope end as a straight run."""
    c = clusters(2)
    extra = ["reducer.scope=bucket", *BUCKETS]
    c.run(ts.train, overrides("mnist", data_dir, tmp_path / "straight", "powersgd", extra, epochs=1.5))
    ov = overrides("mnist", data_dir, tmp_path / "resumed", "powersgd", extra, epochs=1.5)
    first = c.run(ts.train, ov + ["max_steps=3"])
    assert {f["step"] for f in first} == {3}
    c.run(ts.train, ov)
    run = lambda root: next(root.iterdir())  # noqa: E731
    _same_end(_end(run(tmp_path / "straight"), 2), _end(run(tmp_path / "resumed"), 2), "resumed against straight")


def test_records_say_which_scope_ran(data_dir, tmp_path):
    trainer, summary = run_solo(overrides("mnist", data_dir, tmp_path / "a", "topk", BUCKETS))
    info = json.loads((trainer.run_dir / "reducer.json").read_text())
    config = yaml.safe_load((trainer.run_dir / "config.yaml").read_text())
    assert summary["scope"] == info["scope"] == config["environment"]["reducer_scope"] == "bucket"
    assert config["reducer"]["scope"] == "auto"
    assert sorted(p for b in info["buckets"] for p in b["parameters"]) == list(range(8)) and len(info["buckets"]) == 3
    trainer, summary = run_solo(overrides("mnist", data_dir, tmp_path / "b", "exdyna"))
    info = json.loads((trainer.run_dir / "reducer.json").read_text())
    assert summary["scope"] == info["scope"] == "model" and "buckets" not in info


@pytest.mark.parametrize("setting,message", [
    ("reducer.scope=layer", "reducer.scope must be one of ['auto', 'bucket', 'model'], got 'layer'"),
    ("reducer.bucket_mb=0", "reducer.bucket_mb must be a positive number of megabytes, got 0.0"),
])
def test_bad_scope_settings_are_one_line(data_dir, tmp_path, setting, message):
    with pytest.raises(ConfigError) as error:
        Trainer(load_config(None, overrides("mnist", data_dir, tmp_path, "topk", [setting])), join("cpu"))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_method_with_its_own_overlap_keeps_it(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="'omgs' overlaps its exchange with backward by its own parameter hooks"):
        Trainer(load_config(None, overrides("mnist", data_dir, tmp_path, "omgs", ["reducer.scope=bucket"])),
                join("cpu"))
