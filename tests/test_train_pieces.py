"""The training loop's parts on one process: configuration, learning rate, checkpoints, records."""
import json
import logging
import os
import signal

import pytest
import torch
import yaml

from sparsecomm.train.checkpoint import CheckpointError, Checkpoints, write_atomic
from sparsecomm.config import ConfigError, OptimizerConfig, RunConfig, ScheduleConfig, apply_overrides, load_config
from sparsecomm.launch.job import Job
from sparsecomm.train.optim import LearningRate, build_optimizer, peak_lr
from sparsecomm.train.records import Recorder, check_run_dir, run_name, set_aside

SOLO = Job(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def write_preset(tmp_path, data):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_preset_and_overrides(tmp_path):
    path = write_preset(tmp_path, {"task": "mnist", "model": "mnist_cnn", "epochs": 2,
                                   "optimizer": {"lr": 0.1, "momentum": 0.9}, "reducer": {"name": "topk"}})
    cfg = load_config(path, ["optimizer.lr=0.05", "reducer.options.exchange=union", "data.batch_size=16",
                             "schedule.milestones=[1, 2]", "clip_norm=null"])
    assert cfg.optimizer.lr == 0.05 and cfg.optimizer.momentum == 0.9
    assert cfg.reducer.options == {"exchange": "union"} and cfg.reducer.name == "topk"
    assert cfg.data.batch_size == 16 and cfg.schedule.milestones == [1.0, 2.0] and cfg.epochs == 2.0
    assert cfg.to_dict()["optimizer"]["betas"] == [0.9, 0.999]


@pytest.mark.parametrize("overrides,message", [
    (["optimizer.learning_rate=1"], "unknown setting 'optimizer.learning_rate'; allowed in optimizer: name, lr"),
    (["bogus=1"], "unknown setting 'bogus'; allowed in the top level: task, model"),
    (["data.batch_size=abc"], "data.batch_size must be an integer, got 'abc'"),
    (["records.progress=3"], "records.progress must be true or false"),
    (["optimizer.lr"], "is not of the form section.key=value"),
    (["epochs=2", "epochs.x=1"], "'epochs' is not a section"),
    (["epochs.x=1"], "epochs must be a number"),
])
def test_bad_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, ["task=mnist", "model=mnist_cnn"] + overrides)


def test_validation_and_missing_preset(tmp_path):
    with pytest.raises(ConfigError, match="task is not set; model is not set"):
        load_config(None, []).validate()
    with pytest.raises(ConfigError, match="optimizer.name must be one of"):
        load_config(None, ["task=a", "model=b", "optimizer.name=lamb"]).validate()
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_apply_overrides_leaves_the_input_alone():
    data = {"a": {"b": 1}}
    out = apply_overrides(data, ["a.b=2", "a.c.d=x"])
    assert data == {"a": {"b": 1}} and out == {"a": {"b": 2, "c": {"d": "x"}}}


def test_learning_rate_scaling_warmup_and_decay():
    cfg = OptimizerConfig(lr=0.1, reference_batch=128, scale_with_workers=True)
    peak = peak_lr(cfg, batch_size=32, workers=8)
    assert peak == pytest.approx(0.2)
    lr = LearningRate(peak, base=0.1, cfg=ScheduleConfig(warmup_epochs=5, milestones=[150, 250], gamma=0.1))
    assert lr(0) == pytest.approx(0.1) and lr(2.5) == pytest.approx(0.15) and lr(5) == pytest.approx(0.2)
    assert lr(149.9) == pytest.approx(0.2) and lr(150) == pytest.approx(0.02) and lr(260) == pytest.approx(0.002)
    assert LearningRate(1.0, 1.0, ScheduleConfig(milestones=[4, 5], gamma=0.5))(5.5) == pytest.approx(0.25)


def test_no_weight_decay_on_norm_and_bias():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.Linear(8, 2))
    opt = build_optimizer(model, OptimizerConfig(name="sgd", weight_decay=1e-4, decay_norm_and_bias=False,
                                                 momentum=0.9, nesterov=True), lr=0.1)
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 1e-4 and all(p.ndim > 1 for p in decayed["params"])
    assert plain["weight_decay"] == 0 and len(plain["params"]) == 4  # conv bias, bn weight + bias, linear bias
    adam = build_optimizer(model, OptimizerConfig(name="adam", betas=(0.25, 0.5)), lr=0.01)
    assert adam.param_groups[0]["betas"] == (0.25, 0.5)


def test_run_names_tell_settings_apart():
    a = load_config(None, ["task=cifar10", "model=resnet18", "reducer.name=exdyna", "reducer.density=0.001"])
    assert run_name(a, 4) == "cifar10-resnet18-exdyna-c0.001-P4-b32-seed0"
    b = load_config(None, ["task=cifar10", "model=resnet18", "name=my run/1"])
    assert run_name(b, 4) == "my_run_1"


