"""Progress where it is written: tqdm's bar on a terminal, plain log lines in a file."""
import logging
import subprocess
import sys

from sparsecomm import progress as progress_module
from sparsecomm.progress import LineProgress, byte_progress, progress


def test_not_on_a_terminal_progress_is_plain_lines(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    bar = progress(200, "decoding cifar10 train", "img", every=0.0)
    assert isinstance(bar, LineProgress)
    with caplog.at_level(logging.INFO, logger="sparsecomm.progress"):
        for _ in range(2):
            bar.update(50)
        bar.set_postfix(loss="0.25")
        bar.update(100)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("decoding cifar10 train: 50/200 img (25%), ") and "left" in lines[0]
    assert lines[-1].startswith("decoding cifar10 train: 200/200 img (100%), ") and lines[-1].endswith("loss 0.25")
    assert not any("\r" in line for line in lines)


def test_plain_lines_come_at_most_every_interval(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="sparsecomm.progress"):
        with byte_progress(3 << 20, "unpacking x.tar.gz", every=3600) as bar:
            bar.update(1 << 20)
    assert caplog.records == [], "a short piece of work says nothing"
    quiet = progress(10, "epoch 1/2", show=False)
    quiet.update(10)
    quiet.close()
    assert caplog.records == []


def test_bytes_read_in_binary_prefixes(monkeypatch):
    bar = LineProgress(3 << 20, "copy", "B", scale=True)
    bar.update(3 << 19)
    assert bar.line().startswith("copy: 1.5 Mi/3.0 Mi B (50%)")


def test_a_training_log_written_to_a_file_has_no_carriage_returns(tmp_path):
    """The trainer's own output, redirected as SLURM and nohup do: one line per event."""
    import tiny_data

    data = tiny_data.write_all(tmp_path / "data")
    out = tmp_path / "train.log"
    with open(out, "w") as f:
        done = subprocess.run([sys.executable, "-m", "sparsecomm.train", "--task", "mnist", "--model", "mnist_cnn",
                               "--data-dir", str(data), "--output-dir", str(tmp_path / "runs"), "--epochs", "1",
                               "--set", "data.batch_size=16"], stdout=f, stderr=subprocess.STDOUT, timeout=600)
    text = out.read_text()
    assert done.returncode == 0, text[-3000:]
    assert "\r" not in text and "done: mnist-mnist_cnn" in text


def test_the_closing_line_is_not_a_repeat(monkeypatch, caplog):
    monkeypatch.setattr(progress_module, "on_terminal", lambda: False)
    with caplog.at_level(logging.INFO, logger="sparsecomm.progress"):
        bar = progress(2, "epoch 1/1", every=0.0)
        bar.update(2)
        bar.close()
    assert len(caplog.records) == 1
