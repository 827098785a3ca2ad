"""``python -m sparsecomm plot``: which files, titles, legend labels and tick formatters it
gives for real run directories (made by the trainer on tiny data), and how it treats
interrupted, empty and foreign directories. Checks the figures' objects, not pixels."""
import json
import logging
from pathlib import Path

import pytest
from matplotlib.ticker import EngFormatter

import tiny_data
from sparsecomm.tools.plot import FIGURES, figures, labels, main, plot_runs
from sparsecomm.tools.runs import Run, load_run
from run_dirs import cut_short
from test_training import overrides, run_solo


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Real runs: mnist exact, topk seed 0 and 1, a cut-short copy; ptb topk."""
    root = tmp_path_factory.mktemp("plot")
    data = tiny_data.write_corpus(tiny_data.write_mnist(root / "data"), "ptb")
    out = root / "runs"
    made = {}
    for key, task, reducer, extra in (("exact", "mnist", "exact", []), ("topk", "mnist", "topk", []),
                                      ("topk1", "mnist", "topk", ["seed=1"]), ("ptb", "ptb", "topk", [])):
        epochs = 2 if task == "mnist" else 1
        trainer, _ = run_solo(overrides(task, data, out, reducer=reducer, extra=extra, epochs=epochs))
        made[key] = trainer.run_dir
    made["cut"] = cut_short(made["topk"], out / "mnist-topk-interrupted", keep_lines=5)
    made["root"] = out
    return made


def legend(fig) -> list[str]:
    found = fig.axes[0].get_legend() or (fig.legends[0] if fig.legends else None)
    return [t.get_text() for t in found.get_texts()]


def test_one_set_of_titled_figures_per_task(runs, tmp_path, caplog):
    written = plot_runs([runs["root"]], tmp_path / "fig")  # a folder of runs stands for its runs
    assert sorted(p.name for p in written) == sorted(f"{task}-{name}.png" for task in ("mnist", "ptb")
                                                     for name in FIGURES)
    assert all(p.stat().st_size > 5000 for p in written)
    drawn = figures([load_run(runs[k]) for k in ("exact", "topk", "ptb")])
    for name, fig in drawn.items():
        title = fig.axes[0].get_title()
        assert title.startswith(name.split("-")[0] + ":"), (name, title)
    assert "test accuracy" in drawn["mnist-metric_vs_epoch.png"].axes[0].get_title()
    assert "perplexity" in drawn["ptb-metric_vs_epoch.png"].axes[0].get_title()
    # the ptb run sits in its own figures, not among the mnist runs
    assert legend(drawn["mnist-density_vs_step.png"]) == ["exact (dense)", "topk c=0.05"]
    assert legend(drawn["ptb-density_vs_step.png"]) == ["topk c=0.05"]


def test_labels_name_what_differs(runs):
    exact, topk, topk1 = (load_run(runs[k]) for k in ("exact", "topk", "topk1"))
    assert labels([exact, topk, topk1]) == ["exact (dense), seed=0", "topk c=0.05, seed=0", "topk c=0.05, seed=1"]
    fig = figures([exact, topk])["mnist-metric_vs_epoch.png"]
    assert legend(fig) == ["exact (dense)", "topk c=0.05"]  # reducer settings mean nothing for exact


def synthetic(name: str, **config) -> Run:
    base = {"task": "mnist", "model": "mnist_cnn", "seed": 0, "optimizer": {"lr": 0.1},
            "reducer": {"name": "topk", "density": 0.01, "error_feedback": True, "options": {}},
            "environment": {"world_size": 4, "host": name}, "output_dir": f"/out/{name}"}
    for key, value in config.items():
        section, _, inner = key.partition("__")
        if inner:
            base[section] = {**base[section], inner: value}
        else:
            base[section] = value
    return Run(Path("/runs") / name, base, [], [], None)


def test_labels_for_workers_lr_options_and_look_alikes():
    a = synthetic("a")
    b = synthetic("b", environment={"world_size": 8, "host": "x"}, optimizer__lr=0.2)
    c = synthetic("c", reducer__options={"blocks": 4}, reducer__error_feedback=False)
    assert labels([a, b, c]) == ["topk c=0.01, P=4, lr=0.1", "topk c=0.01, P=8, lr=0.2",
                                 "topk c=0.01 noef, P=4, lr=0.1, blocks=4"]
    # settings alike, hosts and output folders aside: the directory name tells them apart
    assert labels([synthetic("a"), synthetic("b")]) == ["topk c=0.01 [a]", "topk c=0.01 [b]"]
    # where the last command stopped is not a setting of the run ("max_steps=None" beside "max_steps=60")
    assert labels([synthetic("a", seed=0, max_steps=None), synthetic("b", seed=1, max_steps=60)]) == \
        ["topk c=0.01, seed=0", "topk c=0.01, seed=1"]


def test_ticks_carry_units(runs):
    drawn = figures([load_run(runs[k]) for k in ("exact", "topk")])
    bytes_axis = drawn["mnist-metric_vs_bytes.png"].axes[0].xaxis
    assert isinstance(bytes_axis.get_major_formatter(), EngFormatter) and bytes_axis.get_major_formatter().unit == "B"
    assert "SI" in bytes_axis.get_label_text()
    time_axis = drawn["mnist-time_breakdown.png"].axes[0].xaxis
    assert time_axis.get_major_formatter().unit == "s"
    assert time_axis.get_major_formatter()(0.0125) == "12.5 ms"
    step_axis = drawn["mnist-density_vs_step.png"].axes[0].xaxis
    assert step_axis.get_major_formatter()(12345.0) == "12,345"


def test_interrupted_and_empty_runs_warn_and_plot_what_they_have(runs, tmp_path, caplog):
    empty = tmp_path / "runs" / "starting"
    empty.mkdir(parents=True)
    (empty / "config.yaml").write_text((runs["exact"] / "config.yaml").read_text())
    (empty / "metrics.jsonl").write_text("")
    with caplog.at_level(logging.WARNING, logger="sparsecomm"):
        written = plot_runs([runs["exact"], runs["cut"], empty], tmp_path / "fig")
    warned = {r.getMessage().split(":")[0]: r.getMessage() for r in caplog.records if r.levelno == logging.WARNING}
    assert set(warned) == {str(runs["cut"]), str(empty)}
    assert "cut short" in warned[str(runs["cut"])] and "no summary.json" in warned[str(runs["cut"])]
    assert "no metrics lines" in warned[str(empty)]
    assert len(written) == 4
    drawn = figures([load_run(d) for d in (runs["exact"], runs["cut"], empty)])
    density = legend(drawn["mnist-density_vs_step.png"])
    assert len(density) == 2 and density[0] == "exact (dense)"  # the empty run has nothing to draw
    cut_points = drawn["mnist-density_vs_step.png"].axes[0].get_lines()[1].get_xdata()
    assert list(cut_points) == [2, 4, 6, 8]  # the lines before the cut (the 5th line is an evaluation)


def test_not_a_run_is_skipped_and_no_run_exits_2(runs, tmp_path, caplog, capsys):
    stray = tmp_path / "notes"
    stray.mkdir()
    (stray / "readme.txt").write_text("not a run")
    with caplog.at_level(logging.WARNING, logger="sparsecomm"):
        assert main([str(runs["ptb"]), str(stray), str(tmp_path / "missing"), "--out", str(tmp_path / "fig")]) == 0
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith(f"{stray}: not a run directory") for m in messages)
    assert any(m.startswith(f"{tmp_path / 'missing'}: no such directory") for m in messages)
    out = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in out) == sorted(f"ptb-{name}.png" for name in FIGURES)
    assert main([str(stray), "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no run directory among") and str(stray) in err[0]
    assert not (tmp_path / "none").exists()


def test_cut_short_copy_matches_its_source(runs):
    """The hand-cut run is what the reader says: fewer lines, no summary, in progress."""
    cut, full = load_run(runs["cut"]), load_run(runs["topk"])
    assert cut.status == "in progress" and full.status == "complete"
    assert cut.train == full.train[:len(cut.train)] and len(cut.train) < len(full.train)
    assert json.loads((runs["topk"] / "summary.json").read_text())["complete"]


def test_many_runs_get_a_legend_beside_the_axes():
    runs = [synthetic(f"r{i}", seed=i) for i in range(12)]
    for run in runs:
        run.train = [{"step": s, "epoch": s / 10, "density": 0.01, "t_comm": 0.001} for s in (10, 20)]
    fig = figures(runs)["mnist-density_vs_step.png"]
    assert fig.axes[0].get_legend() is None and len(fig.legends) == 1
    assert legend(fig) == [f"topk c=0.01, seed={i}" for i in range(12)]
    assert [line.get_linestyle() for line in fig.axes[0].get_lines()][9:11] == ["-", "--"]


def test_figures_go_beside_the_runs_unless_told(runs, tmp_path, monkeypatch, capsys):
    """Without --out the figures are written into figures/ of the folder holding the runs, not
    into the current directory (the repository, for a user following the README)."""
    monkeypatch.chdir(tmp_path)
    assert main([str(runs["exact"]), str(runs["topk"])]) == 0
    written = [Path(p) for p in capsys.readouterr().out.split()]
    assert written and {p.parent for p in written} == {runs["exact"].resolve().parent / "figures"}
    assert not (tmp_path / "figures").exists()