def test_write_atomic_never_leaves_a_partial_file(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(target, broken)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]
    write_atomic(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"


def _save(ck, step, value):
    ck.save(f"step-{step}", {"model": {"w": torch.full((2,), float(value))}, "step": step},
            {"rng": torch.get_rng_state()}, {"step": step})


def test_checkpoints_keep_the_last_two_and_fall_back_from_a_damaged_one(tmp_path, caplog):
    ck = Checkpoints(tmp_path, SOLO)
    assert not ck.exists()
    for step in (1, 2, 3):
        _save(ck, step, step)
    assert sorted(p.name for p in ck.root.iterdir()) == ["latest.json", "step-2", "step-3"]
    shared, local, info = ck.load()
    assert torch.equal(shared["model"]["w"], torch.full((2,), 3.0)) and info["step"] == 3 and local["rank"] == 0
    # a truncated latest file: the previous complete checkpoint, with a warning naming the file
    path = ck.root / "step-3" / "rank-0.pt"
    path.write_bytes(path.read_bytes()[:50])
    with caplog.at_level(logging.WARNING):
        shared, _, info = ck.load()
    assert info == {"tag": "step-2", "step": 2} and torch.equal(shared["model"]["w"], torch.full((2,), 2.0))
    assert "step-3/rank-0.pt cannot be read" in caplog.text
    # an empty pointer: the newest complete checkpoint
    ck.pointer.write_text("")
    assert ck.exists() and ck.load()[2]["tag"] == "step-2"
    # nothing usable: one error naming the files
    (ck.root / "step-2" / "shared.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*step-3/rank-0.pt cannot be read.*"
                                              r"step-2/shared.pt cannot be read"):
        ck.load()


def test_checkpoints_refuse_foreign_files_and_other_world_sizes(tmp_path):
    ck = Checkpoints(tmp_path, SOLO)
    _save(ck, 1, 1)
    path = ck.root / "step-1" / "shared.pt"
    torch.save({"weights": torch.ones(1)}, path)  # a plain torch file
    with pytest.raises(CheckpointError, match=r"shared.pt is not a sparsecomm checkpoint"):
        ck.load()
    torch.save({"format": "sparsecomm.checkpoint/1", "obj": signal.Signals.SIGTERM}, path)  # weights_only refuses
    with pytest.raises(CheckpointError, match="cannot be read"):
        ck.load()
    info = json.loads(ck.pointer.read_text())
    ck.pointer.write_text(json.dumps({**info, "world": 4}))
    with pytest.raises(CheckpointError, match="written by 4 workers; this job has 1"):
        ck.load()


def test_run_names_show_what_differs_from_the_preset():
    from sparsecomm.train.presets import find_preset

    preset = find_preset("mnist-cnn")
    base = run_name(load_config(preset), 2)
    assert base == "mnist-mnist_cnn-exdyna-c0.01-P2-b64-seed0"
    assert run_name(load_config(preset, ["data.dir=/elsewhere", "epochs=7", "records.log_every=3"]), 2) == base
    lr = run_name(load_config(preset, ["optimizer.lr=0.1"]), 2)
    assert lr == base + "-lr0.1" and run_name(load_config(preset, ["optimizer.lr=0.2"]), 2) == base + "-lr0.2"
    many = load_config(preset, ["optimizer.lr=0.2", "optimizer.weight_decay=0.0005", "schedule.milestones=[1, 2]",
                                "reducer.options={num_blocks: 64}"])
    name = run_name(many, 2)
    assert name.startswith(base + "-x") and len(name) == len(base) + 10
    assert name != run_name(load_config(preset, ["optimizer.lr=0.3", "optimizer.weight_decay=0.0005",
                                                 "schedule.milestones=[1, 2]", "reducer.options={num_blocks: 64}"]), 2)


def test_set_aside_moves_an_earlier_run_and_never_overwrites(tmp_path):
    run = tmp_path / "run"
    assert set_aside(run) is None
    run.mkdir()
    assert set_aside(run) is None  # empty: nothing to keep
    (run / "metrics.jsonl").write_text("{}\n")
    first = set_aside(run)
    run.mkdir()
    (run / "summary.json").write_text("{}")
    second = set_aside(run)
    assert not run.exists() and first != second
    assert (first / "metrics.jsonl").is_file() and (second / "summary.json").is_file()
    assert first.name.startswith("run.") and second.parent == tmp_path


def test_run_directory_problems_are_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="file is a file, not a folder"):
        check_run_dir(tmp_path / "file" / "runs" / "r")
    (tmp_path / "r" / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(ConfigError, match="metrics.jsonl is a folder"):
        check_run_dir(tmp_path / "r")


def test_recorder_drops_lines_after_the_resumed_step(tmp_path):
    rec = Recorder(tmp_path, active=True)
    rec.open(None)
    for step in (10, 20, 30):
        rec.log({"step": step, "loss": 1.0})
    rec.close()
    with open(rec.metrics_path, "a") as f:
        f.write('{"step": 40, "lo')  # cut short by a kill
    rec = Recorder(tmp_path, active=True)
    rec.open(keep_until_step=20)
    rec.log({"step": 30, "loss": 0.5})
    rec.close()
    steps = [json.loads(line)["step"] for line in rec.metrics_path.read_text().splitlines()]
    assert steps == [10, 20, 30]
    assert not Recorder(tmp_path / "other", active=False).run_dir.exists()


@pytest.mark.parametrize("optimizer,ok", [
    (["optimizer.momentum=0.9"], False), (["optimizer.momentum=0", "optimizer.nesterov=true"], False),
    (["optimizer.name=adam"], False), (["optimizer.momentum=0"], True),
])
def test_a_reducer_with_its_own_momentum_needs_plain_sgd(optimizer, ok):
    """DGC applies momentum itself: with a momentum (or Nesterov, or Adam) in the optimizer too
    it would be applied twice, so the check refuses it in one line naming both ways out; with
    the reducer's momentum off, any optimizer goes."""
    from sparsecomm.train.checks import check_run

    cfg = load_config(None, ["task=logreg", "model=logreg", "task_options.path=x.svm", "reducer.name=dgc", *optimizer])
    if ok:
        check_run(cfg)
    else:
        with pytest.raises(ConfigError, match=r"reducer 'dgc' applies momentum itself, so the optimizer must be "
                                              r"plain SGD, got .*reducer.options=\{momentum: 0\}$"):
            check_run(cfg)
    check_run(load_config(None, ["task=logreg", "model=logreg", "task_options.path=x.svm", "reducer.name=dgc", "reducer.options={momentum: 0}",
                                 *optimizer]))
    check_run(load_config(None, ["task=logreg", "model=logreg", "task_options.path=x.svm", "reducer.name=topk", *optimizer]))


def test_a_warm_up_never_starts_above_its_peak():
    """At 2 workers of 32 images the CIFAR presets' peak is 0.05 under their 0.1 start: the
    warm-up starts from one worker's lr instead of descending (it drove ResNet-18's loss to 10)."""
    schedule = ScheduleConfig(warmup_epochs=5, warmup_from=0.1, milestones=[150])
    lr = LearningRate(0.05, base=0.1, cfg=schedule, workers=2)
    assert lr.lowered_start and lr(0) == pytest.approx(0.025) and lr(5) == pytest.approx(0.05)
    published = LearningRate(0.4, base=0.1, cfg=schedule, workers=16)  # the papers' 16 workers: as published
    assert not published.lowered_start and published(0) == pytest.approx(0.1)


def test_cosine_decay_after_the_warm_up():
    lr = LearningRate(0.2, base=0.1, cfg=ScheduleConfig(warmup_epochs=2, warmup_from=0.02, decay="cosine"), epochs=12)
    assert lr(0) == pytest.approx(0.02) and lr(2) == pytest.approx(0.2)
    assert lr(7) == pytest.approx(0.1) and lr(12) == pytest.approx(0.0, abs=1e-12) and lr(13) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="more epochs"):
        LearningRate(0.2, base=0.1, cfg=ScheduleConfig(warmup_epochs=2, decay="cosine"), epochs=2)
    with pytest.raises(ConfigError, match="schedule.decay must be one of"):
        RunConfig(task="mnist", model="mnist_cnn", schedule=ScheduleConfig(decay="linear")).validate()


