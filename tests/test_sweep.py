"""python -m sparsecomm sweep: a 2x2 grid (exact and exdyna, two seeds) run locally through run.sh,
stopped with Ctrl-C and resumed, then skipped whole; bad input (one line, exit 2, nothing run);
and the grid grown by a seed as a SLURM job array through pararun on the single-node SLURM of
the launcher tests (only the new points submitted, waited for, found complete).

As in the launcher tests, the runs train logistic regression (convex: it cannot diverge) on a
tiny LIBSVM file, one worker each, and the worker is frozen while Ctrl-C is sent so that the
signal lands mid-run however fast the machine is."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny_data
from test_launchers import clean_env, slurm, worker_pids  # noqa: F401  (slurm: the single-node SLURM fixture)

from sparsecomm.tools import sweep
from sparsecomm.tools.grid import Grid, Point

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
STEPS = 2048 // 8  # one epoch of 2,048 examples, 8 per step, one worker
SETTINGS = ("epochs=1", "task_options.path=tiny.svm", "optimizer.lr=0.01", "data.batch_size=8",
            "records.progress=false", "records.log_every=1")


@pytest.fixture(scope="module")
def svm_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-data")
    tiny_data.write_libsvm(root, "tiny.svm", n=2048, features=64)
    return root


def sweep_args(data, out, seeds="0,1", *extra):
    return ["--preset", "logreg", "--reducers", "exact,exdyna", "--densities", "0.05", "--seeds", seeds,
            "--workers", "1", "--data-dir", str(data), "--output-dir", str(out),
            *[a for s in SETTINGS for a in ("--set", s)], *extra]


def run_dirs(out):
    return sorted(p for p in Path(out).iterdir() if p.is_dir() and not p.name.startswith("."))


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def freeze_first_run(out, proc, timeout=180):
    """Freeze the worker of the sweep's first run before its first step (its stop handler is in
    place from the start of the trainer): a stop signal then lands mid-run however fast it
    trains. Its pids."""
    deadline = time.time() + timeout

    def wait(pattern, lines, pause):
        while time.time() < deadline:
            files = list(Path(out).glob(pattern))
            if files and len(files[0].read_text().splitlines()) >= lines:
                return
            assert proc.poll() is None, "the sweep ended before its first run trained"
            time.sleep(pause)
        raise AssertionError(f"no {pattern} in {out} after {timeout}s")

    # the worker has built its trainer (stop handler installed, no step run yet), and run.sh's
    # check (which pgrep would find too) is over
    wait("*/config.yaml", 1, 0.05)
    pids = worker_pids(out, count=1)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    return pids


class Stage:
    def __init__(self, rc, out_file, err_file):
        self.rc, self.out, self.err = rc, Path(out_file).read_text(), Path(err_file).read_text()


@pytest.fixture(scope="module")
def local(svm_dir, tmp_path_factory):
    """The grid run three times: stopped with Ctrl-C during its first run, run again to the end,
    then once more. Each stage's exit status and output, and the run directories after the first."""
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "runs"
    cmd = [PY, "-m", "sparsecomm", "sweep", *sweep_args(svm_dir, out)]
    stages = {}
    with open(tmp / "1.out", "w") as o, open(tmp / "1.err", "w") as e:
        proc = subprocess.Popen(cmd, cwd=tmp, env=clean_env(), stdout=o, stderr=e, start_new_session=True)
        try:
            workers = freeze_first_run(out, proc)
            try:
                os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C does
                time.sleep(0.5)
            finally:
                for pid in workers:
                    os.kill(pid, signal.SIGCONT)
            proc.wait(timeout=120)
        finally:
            proc.kill()
    stages["stopped"] = Stage(proc.returncode, tmp / "1.out", tmp / "1.err")
    stages["stopped"].dirs = {d.name: (d / "summary.json").exists() and summary(d)["complete"] for d in run_dirs(out)}
    for n, name in ((2, "resumed"), (3, "again")):
        with open(tmp / f"{n}.out", "w") as o, open(tmp / f"{n}.err", "w") as e:
            rc = subprocess.run(cmd, cwd=tmp, env=clean_env(), stdout=o, stderr=e, timeout=600).returncode
        stages[name] = Stage(rc, tmp / f"{n}.out", tmp / f"{n}.err")
    stages["out"] = out
    return stages


def test_ctrl_c_stops_the_sweep_after_the_run_checkpoints(local):
    s = local["stopped"]
    assert s.rc == 130, s.out + s.err[-3000:]
    assert "[1/4] exact seed 0: starting in " in s.out, s.out
    assert "[1/4] exact seed 0: stopped by SIGINT, its checkpoint kept" in s.out, s.out
    assert "sweep stopped by SIGINT; run the same command again to resume" in s.out
    assert "[2/4]" not in s.out and "Traceback" not in s.err, s.out + s.err[-3000:]
    assert len(re.findall(r"stopped by SIGINT at step \d+; checkpoint step-", s.err)) == 1, s.err[-3000:]
    [(name, finished)] = s.dirs.items()
    assert name.startswith("logreg-logreg-exact-P1-") and "seed0" in name and not finished


