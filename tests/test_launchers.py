"""Starting jobs: ./run.sh plain, torchrun, mpirun, sbatch pararun on a real single-node SLURM
(with SIGTERM, requeue and resume), Ctrl-C and SIGUSR1 under run.sh, a killed worker, conflicting
settings and bad input.

These tests check launching mechanics, never whether a training run stays finite: the jobs train
logistic regression (a convex loss, lr far below 2 / its smoothness), which no trajectory can
make diverge. Workers are frozen (SIGSTOP) while a stop signal is sent, so the signal lands
mid-run however fast the machine is. Open MPI and SLURM are installed from Debian's packages and
started here if missing; where that needs privileges this machine lacks, those tests are skipped
with the reason."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tiny_data
from launch_env import SingleNodeSlurm, ensure_packages

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BOUND_S = 60  # the survivors of a lost worker stop within this


STEPS_PER_EPOCH = 2048 // 2 // 16  # 2,048 examples, 2 workers, 16 per batch
JOB = ("--set task_options.path=tiny.svm --set optimizer.lr=0.01 --set data.batch_size=16 --set records.progress=false "
       "--set records.log_every=1")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch-data")
    tiny_data.write_libsvm(root, "tiny.svm", n=2048, features=64)
    tiny_data.write_mnist(root, n_train=256, n_test=64)
    tiny_data.mark_prepared(root, "mnist", "idx")
    return root


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")) and k not in (
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC", "PRESET", "MODEL",
               "DATASET", "REDUCER", "DENSITY", "EPOCHS", "EXTRA_ARGS")}
    env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1",
                "PYTHON": PY})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def job_env(data_dir, out, epochs=1, **extra):
    """Logistic regression with ExDyna (a reducer with state to resume) on 2,048 examples."""
    return clean_env(**{"PRESET": "logreg", "REDUCER": "exdyna", "DENSITY": 0.05, "DATA_DIR": data_dir,
                        "OUTPUT_DIR": out, "EPOCHS": epochs, "EXTRA_ARGS": JOB, **extra})


def run(cmd, env, timeout=300, **kw):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def only_run_dir(out):
    dirs = [p for p in Path(out).iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def assert_complete(out, workers=2):
    run_dir = only_run_dir(out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["workers"] == workers
    assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.jsonl").stat().st_size > 0
    return summary


def final_state(out):
    """Model parameters and every rank's reducer residual in a run's latest checkpoint."""
    checkpoints = only_run_dir(out) / "checkpoints"
    folder = checkpoints / json.loads((checkpoints / "latest.json").read_text())["tag"]
    shared = torch.load(folder / "shared.pt", weights_only=True)
    residuals = [torch.load(folder / f"rank-{r}.pt", weights_only=True)["reducer"]["residual"] for r in range(2)]
    return shared["step"], shared["model"], residuals


def assert_same_end(a, b):
    (step_a, model_a, res_a), (step_b, model_b, res_b) = final_state(a), final_state(b)
    assert step_a == step_b
    assert model_a.keys() == model_b.keys() and all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(x, y) for x, y in zip(res_a, res_b))


@pytest.fixture(scope="module")
def straight_plain(data_dir, tmp_path_factory):
    """An uninterrupted plain run of 2 epochs, for the stopped-and-resumed ones to match."""
    out = tmp_path_factory.mktemp("straight")
    done = run(["./run.sh"], job_env(data_dir, out, epochs=2, NPROC=2))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_plain_run_starts_its_own_workers(data_dir, straight_plain):
    assert_complete(straight_plain)


def test_torchrun_on_the_entry_point(data_dir, tmp_path):
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "cnn-lstm/train.py",
           "--preset", "logreg", "--data-dir", str(data_dir), "--output-dir", str(tmp_path), "--epochs", "1",
           "--reducer", "exdyna", "--density", "0.05", *JOB.split()]
    done = run(cmd, job_env(data_dir, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_complete(tmp_path)


def worker_pids(out, count=2, timeout=120):
    """The trainer processes writing into ``out`` (started by whichever launcher)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = subprocess.run(["pgrep", "-f", f"sparsecomm.train .*--output-dir {out}"], capture_output=True,
                               text=True).stdout.split()
        pids = [int(p) for p in found if int(p) != os.getpid()]
        if len(pids) == count:
            return pids
        time.sleep(0.2)
    raise AssertionError(f"expected {count} workers for {out}, found {found}")


