"""Starting jobs: ./run.sh plain, torchrun, mpirun, sbatch pararun on a real single-node SLURM
(with SIGTERM, requeue and resume), a killed worker, and conflicting settings.

Open MPI and SLURM are installed from Debian's packages and started here if missing; where that
needs privileges this machine lacks, those tests are skipped with the reason."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny_data
from launch_env import SingleNodeSlurm, ensure_packages

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
BOUND_S = 60  # the survivors of a lost worker stop within this


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tiny_data.write_mnist(tmp_path_factory.mktemp("launch-data"), n_train=2048, n_test=64)
    (root / "mnist" / ".prepared").write_text("dataset=mnist\ncandidate=idx\n")  # tiny files: no real checksums
    return root


def job_env(data_dir, out, epochs=1, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "OMPI_", "PMI_", "PMIX_")) and k not in (
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC")}
    env.update({"PRESET": "mnist-cnn", "DATA_DIR": str(data_dir), "OUTPUT_DIR": str(out), "EPOCHS": str(epochs),
                "EXTRA_ARGS": "--set records.progress=false --set records.log_every=1 --set data.batch_size=16",
                "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", "OMP_NUM_THREADS": "1",
                "PYTHON": PY})
    env.update({k: str(v) for k, v in extra.items()})
    return env


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


def test_plain_run_starts_its_own_workers(data_dir, tmp_path):
    done = run(["./run.sh"], job_env(data_dir, tmp_path, NPROC=2))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting 2 local worker(s)" in done.stderr
    assert_complete(tmp_path)


def test_torchrun_on_the_entry_point(data_dir, tmp_path):
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "cnn-lstm/train.py",
           "--preset", "mnist-cnn", "--data-dir", str(data_dir), "--output-dir", str(tmp_path), "--epochs", "1",
           "--set", "records.progress=false", "--set", "data.batch_size=16"]
    done = run(cmd, job_env(data_dir, tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_complete(tmp_path)


@pytest.fixture(scope="module")
def mpirun():
    reason = ensure_packages(("mpirun",))
    if reason:
        print(f"\nskipping mpirun tests: {reason}")
        pytest.skip(reason)
    return "mpirun"


def test_mpirun_starts_run_sh(mpirun, data_dir, tmp_path):
    env = job_env(data_dir, tmp_path)
    done = run([mpirun, "-np", "2", "./run.sh"], env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "Open MPI started 2 worker(s)" in done.stderr
    assert_complete(tmp_path)


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
        assert proc.returncode != 0
        assert "exitcode  : -9" in err and "Signal 9 (SIGKILL)" in err, err[-2000:]
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
    assert "done: mnist-mnist_cnn" in log, log[-3000:]
    assert_complete(tmp_path / "runs")


def test_sigterm_requeues_and_resumes(slurm, data_dir, tmp_path):
    out_file = tmp_path / "job.out"
    runs = tmp_path / "runs"
    env = job_env(data_dir, runs, epochs=6)
    done = slurm.run("sbatch", "--parsable", f"--output={out_file}", "pararun", env=env, cwd=ROOT)
    job = done.stdout.strip().split(";")[0]
    _wait_for_metrics(runs, lines=3)
    assert slurm.run("scancel", "--signal=TERM", job).returncode == 0  # to the workers, as before a preemption
    wait_job(slurm, job, until=("PENDING",), timeout=120)
    # Skip most of the requeue delay, not all of it: slurmd refuses a launch whose credential is
    # not newer (to the second) than the one it revoked when the job was requeued.
    update = slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now+3")
    assert update.returncode == 0, update.stderr
    assert wait_job(slurm, job) == "COMPLETED", slurm.log_tail()
    log = out_file.read_text()
    assert "requeueing job" in log, log[-3000:]
    assert "stopped by a signal at step" in log
    assert "resumed at step" in log and "done: mnist-mnist_cnn" in log, log[-3000:]
    summary = assert_complete(runs)
    assert summary["steps"] == 6 * (2048 // 2 // 16)