def test_running_again_resumes_and_finishes_the_grid(local):
    s, out = local["resumed"], local["out"]
    assert s.rc == 0, s.out + s.err[-3000:]
    assert re.search(r"\[1/4\] exact seed 0: resuming from checkpoint step-0*\d+ in ", s.out), s.out
    assert len(re.findall(r"resumed at step \d+", s.err)) == 1, s.err[-3000:]
    for head in ("[1/4] exact seed 0", "[2/4] exact seed 1", "[3/4] exdyna c=0.05 seed 0",
                 "[4/4] exdyna c=0.05 seed 1"):
        assert f"{head}: complete in " in s.out, s.out
    dirs = run_dirs(out)
    assert len(dirs) == 4  # one per grid point: exact has no density
    assert sorted(re.sub(r"-P1.*seed(\d).*", r" \1", d.name) for d in dirs) == [
        "logreg-logreg-exact 0", "logreg-logreg-exact 1", "logreg-logreg-exdyna-c0.05 0",
        "logreg-logreg-exdyna-c0.05 1"]
    for d in dirs:
        done = summary(d)
        assert done["complete"] and done["steps"] == STEPS and done["workers"] == 1
        row = [line for line in s.out.splitlines() if line.startswith(d.name + " ")]
        assert len(row) == 1 and row[0].rstrip().endswith(f"{STEPS} / {STEPS}  complete"), s.out  # the table


def test_running_once_more_skips_every_run(local):
    s = local["again"]
    assert s.rc == 0, s.out + s.err[-3000:]
    assert s.out.count(": complete, skipped (") == 4, s.out
    assert "starting" not in s.out and "resuming" not in s.out and "run.sh" not in s.err, s.out + s.err
    assert s.out.count(f"{STEPS} / {STEPS}  complete") == 4, s.out


# ----------------------------------------------------------------------- bad input --------
BAD = {
    "empty grid": (dict(seeds=""), "--seeds is empty, so the grid has no point; give integer seeds"),
    "no density for a sparse method": (dict(densities=None), "--densities is missing: exdyna need(s) at least one"),
    "unknown preset": (dict(preset="resnet18-imagenet"), "--preset: unknown preset 'resnet18-imagenet'; available: "),
    "unknown reducer": (dict(reducers="exact,exdina"), "--reducers: unknown reducer 'exdina'; available: accordion, "),
    "density above 1": (dict(densities="0.01,2"), "--densities: density 2 is outside (0, 1]"),
    "density 0": (dict(densities="0"), "--densities: density 0 is outside (0, 1]"),
    "unparsable density": (dict(densities="0.01,1e-3x"), "--densities: '1e-3x' is not a number"),
    "unparsable seeds": (dict(seeds="0;1"), "--seeds: '0;1' is not an integer"),
    "empty item": (dict(reducers="exact,,exdyna"), "--reducers 'exact,,exdyna' has an empty item"),
    "bad setting": (dict(settings=("optimizer.momentun=0.9",)),
                    "exact seed 0: unknown setting 'optimizer.momentun'; allowed in optimizer: "),
    "workers": (dict(workers="two"), "--workers must be a positive integer or 'auto', got 'two'"),
}


def bad_args(data, out, preset="logreg", reducers="exact,exdyna", densities="0.05", seeds="0,1", settings=(),
             workers="1"):
    args = ["--preset", preset, "--reducers", reducers, "--seeds", seeds, "--workers", workers,
            "--data-dir", str(data), "--output-dir", str(out), *[a for s in settings for a in ("--set", s)]]
    return args + ([] if densities is None else ["--densities", densities])


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_2_before_anything_runs(svm_dir, tmp_path, capsys, case):
    change, message = BAD[case]
    assert sweep.main(bad_args(svm_dir, tmp_path / "runs", **change)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "runs").exists()


