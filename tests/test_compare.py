"""``python -m sparsecomm compare`` and the run reader under it: one row per real run (one solo
run per reducer on tiny MNIST, one PTB run), runs cut short or resumed, the text, Markdown
and CSV outputs, and directories that are not runs."""
import json
import logging
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

import tiny_data
from sparsecomm import reducers
from sparsecomm.tools.compare import COLUMNS, load, main, table
from sparsecomm.tools.runs import Headline, Run, find_runs, load_run, task_headline
from run_dirs import cut_short
from test_training import overrides, run_solo


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """runs/: one finished MNIST run per reducer, powersgd rank 1, topk without error feedback,
    and a PTB run; apart from it: an MNIST run cut short after its first evaluation."""
    root = tmp_path_factory.mktemp("compare")
    data = tiny_data.write_corpus(tiny_data.write_mnist(root / "data"), "ptb")
    out = root / "runs"
    dirs = {}
    jobs = [(r, "mnist", r, []) for r in reducers.available()]
    jobs += [("powersgd-rank1", "mnist", "powersgd", ['reducer.options={"rank": 1}']),
             ("topk-noef", "mnist", "topk", ["reducer.error_feedback=false"]),
             ("ptb-topk", "ptb", "topk", [])]
    for name, task, reducer, extra in jobs:
        trainer, summary = run_solo(overrides(task, data, out, reducer=reducer, extra=[*extra, f"name={name}"]))
        assert summary["complete"], name
        dirs[name] = trainer.run_dir
    trainer, _ = run_solo(overrides("mnist", data, root / "long", reducer="topk", epochs=2, extra=["name=long"]))
    dirs["cut"] = cut_short(trainer.run_dir, root / "interrupted" / "topk-cut", keep_lines=5)
    dirs["root"] = out
    return dirs


def rows_by_run(df: pd.DataFrame) -> dict[str, pd.Series]:
    return {row["run"]: row for _, row in df.iterrows()}


def test_one_row_per_run_agrees_with_the_summaries(made):
    runs = load([made["root"]])  # the folder expands to its runs
    df = table(runs)
    assert list(df.columns) == list(COLUMNS)
    assert len(df) == len(reducers.available()) + 3
    assert list(df["task"]) == sorted(df["task"]), "grouped by task"
    rows = rows_by_run(df)
    for name, row in rows.items():
        summary = json.loads((made[name] / "summary.json").read_text())
        assert row["status"] == "complete" and row["steps"] == row["total_steps"] == summary["steps"]
        assert row["workers"] == 1 and row["model"] == summary["model"] and row["method"] == summary["reducer"]
        assert row["density"] == pytest.approx(summary["mean_density"])
        assert row["bytes_sent_per_step"] == pytest.approx(summary["bytes_sent_per_step"])
        assert row["bytes_wire_per_step"] == pytest.approx(summary["total_bytes_wire"] / summary["steps"])
        assert row["wall_time"] == pytest.approx(summary["wall_time"])
        assert row["metric"] == summary["metric"] and row["best"] == pytest.approx(summary["best"]["value"])
        assert row["final"] == pytest.approx(summary["final"][row["split"]][row["metric"]])
        assert all(row[t] >= 0 for t in ("t_data", "t_select", "t_comm")) and row["t_forward"] > 0
    assert rows["ptb-topk"]["metric"] == "perplexity" and not rows["ptb-topk"]["higher_is_better"]
    assert rows["ptb-topk"]["split"] == "test", "the split summary.json's best was taken from (valid is also there)"
    assert rows["exact"]["density"] == 1 and math.isnan(rows["exact"]["target_density"])
    assert rows["topk"]["target_density"] == 0.05
    assert rows["powersgd-rank1"]["options"] == "rank=1" and rows["powersgd"]["options"] == ""
    assert rows["topk-noef"]["options"] == "error_feedback=off"
    assert df.iloc[0]["run"] == "exact", "the dense baseline heads its task's table"


def test_run_in_progress_is_read_from_its_lines(made):
    cut = load_run(made["cut"])
    assert cut.status == "in progress" and cut.summary is None
    assert any("cut short" in p for p in cut.problems)
    lines = [json.loads(l) for l in (made["cut"] / "metrics.jsonl").read_text().splitlines()[:5]]
    train = [l for l in lines if "split" not in l]
    row = table([cut]).iloc[0]  # alone: the headline metric comes from the task itself
    assert (row["steps"], row["total_steps"], row["status"]) == (8, 16, "in progress")
    assert (row["metric"], row["split"]) == ("accuracy", "test")
    assert row["final"] == row["best"] == lines[4]["accuracy"]
    assert row["density"] == pytest.approx(sum(l["density"] for l in train) / len(train))
    assert row["bytes_sent_per_step"] == pytest.approx(sum(l["bytes_sent"] for l in train) / len(train))
    assert row["t_comm"] == pytest.approx(sum(l["t_comm"] for l in train) / len(train))
    assert row["wall_time"] == max(l["time"] for l in lines)


