"""The training loop end to end: every task on tiny data in the real formats, records, exact
resume across 2 gloo workers, real MovieLens 100K, and bad input."""
import json
import math
import signal

import pytest
import torch
import yaml

import tiny_data
import train_scenarios as ts
from run_dirs import assert_same_records
from shared_data import SHARED_DATA
from sparsecomm.train.checkpoint import CheckpointError
from sparsecomm.train.cli import main as cli_main
from sparsecomm.config import ConfigError, load_config
from sparsecomm.launch.job import join
from sparsecomm.train.loop import Stopped, Trainer


TRAIN_KEYS = {"step", "epoch", "loss", "lr", "density", "local_density", "bytes_sent", "bytes_wire", "t_forward",
              "t_backward", "t_select", "t_comm", "t_step", "t_data", "time"}

# task -> (model, model options, extra overrides, evaluation keys)
TASKS = {
    "cifar10": ("resnet20", {}, ["data.batch_size=8"], {"accuracy", "top5"}),
    "cifar100": ("resnet20", {}, ["data.batch_size=8"], {"accuracy", "top5"}),
    "mnist": ("mnist_cnn", {}, ["data.batch_size=16"], {"accuracy"}),
    "fashion-mnist": ("mnist_cnn", {}, ["data.batch_size=16"], {"accuracy"}),
    "ptb": ("lstm_lm", {"emsize": 16, "nhid": 16, "nlayers": 2, "dropout": 0.2}, ["data.batch_size=4",
            "task_options.bptt=8", "clip_norm=0.5"], {"perplexity"}),
    "wikitext2": ("lstm_lm", {"emsize": 16, "nhid": 16, "nlayers": 1, "dropout": 0.0}, ["data.batch_size=4",
                  "task_options.bptt=8", "data.eval_batch_size=3"], {"perplexity"}),
    "ml-100k": ("neumf", {"factors": 8, "mlp_layers": [16, 8]}, ["data.batch_size=128", "optimizer.name=adam",
                "optimizer.lr=0.01"], {"hr@10", "ndcg@10"}),
    "ml-1m": ("neumf", {"factors": 8, "mlp_layers": [16, 8]}, ["data.global_batch_size=256", "optimizer.name=adam",
              "optimizer.lr=0.01"], {"hr@10", "ndcg@10"}),
    "ml-20m": ("neumf", {"factors": 8, "mlp_layers": [16, 8]}, ["data.batch_size=128", "optimizer.name=adam",
               "optimizer.lr=0.01"], {"hr@10", "ndcg@10"}),
    "logreg": ("logreg", {}, ["task_options.path=tiny.svm", "task_options.l2=0.001", "data.batch_size=16",
               "optimizer.lr=0.5"], {"accuracy", "loss"}),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tiny_data.write_all(tmp_path_factory.mktemp("data"))


def overrides(task, data_dir, out, reducer="exdyna", extra=(), epochs=1):
    model, options, task_extra, _ = TASKS[task]
    return [f"task={task}", f"model={model}", f"model_options={json.dumps(options)}", f"data.dir={data_dir}",
            f"output_dir={out}", f"reducer.name={reducer}", "reducer.density=0.05", f"epochs={epochs}",
            "optimizer.lr=0.05", "records.log_every=2", "records.progress=false", *task_extra, *extra]


def run_solo(ov, fresh=False):
    """Train in this process; returns (trainer, summary), summary None when stopped early."""
    cfg = load_config(None, ov)
    trainer = Trainer(cfg, join("cpu"), fresh=fresh)
    try:
        return trainer, trainer.run()
    except Stopped:
        return trainer, None


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_trains_evaluates_and_records(task, data_dir, tmp_path, accept_tiny_cifar):
    trainer, summary = run_solo(overrides(task, data_dir, tmp_path))
    run = trainer.run_dir
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if "split" not in l]
    evals = [l for l in lines if "split" in l]
    assert train and TRAIN_KEYS <= set(train[0]), set(train[0]) ^ TRAIN_KEYS
    assert "threshold" in train[0] and "residual_norm" in train[0]
    assert evals and TASKS[task][3] <= set(evals[0]), evals[0]
    assert all(math.isfinite(l["loss"]) for l in train)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["environment"]["world_size"] == 1 and config["task"] == task and "git_commit" in config["environment"]
    saved = json.loads((run / "summary.json").read_text())
    for key in ("final", "best", "mean_density", "total_bytes_sent", "wall_time", "time_to_best"):
        assert key in saved
    assert saved["total_bytes_sent"] > 0 and 0 < saved["mean_density"] <= 1
    described = json.loads((run / "reducer.json").read_text())  # which method, built how, and what it chose
    assert described["method"] == "exdyna" and described["selection"] in ("fused", "torch")
    assert described["warm_start"] is True and described["step"] >= 1