def test_bad_input_from_the_command_line(svm_dir, tmp_path):
    done = subprocess.run([PY, "-m", "sparsecomm", "sweep", *bad_args(svm_dir, tmp_path, seeds="0,x")], cwd=ROOT,
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "error: --seeds: 'x' is not an integer; seeds are integers, e.g. 0,1,2\n"


def test_a_sweep_of_short_runs_tabulates_their_figures(svm_dir, tmp_path):
    """Runs stopped at max_steps, shorter than the log interval, still report: a training line
    and an evaluation each, so the table has figures; --seeds defaults to 0."""
    out = tmp_path / "runs"
    args = ["--preset", "logreg", "--reducers", "exact", "--workers", "1", "--data-dir", str(svm_dir),
            "--output-dir", str(out), *[a for s in SETTINGS if not s.startswith("records.log_every")
                                        for a in ("--set", s)], "--set", "max_steps=3"]
    done = subprocess.run([PY, "-m", "sparsecomm", "sweep", *args], cwd=tmp_path, env=clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "[1/1] exact seed 0: stopped before the end of its schedule" in done.stdout, done.stdout
    [row] = [line for line in done.stdout.splitlines() if line.startswith("logreg-logreg-exact")]
    assert f"3 / {STEPS}" in row and row.endswith("incomplete"), done.stdout
    assert row.split().count("-") == 1, row  # figures, not dashes (the one: no reducer options)


def test_a_sweep_whose_runs_wrote_nothing_fails_and_says_so(svm_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep._OneRun, "run", lambda self, env: 0)  # a run that exits 0 and writes nothing
    args = ["--preset", "logreg", "--reducers", "exact", "--workers", "1", "--data-dir", str(svm_dir),
            "--output-dir", str(tmp_path / "runs"), *[a for s in SETTINGS for a in ("--set", s)]]
    assert sweep.main(args) == 1
    out = capsys.readouterr().out
    assert "1 of 1 runs wrote no records (exact seed 0): there is nothing to compare" in out, out


def test_entry_gives_each_array_task_its_point_as_run_sh_variables(tmp_path):
    """What pararun evals in each array task: run.sh's variables of the point, shell-quoted."""
    grid = Grid("logreg", [Point("exact", None, 0, str(tmp_path / "a"), 1.0), Point("exdyna", 0.05, 1, "b", 1.0)],
                2, "/data dir", "/runs", ["task_options.path=my file.svm", "optimizer.lr=0.01"])
    grid.save(tmp_path / "grid.json")
    script = (f'eval "$({PY} -m sparsecomm sweep --entry {tmp_path}/grid.json 1)" && eval "extra=($EXTRA_ARGS)" && '
              'printf "%s\\n" "$PRESET" "$MODEL" "$REDUCER" "$DENSITY" "$SEED" "$DATA_DIR" "[$NPROC]" "${extra[@]}"')
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=clean_env(MODEL="vgg16", NPROC=4), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["logreg", "", "exdyna", "0.05", "1", "/data dir", "[]",
                                        "--set=task_options.path=my file.svm", "--set=optimizer.lr=0.01"]
    assert done.stderr == f"sweep {tmp_path}/grid.json: point 1, exdyna c=0.05 seed 1, in b\n"
    out_of_range = subprocess.run([PY, "-m", "sparsecomm", "sweep", "--entry", str(tmp_path / "grid.json"), "2"],
                                  cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=60)
    assert out_of_range.returncode == 2
    assert out_of_range.stderr == f"error: --entry: no grid point '2' in {tmp_path}/grid.json; it has points 0 to 1\n"


# ----------------------------------------------------------------------- SLURM ------------
FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED")


def wait_array(slurm, job, timeout=300):
    """Until every task of job array ``job`` has ended; their states."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = slurm.run("scontrol", "show", "job", "-o", job)
        states = re.findall(r"\bJobState=(\S+)", done.stdout)
        if done.returncode != 0 and "Invalid job id" in done.stderr:
            return ["GONE"]
        if states and all(s in FINISHED for s in states):
            return states
        time.sleep(1)
    raise AssertionError(f"job array {job} not done after {timeout}s: {done.stdout}; {slurm.log_tail()}")


def test_slurm_job_array_runs_the_points_not_yet_done(slurm, local, svm_dir, tmp_path):
    """The finished 2x2 grid grown by seed 2: the four finished runs are skipped, the two new
    points are tasks 2 and 5 of one job array through pararun; running the command again once
    they are done submits nothing and shows the table of all six."""
    out = tmp_path / "runs"
    shutil.copytree(local["out"], out)
    cmd = [PY, "-m", "sparsecomm", "sweep", *sweep_args(svm_dir, out, "0,1,2", "--slurm")]
    done = slurm.run(*cmd, env=clean_env(), cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.count(": complete, skipped (") == 4, done.stdout
    assert "[3/6] exact seed 2: array task 2, starting in " in done.stdout, done.stdout
    assert "[6/6] exdyna c=0.05 seed 2: array task 5, starting in " in done.stdout, done.stdout
    job = re.search(r"submitted job array (\d+): 2 task\(s\)", done.stdout)
    assert job and f"squeue -j {job.group(1)}" in done.stdout and "python -m sparsecomm compare " in done.stdout
    job = job.group(1)
    assert set(wait_array(slurm, job)) <= {"COMPLETED", "GONE"}, slurm.log_tail()
    logs = sorted(out.glob(f".sweeps/*/{job}_*.out"))
    assert [p.name for p in logs] == [f"{job}_2.out", f"{job}_5.out"]
    for log, name in zip(logs, ("exact", "exdyna-c0.05")):
        text = log.read_text()
        assert f"done: logreg-logreg-{name}-P1-b8-seed2" in text and "Traceback" not in text, text[-3000:]
    dirs = run_dirs(out)
    assert len(dirs) == 6 and all(summary(d)["complete"] and summary(d)["workers"] == 1 for d in dirs)
    again = slurm.run(*cmd, env=clean_env(), cwd=tmp_path, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr[-3000:]
    assert "all 6 runs of this sweep are complete; nothing to submit" in again.stdout, again.stdout
    assert again.stdout.count(f"{STEPS} / {STEPS}  complete") == 6, again.stdout
