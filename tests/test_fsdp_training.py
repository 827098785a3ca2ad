"""The training loop with ``parallel=fsdp``: the model split into FSDP units, the method as
their reduce-scatter, on 2 gloo workers and tiny data: records that say so, resume that ends
bit-identical, and the refusals."""
import json

import pytest
import torch

import tiny_data
import train_scenarios as ts
from run_dirs import assert_same_records
from sparsecomm.config import ConfigError, load_config
from sparsecomm.launch.job import join
from sparsecomm.train.checks import check_run
from sparsecomm.train.loop import Trainer

TASKS = {
    "mnist": ("mnist_cnn", {}, ["data.batch_size=16"]),
    "ptb": ("lstm_lm", {"emsize": 16, "nhid": 16, "nlayers": 2, "dropout": 0.2}, ["data.batch_size=4",
            "task_options.bptt=8", "clip_norm=0.5"]),
    "ml-100k": ("neumf", {"factors": 8, "mlp_layers": [16, 8]}, ["data.batch_size=128", "optimizer.name=adam",
                "optimizer.lr=0.01"]),  # a ModuleList of units; Adam's state in shards
    "logreg": ("logreg", {}, ["task_options.path=tiny.svm", "task_options.l2=0.001", "data.batch_size=16"]),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data.write_all(tmp_path_factory.mktemp("data"))


def overrides(task, data_dir, out, reducer="exdyna", extra=(), epochs=1.0):
    model, options, task_extra = TASKS[task]
    return [f"task={task}", f"model={model}", f"model_options={json.dumps(options)}", f"data.dir={data_dir}",
            f"output_dir={out}", f"reducer.name={reducer}", "reducer.density=0.05", f"epochs={epochs}",
            "optimizer.lr=0.05", "optimizer.momentum=0.9", "records.log_every=2", "records.progress=false",
            "parallel=fsdp", *task_extra, *extra]


def final_state(run_dir):
    ck = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    folder = run_dir / "checkpoints" / ck["tag"]
    return [torch.load(folder / f"rank-{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("task,reducer", [("mnist", "exdyna"), ("ptb", "powersgd"), ("ml-100k", "topk")])
def test_sharded_run_records_and_resumes_bit_identical(clusters, data_dir, tmp_path, task, reducer):
    c = clusters(2)
    straight = c.run(ts.train, overrides(task, data_dir, tmp_path / "straight", reducer, epochs=1.5))
    assert all(s["complete"] and s["parallel"] == "fsdp" and s["scope"] == "module" for s in straight)
    assert straight[0]["final"], "the sharded model was evaluated"
    assert straight[0]["total_bytes_sent"] > 0, "the method reduced"
    if reducer != "powersgd":
        assert 0 < straight[0]["mean_density"] < 0.5, straight[0]["mean_density"]
    resumed_ov = overrides(task, data_dir, tmp_path / "resumed", reducer, epochs=1.5)
    first = c.run(ts.train, resumed_ov + ["max_steps=5"])
    assert {f["step"] for f in first} == {5}
    second = c.run(ts.train, resumed_ov)
    assert all(s["complete"] for s in second)
    a_dir, b_dir = (next((tmp_path / d).iterdir()) for d in ("straight", "resumed"))
    assert (a_dir / "reducer.json").exists() and json.loads((a_dir / "reducer.json").read_text())["parallel"] == "fsdp"
    for r, (a, b) in enumerate(zip(final_state(a_dir), final_state(b_dir), strict=True)):
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), f"rank {r}: parameter shard {key} differs"
        for unit, saved in a["reducer"]["modules"].items():
            x, y = saved["reducer"]["residual"], b["reducer"]["modules"][unit]["reducer"]["residual"]
            assert (x is None and y is None) or torch.equal(x, y), f"rank {r}: residual of {unit} differs"
    assert_same_records(a_dir, b_dir, 5)


def test_sharded_needs_two_real_processes(data_dir, tmp_path):
    cfg = load_config(None, overrides("mnist", data_dir, tmp_path))
    with pytest.raises(ConfigError, match="parallel=fsdp shards the model over real processes"):
        check_run(cfg, workers=4, virtual=True)
    with pytest.raises(ConfigError, match="parallel=fsdp needs at least 2 processes .* got 1"):
        Trainer(cfg, join("cpu"))


@pytest.mark.parametrize("scope", ["bucket", "model"])
def test_a_scope_of_its_own_is_refused_when_sharded(data_dir, tmp_path, scope):
    """Under FSDP each unit is reduced as its reduce-scatter: neither DDP-like buckets nor one
    reduce of the whole model after backward exists there."""
    cfg = load_config(None, overrides("mnist", data_dir, tmp_path, reducer="topk", extra=[f"reducer.scope={scope}"]))
    with pytest.raises(ConfigError, match=f"reducer.scope={scope}: under parallel=fsdp each FSDP unit is reduced"):
        check_run(cfg)


def test_unknown_parallel_is_named(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"parallel must be one of \['replicated', 'fsdp'\], got 'tp'"):
        load_config(None, overrides("mnist", data_dir, tmp_path) + ["parallel=tp"]).validate()


def test_a_penalty_on_the_parameters_is_refused(data_dir, tmp_path):
    cfg = load_config(None, overrides("logreg", data_dir, tmp_path))
    with pytest.raises(ConfigError, match="task logreg's l2 penalty reads the parameters outside forward"):
        check_run(cfg)