def test_a_stop_signal_is_acknowledged_at_once_by_rank_0(capfd, monkeypatch):
    """Started without the local launcher (torchrun, SLURM, virtual workers), rank 0 says at once
    that it will checkpoint and stop (the step under way may take minutes); the other ranks say
    nothing; under the local launcher, which says it itself, rank 0 says nothing either; a second
    Ctrl-C stops at once."""
    from types import SimpleNamespace

    from sparsecomm.train.loop import LAUNCHER_SAYS_STOPS, Trainer

    def trainer(rank):
        return SimpleNamespace(_signal=None, job=Job(rank=rank, world=2, local_rank=rank, device=torch.device("cpu")))

    monkeypatch.delenv(LAUNCHER_SAYS_STOPS, raising=False)
    main = trainer(0)
    Trainer._on_signal(main, signal.SIGINT, None)
    Trainer._on_signal(trainer(1), signal.SIGTERM, None)
    err = capfd.readouterr().err
    assert err == ("rank 0 received SIGINT: checkpointing after the step under way, then stopping "
                   "(Ctrl-C again stops at once)\n")
    assert main._signal == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
        Trainer._on_signal(main, signal.SIGINT, None)
    monkeypatch.setenv(LAUNCHER_SAYS_STOPS, "1")
    Trainer._on_signal(trainer(0), signal.SIGTERM, None)
    assert capfd.readouterr().err == ""