def _wait_for_config(out, timeout=120):
    deadline = time.time() + timeout
    while not list(Path(out).glob("*/config.yaml")):
        assert time.time() < deadline, f"no run started in {out}"
        time.sleep(0.05)


def signal_mid_run(out, send):
    """Freeze the job's workers once rank 0 has written config.yaml (every rank is then inside
    the trainer, its stop handler installed, and no step has run), send the stop signal, thaw
    them: the run stops after its first step, however fast this machine trains."""
    _wait_for_config(out)
    pids = worker_pids(out)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        send()
        time.sleep(0.5)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1])
def test_ctrl_c_and_sigusr1_checkpoint_and_resume(data_dir, tmp_path, straight_plain, signum):
    """Ctrl-C (SIGINT to run.sh's process group, as a terminal sends it) and SIGUSR1 to run.sh
    alone: the workers checkpoint and stop with one line each event, no traceback; the same
    command then resumes and ends where the uninterrupted run does."""
    env = job_env(data_dir, tmp_path, epochs=2, NPROC=2)
    proc = subprocess.Popen(["./run.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        send = (lambda: os.killpg(proc.pid, signum)) if signum == signal.SIGINT else (lambda: os.kill(proc.pid, signum))
        signal_mid_run(tmp_path, send)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    name = signal.Signals(signum).name
    stops = [line for line in err.splitlines() if f"stopped by {name} at step" in line]
    assert len(stops) == 1 and "checkpoint step-" in stops[0] and "run the same command again" in stops[0], err[-3000:]
    [stopped] = [json.loads(p.read_text()) for p in tmp_path.glob("*/summary.json")]
    assert stopped["complete"] is False and stopped["steps"] < 2 * STEPS_PER_EPOCH
    again = run(["./run.sh"], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed at step" in again.stderr
    assert assert_complete(tmp_path)["steps"] == 2 * STEPS_PER_EPOCH
    assert_same_end(straight_plain, tmp_path)


@pytest.fixture(scope="module")
def mpirun():
    reason = ensure_packages(("mpirun",))
    if reason:
        print(f"\nskipping mpirun tests: {reason}")
        pytest.skip(reason)
    return "mpirun"


def test_mpirun_starts_run_sh(mpirun, data_dir, tmp_path):
    """MNIST, so that rank 0 runs prepare_dataset.sh while rank 1 waits for its marker (4 steps)."""
    env = clean_env(PRESET="mnist-cnn", DATA_DIR=data_dir, OUTPUT_DIR=tmp_path, EPOCHS=0.5,
                    EXTRA_ARGS="--set records.progress=false --set data.batch_size=16")
    done = run([mpirun, "-np", "2", "./run.sh"], env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Open MPI started 2 worker(s)" in done.stderr
    summary = json.loads((only_run_dir(tmp_path) / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["workers"] == 2


def test_conflicting_nproc_under_a_launcher(mpirun, data_dir, tmp_path):
    done = run([mpirun, "-np", "2", "-x", "NPROC=3", "./run.sh"], job_env(data_dir, tmp_path))
    assert done.returncode != 0
    assert "NPROC=3 conflicts with the 2 worker(s) Open MPI started on this node" in done.stderr


def test_launcher_never_installs(mpirun, data_dir, tmp_path):
    clone = tmp_path / "clone"  # the project without its environment
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(".venv", ".conda-env", "data", "runs", ".git",
                                                               "__pycache__", "*.egg-info"))
    env = job_env(data_dir, tmp_path, PYTHON="/usr/bin/python3")  # a Python without sparsecomm
    done = subprocess.run([mpirun, "-np", "1", "./run.sh"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "run.sh never installs under a launcher" in done.stderr
    assert not (clone / ".venv").exists()


def test_port_in_use_and_rank_out_of_range(data_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        busy = s.getsockname()[1]
        done = run(["./run.sh"], job_env(data_dir, tmp_path, MASTER_PORT=busy))
        assert done.returncode == 2 and f"port {busy} on this host is in use" in done.stderr
    done = run(["./run.sh"], job_env(data_dir, tmp_path, RANK=3, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1",
                                     MASTER_PORT=29999))
    assert done.returncode == 2 and "rank 3 is out of range for world size 2" in done.stderr


def _children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _wait_for_metrics(out, lines=2, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        files = list(Path(out).glob("*/metrics.jsonl"))
        if files and len(files[0].read_text().splitlines()) >= lines:
            return
        time.sleep(0.5)
    raise AssertionError("training did not start")


def test_killed_worker_stops_the_plain_run(data_dir, tmp_path):
    proc = subprocess.Popen(["./run.sh"], cwd=ROOT, env=job_env(data_dir, tmp_path, epochs=50, NPROC=2),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_metrics(tmp_path)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        killed = time.time()
        _, err = proc.communicate(timeout=BOUND_S + 30)
        assert time.time() - killed < BOUND_S
        assert proc.returncode == 128 + signal.SIGKILL
        assert f"worker rank 1 (pid {workers[1]}) was killed by SIGKILL; stopping the other workers" in err, err[-2000:]
        assert "Traceback" not in err
    finally:
        proc.kill()


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP])
def test_lost_worker_without_a_supervising_launcher(data_dir, tmp_path, how):
    """Two processes joined by hand: when one dies or freezes, the other stops within the bound
    and names the lost rank (the watchdog, or the failed collective)."""
    port = socket.socket()
    port.bind(("", 0))
    port_no = port.getsockname()[1]
    port.close()
    procs = []
    for rank in range(2):
        env = job_env(data_dir, tmp_path, epochs=50, RANK=rank, WORLD_SIZE=2, LOCAL_RANK=rank,
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=port_no, SPARSECOMM_HEARTBEAT_TIMEOUT=10)
        procs.append(subprocess.Popen(["./run.sh"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    try:
        _wait_for_metrics(tmp_path)
        os.kill(procs[1].pid, how)
        lost_at = time.time()
        _, err = procs[0].communicate(timeout=BOUND_S + 30)
        assert time.time() - lost_at < BOUND_S
        assert procs[0].returncode == 1
        assert "rank 1 is lost" in err or "lost rank(s) 1" in err, err[-2000:]
    finally:
        for p in procs:
            p.kill()


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = ensure_packages(("slurmctld", "slurmd", "sbatch", "munged"))
    cluster = None
    if reason is None:
        cluster = SingleNodeSlurm(tmp_path_factory.mktemp("slurm"))
        reason = cluster.start()
    if reason:
        print(f"\nskipping SLURM tests: {reason}")
        pytest.skip(reason)
    yield cluster
    cluster.stop()


FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED", "GONE")


def wait_job(slurm, job, timeout=240, until=FINISHED):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = slurm.state(job)
        if state in until:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} still {slurm.state(job)!r} after {timeout}s; {slurm.log_tail()}")


def test_sbatch_pararun(slurm, data_dir, tmp_path):
    out_file = tmp_path / "job.out"
    env = job_env(data_dir, tmp_path / "runs")
    done = slurm.run("sbatch", "--parsable", f"--output={out_file}", "--ntasks-per-node=2", "pararun", env=env,
                     cwd=ROOT)
    assert done.returncode == 0, done.stderr
    job = done.stdout.strip().split(";")[0]
    wait_job(slurm, job)
    log = out_file.read_text()
    assert "slurm started 2 worker(s)" in log, log[-3000:]
    assert "done: logreg-logreg" in log, log[-3000:]
    assert_complete(tmp_path / "runs")


def test_sigterm_requeues_and_resumes(slurm, data_dir, tmp_path):
    """A job sent SIGTERM mid-run checkpoints, is requeued, resumes at the checkpointed step and
    ends with the parameters of the same job left alone."""
    def submit(runs, out_file):
        done = slurm.run("sbatch", "--parsable", f"--output={out_file}", "pararun", env=job_env(data_dir, runs, epochs=2),
                         cwd=ROOT)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().split(";")[0]

    straight = submit(tmp_path / "straight", tmp_path / "straight.out")
    assert wait_job(slurm, straight) == "COMPLETED", slurm.log_tail()
    out_file = tmp_path / "job.out"
    runs = tmp_path / "runs"
    job = submit(runs, out_file)
    # to the workers, as before a preemption
    signal_mid_run(runs, lambda: slurm.run("scancel", "--signal=TERM", job).returncode == 0 or pytest.fail("scancel"))
    wait_job(slurm, job, until=("PENDING",), timeout=120)
    # Skip most of the requeue delay, not all of it: slurmd refuses a launch whose credential is
    # not newer (to the second) than the one it revoked when the job was requeued.
    update = slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now+3")
    assert update.returncode == 0, update.stderr
    assert wait_job(slurm, job) == "COMPLETED", slurm.log_tail()
    log = out_file.read_text()
    assert "requeueing job" in log, log[-3000:]
    stop = re.search(r"stopped by SIGTERM at step (\d+); checkpoint step-0*(\d+)", log)
    assert stop and stop.group(1) == stop.group(2), log[-3000:]
    assert f"resumed at step {stop.group(1)}" in log and "done: logreg-logreg" in log, log[-3000:]
    assert "Traceback" not in log
    summary = assert_complete(runs)
    assert summary["steps"] == 2 * STEPS_PER_EPOCH
    assert_same_end(tmp_path / "straight", runs)


# ----------------------------------------------------------------------- bad input --------
BAD = {
    "unknown reducer": (dict(REDUCER="exdina"), "unknown reducer 'exdina'; available: accordion"),
    "unknown reducer option": (dict(EXTRA_ARGS=JOB + " --set 'reducer.options={foo: 1}'"),
                               "unknown option 'foo' for reducer 'exdyna'; allowed: "),
    "density": (dict(DENSITY=2), "run.sh: error: DENSITY must be a number in (0, 1], got '2'"),
    "unknown setting": (dict(EXTRA_ARGS=JOB + " --set optimizer.momentun=0.9"), "unknown setting 'optimizer.momentun'"),
    "unknown preset": (dict(PRESET="resnet18-imagenet"), "unknown preset 'resnet18-imagenet'; available: "),
    "model against task": (dict(PRESET="", DATASET="ml-100k", MODEL="resnet18"),
                           "model 'resnet18' does not fit task 'ml-100k'; models for ml-100k: neumf"),
    "model option": (dict(EXTRA_ARGS=JOB + " --set 'model_options={depth: 3}'"),
                     "unknown option 'depth' for model 'logreg'; allowed: num_features, num_classes"),
    "task option": (dict(EXTRA_ARGS=JOB + " --set task_options.bptt=3"), "unknown task option(s) 'bptt' for task"),
    "trainer flag": (dict(EXTRA_ARGS=JOB + " --fersh"), "error: unrecognized arguments: --fersh"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_settings_fail_before_any_work_in_one_line(data_dir, tmp_path, case):
    extra, message = BAD[case]
    done = run(["./run.sh"], job_env(data_dir, tmp_path, NPROC=2, **extra), timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]
    assert "prepare_dataset" not in done.stdout + done.stderr and not any(tmp_path.iterdir())


def test_output_under_a_regular_file(data_dir, tmp_path):
    (tmp_path / "file").write_text("")
    done = run(["./run.sh"], job_env(data_dir, tmp_path / "file" / "runs", NPROC=2), timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "file is a file, not a folder; choose another --output-dir" in done.stderr


def test_bad_settings_under_a_launcher_are_said_once(mpirun, data_dir, tmp_path):
    done = run([mpirun, "-np", "2", "./run.sh"], job_env(data_dir, tmp_path, REDUCER="exdina"), timeout=120)
    assert done.returncode != 0 and done.stderr.count("unknown reducer 'exdina'") == 1, done.stderr[-2000:]


def test_dataset_alone_chooses_its_preset(tmp_path):
    data = tiny_data.write_ratings(tmp_path / "data", "ml-100k")
    tiny_data.mark_prepared(data, "ml-100k", "zip")
    env = clean_env(DATASET="ml-100k", DATA_DIR=data, OUTPUT_DIR=tmp_path / "runs", NPROC=1,
                    EXTRA_ARGS="--set data.global_batch_size=256 --set max_steps=2 --set records.progress=false")
    done = run(["./run.sh"], env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no preset named: using ncf-ml100k, the preset for task ml-100k" in done.stderr
    assert (only_run_dir(tmp_path / "runs") / "config.yaml").read_text().count("preset: ncf-ml100k") == 1


def test_pararun_outside_slurm(tmp_path):
    done = run(["./pararun"], clean_env())
    assert done.returncode == 2
    assert done.stderr.strip() == ("pararun: not inside a SLURM job; submit it with `sbatch pararun` (on a machine "
                                   "without SLURM, start ./run.sh directly)")