def test_headline_without_summary_comes_from_the_task():
    evals = [{"step": 4, "epoch": 1, "split": "train", "accuracy": 0.7, "loss": 0.6},
             {"step": 8, "epoch": 2, "split": "train", "accuracy": 0.8, "loss": 0.4},
             {"step": 8, "epoch": 2, "split": "test", "accuracy": 0.75, "loss": 0.5}]
    run = Run(Path("/runs/lr"), {"task": "logreg"}, [], evals, None)
    head = task_headline([run])
    assert head == Headline("loss", "train", False)
    assert run.final_and_best(head) == (0.4, 0.4)
    assert task_headline([Run(Path("/runs/new"), {"task": "logreg"}, [], [], None)]) is None


def test_resumed_run_with_an_older_summary_is_in_progress(made, tmp_path):
    run = tmp_path / "resumed"
    shutil.copytree(made["topk"], run, ignore=shutil.ignore_patterns("checkpoints"))
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-2])
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({**last, "step": last["step"] + 2, "epoch": last["epoch"] + 0.25}) + "\n")
    reread = load_run(run)
    assert reread.status == "in progress" and reread.steps_done == last["step"] + 2
    assert any("summary.json is from step" in p for p in reread.problems)


def test_plain_text_and_markdown_tables_per_task(made, capsys):
    assert main([str(made["root"]), str(made["cut"])]) == 0
    text = capsys.readouterr().out
    blocks = text.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == ["mnist: test accuracy (higher is better)",
                                                   "ptb: test perplexity (lower is better)"]
    header = blocks[0].splitlines()[1]
    for column in ("run", "method", "options", "target c", "density", "final accuracy", "best accuracy",
                   "sent/step", "wire/step", "comm ms", "wall", "steps", "status"):
        assert column in header
    mnist_rows = blocks[0].splitlines()[2:]
    assert len(mnist_rows) == len(reducers.available()) + 3
    assert [r.split()[0] for r in mnist_rows].count("topk-cut") == 1
    cut_row = next(r for r in mnist_rows if r.startswith("topk-cut"))
    assert cut_row.rstrip().endswith("8 / 16  in progress")
    assert header.index("status") == cut_row.index("in progress"), "columns aligned"

    assert main([str(made["root"]), "--markdown"]) == 0
    md = capsys.readouterr().out
    assert "### mnist: test accuracy (higher is better)" in md and "### ptb:" in md
    table_lines = [l for l in md.splitlines() if l.startswith("|")]
    assert len(table_lines) == len(reducers.available()) + 2 + 2 + 1 + 2  # rows + header and rule per task
    cells = {len(l.strip("|").split(" | ")) for l in table_lines}
    assert len(cells) == 1, "every row has as many cells as the header"
    assert any(set(l.replace("|", "").replace(" ", "")) <= {"-", ":"} for l in table_lines)


def test_csv_holds_raw_numbers(made, tmp_path, capsys):
    csv = tmp_path / "out" / "runs.csv"
    assert main([str(made["root"]), "--csv", str(csv)]) == 0
    df = pd.read_csv(csv)
    assert list(df.columns) == list(COLUMNS) and len(df) == len(reducers.available()) + 3
    topk = df[df["run"] == "topk"].iloc[0]
    summary = json.loads((made["topk"] / "summary.json").read_text())
    assert topk["bytes_sent_per_step"] == pytest.approx(summary["bytes_sent_per_step"])
    assert topk["status"] == "complete"


def test_not_a_run_is_skipped_and_no_run_exits_2(made, tmp_path, caplog, capsys):
    stray = tmp_path / "figures"
    stray.mkdir()
    (stray / "a.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="sparsecomm"):
        assert main([str(made["ptb-topk"]), str(stray)]) == 0
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == \
        [f"{stray}: not a run directory and holds none (no config.yaml or metrics.jsonl); skipped"]
    assert "ptb-topk" in capsys.readouterr().out
    assert main([str(stray)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no run directory among")
    # each run once, however often it is named
    assert find_runs([made["ptb-topk"], made["root"], made["ptb-topk"]]).count(made["ptb-topk"]) == 1


def test_runs_of_the_same_name_in_two_folders_are_told_apart(made, tmp_path):
    """The same settings run twice into two output folders: the table names each by the end of
    its path that differs; unique names stay bare."""
    for folder in ("sweep-a", "sweep-b"):
        shutil.copytree(made["topk"], tmp_path / folder / "runs" / "topk")
    runs = load([tmp_path / "sweep-a", tmp_path / "sweep-b", made["exact"]])
    assert sorted(table(runs)["run"]) == ["exact", "sweep-a/runs/topk", "sweep-b/runs/topk"]