def test_a_run_shorter_than_log_every_still_gets_its_training_line(data_dir, tmp_path):
    """The steps after the last training line are averaged into one more at the run's end."""
    trainer, summary = run_solo(overrides("mnist", data_dir, tmp_path, extra=["records.log_every=1000"]))
    lines = [json.loads(l) for l in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    [train] = [l for l in lines if "split" not in l]
    assert train["step"] == summary["steps"] < 1000
    assert train["density"] == pytest.approx(summary["mean_density"]) and train["t_forward"] > 0


def test_a_run_stopped_at_max_steps_reports_and_is_not_complete(data_dir, tmp_path):
    """A stop at max_steps writes a training line (even between log_every lines), evaluates and
    writes its summary, which says it is not complete; the same command again (or one with an
    earlier max_steps) trains nothing; a later command with a schedule that ends before the
    checkpoint is refused in one line; one that ends there trains nothing."""
    ov = overrides("logreg", data_dir, tmp_path, extra=["records.log_every=1000"], epochs=2)
    trainer, summary = run_solo(ov + ["max_steps=3"])
    assert summary is None and trainer.step == 3
    lines = [json.loads(l) for l in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(l["step"], "split" in l) for l in lines] == [(3, False), (3, True)]
    saved = json.loads((trainer.run_dir / "summary.json").read_text())
    assert saved["complete"] is False and saved["steps"] == 3 and saved["final"]["train"]["accuracy"] >= 0
    assert saved["total_steps"] == 2 * trainer.steps_per_epoch and saved["time_split"]["t_forward"] > 0
    for stop in (3, 2):  # the same command again, or an earlier stop: nothing trained, the records as they were
        again, summary = run_solo(ov + [f"max_steps={stop}"])
        assert again.step == 3 and summary["steps"] == 3 and summary["complete"] is False
        assert len((trainer.run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    short = 2 / trainer.steps_per_epoch  # 2 steps: ends before the checkpoint at step 3
    with pytest.raises(ConfigError, match=r"is at step 3, past the end of this schedule \(step 2: epochs"):
        run_solo(overrides("logreg", data_dir, tmp_path, extra=["records.log_every=1000"], epochs=short))
    ended, summary = run_solo(overrides("logreg", data_dir, tmp_path, extra=["records.log_every=1000"], epochs=2))
    assert summary["complete"] and summary["steps"] == 2 * trainer.steps_per_epoch
    again, summary = run_solo(overrides("logreg", data_dir, tmp_path, extra=["records.log_every=1000"], epochs=2))
    assert summary["complete"] and again.meter.totals["steps"] == ended.meter.totals["steps"], "nothing trained"


def test_a_signal_stop_evaluates_when_asked(clusters, data_dir, tmp_path):
    ov = overrides("logreg", data_dir, tmp_path, extra=["records.eval_on_stop=true", "records.log_every=1000"])
    [first] = clusters(1).run(ts.train, ov, signal_rank=0, signal_step=1, signum=signal.SIGTERM)
    run_dir = next(tmp_path.iterdir())
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert first["step"] == 2 and [l["step"] for l in lines if "split" in l] == [2]
    assert not [l for l in lines if "split" not in l], "a signal stop keeps its window in the checkpoint"


def test_the_closing_lines_say_what_a_run_reached_and_cost():
    from sparsecomm.train.report import report

    summary = {"run": "r", "steps": 94, "total_steps": 100, "complete": False, "wall_time": 75.0,
               "metric": "accuracy", "final": {"test": {"accuracy": 0.91234}}, "reducer": "exdyna",
               "best": {"value": 0.92, "epoch": 0.512345}, "target_density": 0.001, "mean_density": 0.00123,
               "bytes_sent_per_step": 2048.0, "total_bytes_sent": 192512.0, "warnings": ["off target"],
               "time_split": {"t_data": 0.001, "t_forward": 0.01, "t_backward": 0.02, "t_select": 0.001,
                              "t_comm": 0.002, "t_step": 0.001}}
    text = report(summary, "/runs")
    assert text.splitlines()[0] == "stopped before the end: r at step 94 of 100 after 1 min 15 s, in /runs"
    assert "final 0.9123 (test); best 0.92 at epoch 0.512" in text and "0.00123 (target 0.001)" in text
    assert "2.05 kB sent per worker per step, 193 kB in all" in text and "per step   35 ms: data 1 ms" in text
    overlapped = report({**summary, "scope": "bucket"}, "/runs")
    assert "per step   parts adding to 35 ms, select and communicate beside backward (bucket scope): data 1 ms" \
        in overlapped
    assert "off target" not in text, "the warnings are logged once, when the summary is written"
    assert "not evaluated" in report({**summary, "final": {}, "best": None, "complete": True}, "/runs")
    cast = report({**summary, "reducer": "fp16", "uses_density": False, "mean_density": 1.0,
                   "mean_target_density": 1.0}, "/runs")
    assert "1 (fp16 does not use the density setting 0.001)" in cast
    chosen = report({**summary, "reducer": "accordion", "uses_density": False, "mean_target_density": 0.4321}, "/runs")
    assert "(target 0.4321 on average, chosen by accordion; the density setting 0.001 was not used)" in chosen
    warm = report({**summary, "reducer": "dgc", "uses_density": True, "mean_target_density": 0.02}, "/runs")
    assert "(target 0.02 on average, chosen by dgc; density setting 0.001)" in warm
    assert "(target 0.001)" in report({**summary, "uses_density": True, "mean_target_density": 0.001}, "/runs")


def final_state(run_dir):
    ck = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    folder = run_dir / "checkpoints" / ck["tag"]
    shared = torch.load(folder / "shared.pt", weights_only=True)
    ranks = [torch.load(folder / f"rank-{r}.pt", weights_only=True) for r in range(2)]
    return shared, ranks


def assert_same_end(a_dir, b_dir, stopped_at=None):
    """The same parameters, residuals and records; ``b`` may have more lines at ``stopped_at``
    (a stop at max_steps writes a training line and evaluates)."""
    (sa, ra), (sb, rb) = final_state(a_dir), final_state(b_dir)
    assert sa["step"] == sb["step"]
    for key in sa["model"]:
        assert torch.equal(sa["model"][key], sb["model"][key]), f"parameter {key} differs"
    for r in range(2):
        a_res, b_res = ra[r]["reducer"]["residual"], rb[r]["reducer"]["residual"]
        assert (a_res is None and b_res is None) or torch.equal(a_res, b_res), f"rank {r} residual differs"
    assert_same_records(a_dir, b_dir, stopped_at)


SIGNAL_STOPS = {"SIGTERM to rank 1": (1, signal.SIGTERM), "Ctrl-C (SIGINT to every rank)": (-1, signal.SIGINT),
                "SIGUSR1 to rank 0": (0, signal.SIGUSR1)}


@pytest.mark.parametrize("task,stop", [("mnist", "max_steps"), ("ptb", "max_steps"), ("mnist", "damaged latest"),
                                       *(("mnist", s) for s in SIGNAL_STOPS)])
def test_stopped_and_resumed_run_ends_bit_identical(clusters, data_dir, tmp_path, task, stop):
    """2 gloo workers: an interrupted run, resumed, ends exactly where an uninterrupted one does;
    also when its latest checkpoint was damaged and it resumes from the one before."""
    c = clusters(2)
    base = overrides(task, data_dir, tmp_path / "straight", epochs=1.5)
    straight = c.run(ts.train, base)
    assert all(s["complete"] for s in straight)
    resumed_ov = overrides(task, data_dir, tmp_path / "resumed", epochs=1.5)
    if stop in SIGNAL_STOPS:
        rank, signum = SIGNAL_STOPS[stop]
        first = c.run(ts.train, resumed_ov, signal_rank=rank, signal_step=2, signum=signum)  # during step 3
    else:
        first = c.run(ts.train, resumed_ov + ["max_steps=5"])
    assert all("stopped" in f for f in first), first
    assert {f["step"] for f in first} == {3 if stop in SIGNAL_STOPS else 5}, "every rank stops at the same step"
    if stop in SIGNAL_STOPS:
        assert {f["signum"] for f in first} == {SIGNAL_STOPS[stop][1]}
    if stop == "damaged latest":  # steps 4 (epoch end) and 5 (max_steps) are kept; rank 1's file of 5 is cut
        checkpoints = next((tmp_path / "resumed").iterdir()) / "checkpoints"
        assert sorted(p.name for p in checkpoints.iterdir()) == ["latest.json", "step-000000004", "step-000000005"]
        damaged = checkpoints / "step-000000005" / "rank-1.pt"
        damaged.write_bytes(damaged.read_bytes()[:100])
    second = c.run(ts.train, resumed_ov)
    assert all(s["complete"] for s in second)
    run = lambda root: next(root.iterdir())  # noqa: E731
    assert_same_end(run(tmp_path / "straight"), run(tmp_path / "resumed"), 5 if stop == "max_steps" else None)


@pytest.mark.skipif(not (SHARED_DATA / "movielens-100k" / "ml-100k.zip").is_file(), reason="../shared/data absent")
def test_movielens_100k_trains_one_short_epoch_on_two_workers(clusters, tmp_path):
    import zipfile

    with zipfile.ZipFile(SHARED_DATA / "movielens-100k" / "ml-100k.zip") as z:
        z.extractall(tmp_path / "data")
    ov = ["task=ml-100k", "model=neumf", f"data.dir={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}",
          "model_options={factors: 16, mlp_layers: [64, 32, 16], dropout: 0.0}", "data.global_batch_size=32768",
          "optimizer.name=adam", "optimizer.lr=0.005", "optimizer.betas=[0.25, 0.5]", "reducer.name=exdyna",
          "reducer.density=0.05", "epochs=1", "records.progress=false", "records.log_every=5"]
    results = clusters(2).run(ts.train, ov)
    test = results[0]["final"]["test"]
    for key in ("hr@10", "ndcg@10"):
        assert results[1]["final"]["test"][key] == test[key], "both ranks report the same evaluation"
    assert results[0]["steps"] == (99_057 * 5 // 2) // 16_384
    assert 0.0 < test["hr@10"] <= 1.0 and 0.0 < test["ndcg@10"] <= test["hr@10"]


def test_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prepare_dataset\.sh --data-dir \S+ mnist"):
        run_solo(overrides("mnist", tmp_path / "empty", tmp_path))
    with pytest.raises(FileNotFoundError, match=r"prepare_dataset\.sh --data-dir \S+ ptb"):
        run_solo(overrides("ptb", tmp_path / "empty", tmp_path))
    with pytest.raises(FileNotFoundError, match=r"prepare_dataset\.sh --data-dir \S+ ml-1m"):
        run_solo(overrides("ml-1m", tmp_path / "empty", tmp_path))


def test_corrupt_file_is_named(tmp_path):
    root = tiny_data.write_mnist(tmp_path / "data")
    path = root / "mnist" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz"):
        run_solo(overrides("mnist", root, tmp_path))


def test_unknown_model_task_or_preset(data_dir, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown model 'resnet19'; available: .*resnet18"):
        run_solo(overrides("mnist", data_dir, tmp_path) + ["model=resnet19"])
    with pytest.raises(ValueError, match="unknown task 'imagenet'; available: cifar10"):
        run_solo(overrides("mnist", data_dir, tmp_path) + ["task=imagenet"])
    assert cli_main(["--preset", "resnet18-imagenet"]) == 2
    assert "unknown preset 'resnet18-imagenet'; available: " in capsys.readouterr().err
    assert cli_main(["--preset", "mnist-cnn", "--set", "optimizer.momentun=0.9"]) == 2
    assert "unknown setting 'optimizer.momentun'" in capsys.readouterr().err


def test_truncated_checkpoint_is_named_on_resume(data_dir, tmp_path):
    ov = overrides("mnist", data_dir, tmp_path, extra=["max_steps=2"])
    trainer, _ = run_solo(ov)
    folder = next(p for p in (trainer.run_dir / "checkpoints").iterdir() if p.is_dir())
    (folder / "rank-0.pt").write_bytes((folder / "rank-0.pt").read_bytes()[:64])
    with pytest.raises(CheckpointError, match=r"rank-0.pt cannot be read"):
        run_solo(ov)
    trainer, _ = run_solo(ov, fresh=True)  # --fresh ignores it
    assert trainer.step == 2


def test_resume_refuses_other_settings(data_dir, tmp_path):
    ov = overrides("mnist", data_dir, tmp_path, extra=["max_steps=2", "name=fixed"])
    run_solo(ov)
    with pytest.raises(ValueError, match="other settings \\(optimizer differ\\)"):
        run_solo(ov + ["optimizer.lr=0.5"])


def test_fresh_moves_the_earlier_run_aside(data_dir, tmp_path, caplog):
    ov = overrides("mnist", data_dir, tmp_path, extra=["name=kept"])
    first, summary = run_solo(ov)
    before = (first.run_dir / "summary.json").read_text()
    with caplog.at_level("WARNING"):
        second, _ = run_solo(ov, fresh=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("kept.")]
    assert len(aside) == 1 and (aside[0] / "summary.json").read_text() == before
    assert (aside[0] / "checkpoints" / "latest.json").is_file()
    assert f"moved aside to {aside[0]}" in caplog.text
    assert second.run_dir == first.run_dir and (second.run_dir / "summary.json").is_file()


def test_records_without_a_checkpoint_are_kept_too(data_dir, tmp_path):
    ov = overrides("mnist", data_dir, tmp_path, extra=["name=kept"])
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    run_solo(ov)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("kept.")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n'


def test_density_far_off_target_is_warned_in_the_summary(data_dir, tmp_path):
    # thresh with a fixed threshold that nothing reaches sends one coordinate per step at most
    _, summary = run_solo(overrides("mnist", data_dir, tmp_path, reducer="thresh",
                                    extra=["reducer.options={threshold: 1.0e+6}"]))
    assert summary["warnings"] and "off the target 0.05" in summary["warnings"][0]
    _, dense = run_solo(overrides("mnist", data_dir, tmp_path, reducer="exact"))
    assert dense["warnings"] == []


def test_listings_and_help_are_plain_text(capsys):
    from sparsecomm import reducers

    assert cli_main(["--list-reducers"]) == 0
    listing = capsys.readouterr().out
    for name in reducers.available():
        assert f"\n{name} " in "\n" + listing, name
    assert "num_blocks=1024, block_align=32" in listing and "rank=2" in listing
    assert cli_main(["--list-presets"]) == 0
    presets = capsys.readouterr().out
    assert "mnist-cnn" in presets and "small CNN on MNIST, quick CPU runs" in presets
    with pytest.raises(SystemExit) as done:
        cli_main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text and "--list-reducers" in text and "Ctrl-C" in text
    assert cli_main([]) == 2
    assert "no preset given: name one with --preset NAME (--list-presets shows them)" in capsys.readouterr().err


def test_rank_0_projects_the_run_length(data_dir, tmp_path, caplog):
    with caplog.at_level("INFO"):
        run_solo(overrides("mnist", data_dir, tmp_path, reducer="exact", epochs=4))  # 8 steps per epoch
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("projected")]
    assert line.startswith("projected from steps 6-30: ") and "per epoch (8 steps)" in line
    assert "for the remaining 2 steps" in line


def test_evaluation_every_few_steps(data_dir, tmp_path):
    """records.eval_every_steps adds evaluations between the epochs' (none twice at one step)."""
    trainer, summary = run_solo(overrides("logreg", data_dir, tmp_path, extra=["records.eval_every_steps=3"],
                                          epochs=2))
    per_epoch = trainer.steps_per_epoch
    steps = [e["step"] for e in trainer.evaluator.results if e["split"] == trainer.task.metric_split]
    expected = sorted(set(range(3, 2 * per_epoch + 1, 3)) | {per_epoch, 2 * per_epoch})
    assert steps == expected and len(steps) > 2
    with pytest.raises(ConfigError, match="records.eval_every_steps must be >= 0"):
        load_config(None, overrides("logreg", data_dir, tmp_path, extra=["records.eval_every_steps=-1"])).validate()
