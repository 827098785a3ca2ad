"""One job per run directory (and per sweep): the lock file of sparsecomm.lock on its own
(taken, refused while its holder lives, taken over from a dead one here or on another host,
one line when it cannot be written, given back), the trainer holding it (refusing, waiting,
also with virtual workers), and real starts: two at once, the second while the first trains,
kill -9 of run.sh then an immediate restart, two sweeps over one output folder.

Holders are real processes: a ``sleep`` the test started is a live job on this host; one that
has exited is a dead one. Jobs that must still be running when a second one starts are frozen
(SIGSTOP) while it does, so the timing holds however fast the machine is; their watchdog is
given a long timeout so that the pause is not taken for a lost rank."""
import errno
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny_data
from test_launchers import JOB, ROOT, _wait_for_config, clean_env, job_env, only_run_dir, worker_pids

from sparsecomm import lock as lockmod
from sparsecomm.config import load_config
from sparsecomm.launch.job import join
from sparsecomm.lock import HOST, Held, LockError, RunLock
from sparsecomm.train.loop import Stopped, Trainer
from sparsecomm.train.records import RunInUse, run_lock

PY = sys.executable
RUN_STEPS = 2048 // 2 // 16  # one epoch of the launcher tests' job: 2,048 examples, 2 workers, 16 each
FROZEN_OK = {"SPARSECOMM_HEARTBEAT_TIMEOUT": "600"}  # a frozen job's ranks are not lost


# --------------------------------------------------------------------------- helpers
@pytest.fixture
def alive():
    """A live process of this host (its pid), stopped at the end."""
    proc = subprocess.Popen(["sleep", "600"])
    yield proc.pid
    proc.kill()
    proc.wait()


def dead_pid():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def hold(path, pid, host=HOST, start="same", boot="same", age=0.0, slurm_job=None, token="theirs"):
    """Write a lock file as the job ``pid`` on ``host`` would have; its heartbeat ``age`` s old."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"host": host, "pid": pid, "since": time.time() - age - 60, "command": "python -m sparsecomm.train",
              "start": lockmod._start_time(pid) if start == "same" and host == HOST else start,
              "boot": lockmod._boot_id() if boot == "same" else boot, "slurm_job": slurm_job, "token": token}
    path.write_text(json.dumps(record))
    if age:
        os.utime(path, (time.time() - age, time.time() - age))
    return path


def lock_at(tmp_path, **kw):
    return RunLock(tmp_path / ".locks" / "run.lock", f"run directory {tmp_path / 'run'}", **kw)


# --------------------------------------------------------------------------- the lock file
def test_taking_writes_who_holds_it_and_giving_back_removes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    lock = lock_at(tmp_path)
    lock.acquire()
    record = json.loads(lock.path.read_text())
    assert record["host"] == HOST and record["pid"] == os.getpid() and record["slurm_job"] == "42"
    assert record["start"] == lockmod._start_time(os.getpid()) and record["token"] == lock.token
    assert abs(record["since"] - time.time()) < 60
    assert os.listdir(lock.path.parent) == ["run.lock"], "no temporary file is left beside it"
    lock.release()
    assert not lock.path.parent.exists(), "the lock and its then empty folder are removed"
    lock.release()  # twice is harmless


def test_a_live_holder_on_this_host_is_refused(tmp_path, alive):
    lock = lock_at(tmp_path)
    hold(lock.path, alive)
    before = lock.path.read_text()
    with pytest.raises(Held) as held:
        lock.acquire()
    assert re.fullmatch(rf"pid {alive} on host {re.escape(HOST)} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \(alive\)",
                        held.value.holder.describe())
    assert held.value.holder.how_to_stop() == f"kill {alive}"
    assert lock.path.read_text() == before and os.listdir(lock.path.parent) == ["run.lock"]
    assert lock.holder().pid == alive


def test_another_host_with_a_fresh_heartbeat_is_refused(tmp_path):
    lock = lock_at(tmp_path)
    hold(lock.path, 4242, host="node7", age=20, slurm_job="99_3")
    with pytest.raises(Held) as held:
        lock.acquire()
    text = held.value.holder.describe()
    assert text.startswith("pid 4242 on host node7 since ") and re.search(r"\(heartbeat 2\d s ago; SLURM job 99_3\)$",
                                                                          text), text
    assert held.value.holder.how_to_stop() == "scancel 99_3"


def test_an_unreadable_lock_is_refused_while_fresh(tmp_path):
    lock = lock_at(tmp_path)
    lock.path.parent.mkdir()
    lock.path.write_text("")  # being written where there are no hard links, or damaged
    with pytest.raises(Held, match=r"a job whose lock file cannot be read \(heartbeat \d s ago\)"):
        lock.acquire()


STALE = {
    "dead process on this host": (lambda live: dict(pid=dead_pid()), "that process is gone"),
    "pid reused by another process": (lambda live: dict(pid=live, start=lockmod._start_time(live) - 1),
                                      "that process is gone"),
    "another host, heartbeat too old": (lambda live: dict(pid=live, host="node7", age=lockmod.STALE_S + 60),
                                        "its heartbeat stopped 4 min ago"),
    "this host restarted since": (lambda live: dict(pid=live, boot="an earlier boot", age=lockmod.STALE_S + 60),
                                  "its heartbeat stopped 4 min ago"),
}


@pytest.mark.parametrize("case", sorted(STALE))
def test_a_dead_holder_is_taken_over_with_one_line(tmp_path, alive, caplog, case):
    make, reason = STALE[case]
    lock = lock_at(tmp_path)
    holder = make(alive)
    hold(lock.path, **holder)
    with caplog.at_level(logging.WARNING, "sparsecomm.lock"):
        lock.acquire()
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"took over the lock of the run directory {tmp_path / 'run'} from pid {holder['pid']} on "
                           f"host {holder.get('host', HOST)} since ") and line.endswith(f": {reason}"), line
    assert json.loads(lock.path.read_text())["token"] == lock.token
    lock.release()
    assert not lock.path.exists()


def test_an_old_unreadable_lock_is_taken_over(tmp_path, caplog):
    lock = lock_at(tmp_path)
    lock.path.parent.mkdir()
    lock.path.write_text("{not json")
    old = time.time() - lockmod.STALE_S - 60
    os.utime(lock.path, (old, old))
    with caplog.at_level(logging.WARNING, "sparsecomm.lock"):
        lock.acquire()
    assert "from a job whose lock file cannot be read: its heartbeat stopped 4 min ago" in caplog.text
    lock.release()


UNWRITABLE = {"ENOSPC": "No space left on device", "EROFS": "Read-only file system", "EACCES": "Permission denied",
              "EDQUOT": "Disk quota exceeded"}


@pytest.mark.parametrize("code", sorted(UNWRITABLE))
def test_a_lock_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, code):
    """As a full disk (the write fails), a read-only mount or a folder without permission (the
    create fails): one line naming the lock file and the OS error, nothing left behind."""
    number = getattr(errno, code)
    lock = lock_at(tmp_path)
    if code in ("ENOSPC", "EDQUOT"):
        def write(fd, data):
            raise OSError(number, os.strerror(number))
        monkeypatch.setattr(lockmod.os, "write", write)
    else:
        real_open = os.open

        def create(path, flags, *args, **kw):
            if flags & os.O_CREAT:
                raise OSError(number, os.strerror(number), str(path))
            return real_open(path, flags, *args, **kw)
        monkeypatch.setattr(lockmod.os, "open", create)
    with pytest.raises(LockError) as failed:
        lock.acquire()
    monkeypatch.undo()
    message = str(failed.value)
    assert message == (f"cannot lock the run directory {tmp_path / 'run'}: writing {lock.path} failed: "
                       f"{UNWRITABLE[code]} ({code}); make room or make it writable, or choose another --output-dir "
                       f"(OUTPUT_DIR)")
    assert os.listdir(lock.path.parent) == [] and not lock.held


def _mount(*args):
    return subprocess.run(["mount", *args], capture_output=True, text=True).returncode == 0


@pytest.fixture
def mounts(tmp_path):
    """A read-only folder and a full one, as real file systems (a read-only bind mount, a tmpfs
    filled up); skipped where this machine cannot mount."""
    ro, full = tmp_path / "ro", tmp_path / "full"
    ro.mkdir()
    full.mkdir()
    made = []
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only and a full file system needs root")
    if not (_mount("--bind", str(ro), str(ro)) and made.append(ro) is None
            and _mount("-o", "remount,ro,bind", str(ro)) and _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full))
            and made.append(full) is None):
        for m in made:
            subprocess.run(["umount", str(m)])
        pytest.skip("this machine cannot mount a read-only bind mount or a tmpfs")
    with open(full / "filler", "wb") as f:
        try:
            f.write(b"\0" * 1024 * 1024)
        except OSError:
            pass
    yield ro, full
    for m in made:
        subprocess.run(["umount", "-l", str(m)])


def test_read_only_and_full_file_systems(mounts):
    ro, full = mounts
    for where, code in ((ro, "EROFS"), (full, "ENOSPC")):
        lock = RunLock(where / ".locks" / "run.lock", f"run directory {where / 'run'}")
        with pytest.raises(LockError, match=rf"writing {re.escape(str(lock.path))} failed: .* \({code}\); "):
            lock.acquire()
    assert not (full / ".locks").exists() or not list((full / ".locks").iterdir())


def test_many_processes_at_once_one_wins(tmp_path):
    """Six processes take the same lock at the same moment, twice: one wins each time, the others
    are refused naming it (the winner holds on until they have all tried)."""
    script = ("import os, sys, time; from pathlib import Path; from sparsecomm.lock import RunLock, Held\n"
              "lock = RunLock(Path(sys.argv[1]), 'run directory r')\n"
              "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
              "try:\n    lock.acquire()\nexcept Held as held:\n    print('held', held.holder.pid); sys.exit(3)\n"
              "print('won', flush=True)\n"
              "while not os.path.exists(sys.argv[3]): time.sleep(0.01)\n"
              "lock.release()\n")
    for attempt in range(2):
        path, tried = tmp_path / str(attempt) / ".locks" / "run.lock", tmp_path / f"tried-{attempt}"
        at = time.time() + 1.5
        procs = [subprocess.Popen([PY, "-c", script, str(path), str(at), str(tried)], cwd=ROOT, stdout=subprocess.PIPE,
                                  text=True) for _ in range(6)]
        outs = {}
        while len(outs) < 5:  # the losers, refused
            for p in procs:
                if p.pid not in outs and p.poll() is not None:
                    outs[p.pid] = (p.stdout.read().split(), p.returncode)
            assert time.time() < at + 60, outs
            time.sleep(0.01)
        tried.touch()
        [winner] = [p for p in procs if p.pid not in outs]
        assert winner.communicate(timeout=60)[0].split() == ["won"] and winner.returncode == 0
        assert all(out == (["held", str(winner.pid)], 3) for out in outs.values()), outs
        assert not path.parent.exists()


def test_heartbeat_keeps_it_fresh_and_notices_a_takeover(tmp_path, caplog):
    lock = lock_at(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    time.sleep(0.5)
    assert time.time() - lock.path.stat().st_mtime < 5, "the heartbeat touches the file"
    hold(lock.path, 4242, host="node7")  # another job took it over (this one was thought dead)
    with caplog.at_level(logging.ERROR, "sparsecomm.lock"):
        time.sleep(0.5)
    assert "is no longer this job's (pid 4242 on host node7" in caplog.text
    lock.release()
    assert json.loads(lock.path.read_text())["pid"] == 4242, "another job's lock is not removed"


def test_a_process_that_exits_gives_it_back_and_one_killed_leaves_it_to_be_taken_over(tmp_path, caplog):
    path = tmp_path / ".locks" / "run.lock"
    take = f"from pathlib import Path; from sparsecomm.lock import RunLock; RunLock(Path({str(path)!r}), 'x').acquire()"
    done = subprocess.run([PY, "-c", take], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not path.exists(), done.stderr
    killed = subprocess.Popen([PY, "-c", take + "; import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], cwd=ROOT)
    killed.wait(timeout=60)
    assert json.loads(path.read_text())["pid"] == killed.pid
    with caplog.at_level(logging.WARNING, "sparsecomm.lock"):
        RunLock(path, "x").acquire()
    assert f"from pid {killed.pid} on host {HOST}" in caplog.text and "that process is gone" in caplog.text


# --------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock-data")
    tiny_data.write_libsvm(root, "tiny.svm", n=2048, features=64)
    return root


def settings(data_dir, out, *extra):
    return ["task=logreg", "model=logreg", f"data.dir={data_dir}", f"output_dir={out}", "task_options.path=tiny.svm",
            "reducer.name=exdyna", "reducer.density=0.05", "optimizer.lr=0.01", "data.batch_size=64", "epochs=1",
            "records.progress=false", *extra]


def trainer(data_dir, out, virtual=0, wait_s=0.0, *extra):
    cfg = load_config(None, settings(data_dir, out, *extra))
    return Trainer(cfg, join("cpu", virtual=virtual), wait_s=wait_s)


@pytest.mark.parametrize("virtual", [0, 2])
def test_the_trainer_refuses_a_run_in_use_before_writing_or_moving_anything(data_dir, tmp_path, alive, virtual):
    """Workers of a process, or virtual workers: an earlier run's records (which a start without
    its checkpoint would move aside) stay where they are, untouched."""
    name = f"logreg-logreg-exdyna-c0.05-{'V2' if virtual else 'P1'}-b64-seed0-lr0.01-pathtiny.svm"
    run_dir = tmp_path / name
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    hold(run_lock(run_dir).path, alive)
    with pytest.raises(RunInUse) as refused:
        trainer(data_dir, tmp_path, virtual)
    assert str(refused.value).startswith(f"the run directory {run_dir} is in use by another job: pid {alive} on host "
                                         f"{HOST} since ")
    assert str(refused.value).endswith(f" (alive); let it finish, stop it (kill {alive}; it checkpoints first), or "
                                       f"start this one with --wait-for-run to wait for it and then resume")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".locks", name]
    assert os.listdir(run_dir) == ["metrics.jsonl"] and (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_the_trainer_waits_for_the_holder_then_trains(data_dir, tmp_path, caplog):
    holder = subprocess.Popen(["sleep", "3"])
    run_dir = tmp_path / "logreg-logreg-exdyna-c0.05-P1-b64-seed0-lr0.01-pathtiny.svm"
    hold(run_lock(run_dir).path, holder.pid)
    with caplog.at_level(logging.INFO, "sparsecomm.train.loop"):
        t = trainer(data_dir, tmp_path, 0, 60.0)
        summary = t.run()
    holder.wait()
    waiting = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert len(waiting) == 1 and waiting[0].endswith("waiting up to 60 s for it to end (--wait-for-run)")
    assert "the other job has let go of" in caplog.text
    assert summary["complete"] and not (tmp_path / ".locks").exists()


def test_the_trainer_gives_up_waiting_after_the_bound(data_dir, tmp_path, alive):
    run_dir = tmp_path / "logreg-logreg-exdyna-c0.05-P1-b64-seed0-lr0.01-pathtiny.svm"
    hold(run_lock(run_dir).path, alive)
    with pytest.raises(RunInUse, match=r"in use by another job: .*; still after waiting 1 s: wait longer "
                                       rf"\(--wait-for-run SECONDS\) or stop it \(kill {alive}; it checkpoints first\)$"):
        trainer(data_dir, tmp_path, 0, 1.0)


def test_ctrl_c_while_waiting_stops_without_writing(data_dir, tmp_path, alive):
    import threading

    run_dir = tmp_path / "logreg-logreg-exdyna-c0.05-P1-b64-seed0-lr0.01-pathtiny.svm"
    hold(run_lock(run_dir).path, alive)
    before = signal.getsignal(signal.SIGINT)  # whatever this test process had installed
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(Stopped, match=rf"^stopped by SIGINT while waiting for {re.escape(str(run_dir))}$") as stop:
        trainer(data_dir, tmp_path, 0, 60.0)
    assert stop.value.signum == signal.SIGINT and not run_dir.exists()
    assert signal.getsignal(signal.SIGINT) is before, "the trainer's handlers are put back"


def test_the_trainer_takes_over_a_dead_jobs_lock_and_gives_it_back_however_it_ends(data_dir, tmp_path, caplog):
    run_dir = tmp_path / "logreg-logreg-exdyna-c0.05-P1-b64-seed0-lr0.01-pathtiny.svm"
    pid = dead_pid()
    hold(run_lock(run_dir).path, pid)
    with caplog.at_level(logging.WARNING, "sparsecomm.lock"):
        t = trainer(data_dir, tmp_path, 0, 0.0, "max_steps=3")
    assert f"took over the lock of the run directory {run_dir} from pid {pid}" in caplog.text
    assert json.loads(run_lock(run_dir).path.read_text())["pid"] == os.getpid()
    with pytest.raises(Stopped):
        t.run()
    assert not (tmp_path / ".locks").exists(), "a stop gives it back"
    with pytest.raises(FileNotFoundError):  # a build that fails gives it back too
        trainer(tmp_path / "no-data", tmp_path)
    assert not (tmp_path / ".locks").exists()


def test_wait_option_and_its_variable_are_checked(monkeypatch, capsys):
    from sparsecomm.train.cli import main as cli_main

    with pytest.raises(SystemExit) as done:
        cli_main(["--preset", "logreg", "--wait-for-run", "-5", "--check"])
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith("error: argument --wait-for-run: must be a number of seconds >= 0, "
                                              "got '-5'")
    monkeypatch.setenv("SPARSECOMM_WAIT_FOR_RUN", "soon")
    assert cli_main(["--preset", "logreg", "--check"]) == 2
    assert capsys.readouterr().err == "error: SPARSECOMM_WAIT_FOR_RUN must be a number of seconds >= 0, got 'soon'\n"


def test_a_lock_that_cannot_be_written_stops_the_trainer_in_one_line(mounts, data_dir, caplog, capsys):
    """The trainer's command line alone (no run.sh check before it): exit 2, one line naming the
    lock and the OS error, nothing else said."""
    from sparsecomm.train.cli import main as cli_main

    for where, code in zip(mounts, ("EROFS", "ENOSPC")):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert cli_main(["--preset", "logreg", "--data-dir", str(data_dir), "--output-dir", str(where),
                             *[a for s in settings(data_dir, where)[4:] for a in ("--set", s)]]) == 2
        said = [r for r in caplog.records if r.name.startswith("sparsecomm")]
        assert len(said) == 1 and said[0].levelname == "ERROR", [r.getMessage() for r in said]
        assert re.fullmatch(rf"cannot lock the run directory {re.escape(str(where))}/logreg-\S+: writing "
                            rf"{re.escape(str(where))}/\.locks/logreg-\S+\.lock failed: .* \({code}\); make room or "
                            r"make it writable, or choose another --output-dir \(OUTPUT_DIR\)", said[0].getMessage())
        assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- real starts
def launch(cmd, env, log):
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def lock_holder(out, timeout=120, until=None):
    """The pid a run lock under ``out`` names, once there is one (None after ``timeout`` s, or
    once ``until()`` is true)."""
    deadline = time.time() + timeout
    while True:
        for path in Path(out).glob(".locks/*.lock"):
            try:
                return json.loads(path.read_text())["pid"]
            except (OSError, ValueError):
                pass
        if time.time() > deadline or (until and until()):
            return None
        time.sleep(0.02)


def freeze(pids, signum=signal.SIGSTOP):
    for pid in pids:
        os.kill(pid, signum)


def assert_trained_once(out, steps, *logs):
    """One run directory, complete, every step trained and recorded once, no lock left; each
    checkpoint written once across the jobs' logs."""
    run_dir = only_run_dir(out)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == steps
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if "split" not in line] == list(range(1, steps + 1))
    assert len([line for line in lines if "split" in line]) == 1
    written = [m for log in logs for m in re.findall(r"checkpoint (step-\d+) written", Path(log).read_text())]
    assert len(written) == len(set(written)) and written, written
    assert not (Path(out) / ".locks").exists()


def test_second_run_sh_while_the_first_trains_stops_in_one_line(data_dir, tmp_path):
    """The issue's double start: the second ./run.sh stops in seconds, before any data or worker,
    naming the job that holds the run; the first trains to the end, alone."""
    out = tmp_path / "runs"
    env = job_env(data_dir, out, NPROC=2, **FROZEN_OK)
    first = launch(["./run.sh"], env, tmp_path / "first.log")
    try:
        _wait_for_config(out)  # the first job has built its trainer, in its run directory
        holder = lock_holder(out, timeout=0)
        workers = worker_pids(out)
        freeze(workers)
        try:
            second = subprocess.run(["./run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        finally:
            freeze(workers, signal.SIGCONT)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stdout == "" and second.stderr.count("\n") == 1, second.stderr
        assert re.fullmatch(rf"error: the run directory {re.escape(str(out))}/logreg-\S+ is in use by another job: "
                            rf"pid {holder} on host {re.escape(HOST)} since \S+ \S+ \(alive\); let it finish, stop it "
                            rf"\(kill {holder}; it checkpoints first\), or start this one with --wait-for-run to wait "
                            r"for it and then resume\n", second.stderr), second.stderr
        assert first.wait(timeout=180) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        first.kill()
    assert_trained_once(out, RUN_STEPS, tmp_path / "first.log")


@pytest.mark.parametrize("delay", [0.0, 1.0])
def test_two_starts_at_once_one_trains_the_other_stops(data_dir, tmp_path, delay):
    """Two trainers started together (or a second later): whichever takes the run first trains it
    to the end; the other stops with one line naming it, exit 2, having written nothing."""
    out = tmp_path / "runs"
    cmd = [PY, "-m", "sparsecomm.train", "--preset", "logreg", "--data-dir", str(data_dir), "--output-dir", str(out),
           "--reducer", "exdyna", "--density", "0.05", "--epochs", "1", *JOB.split()]
    procs = []
    for i in range(2):
        procs.append(launch(cmd, clean_env(**FROZEN_OK), tmp_path / f"{i}.log"))
        time.sleep(delay)
    try:
        winner = lock_holder(out, until=lambda: any(p.poll() is not None for p in procs))
        if winner is not None:
            freeze([winner])  # it holds the run while the other tries
        try:
            loser = next((p for p in procs if p.pid != winner), procs[1])
            loser.wait(timeout=180)
        finally:
            if winner is not None:
                freeze([winner], signal.SIGCONT)
        codes = sorted(p.wait(timeout=180) for p in procs)
    finally:
        for p in procs:
            p.kill()
    logs = {p.pid: (tmp_path / f"{i}.log").read_text() for i, p in enumerate(procs)}
    assert codes == [0, 2], logs
    refusal = [line for line in logs[loser.pid].splitlines() if line.strip()]
    assert len(refusal) == 1 and f"is in use by another job: pid {winner} on host {HOST} since " in refusal[0], refusal
    assert_trained_once(out, 2048 // 16, *(tmp_path / f"{i}.log" for i in range(2)))


def test_kill_9_of_run_sh_then_an_immediate_restart(data_dir, tmp_path):
    """run.sh (its launcher) killed with SIGKILL while its workers still run (they get SIGTERM and
    go on to checkpoint): a restart at that moment stops in one line; one with --wait-for-run
    waits for them, says so once, and resumes from their checkpoint. One run, trained once."""
    out = tmp_path / "runs"
    env = job_env(data_dir, out, NPROC=2, **FROZEN_OK)
    first = launch(["./run.sh"], env, tmp_path / "first.log")
    waiter = None
    try:
        _wait_for_config(out)  # every rank has built its trainer (its stop handler in place)
        holder = lock_holder(out, timeout=0)
        workers = worker_pids(out)
        freeze(workers)  # the moment after kill -9 in which the workers have not finished yet
        try:
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=30)
            refused = subprocess.run(["./run.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
            assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr[-3000:]
            assert f"is in use by another job: pid {holder} on host {HOST} since " in refused.stderr
            waiter = launch(["./run.sh"], {**env, "SPARSECOMM_WAIT_FOR_RUN": "120"}, tmp_path / "restart.log")
            deadline = time.time() + 120
            while "for it to end (--wait-for-run)" not in (tmp_path / "restart.log").read_text():
                assert time.time() < deadline and waiter.poll() is None, (tmp_path / "restart.log").read_text()[-3000:]
                time.sleep(0.2)
        finally:
            freeze(workers, signal.SIGCONT)
        assert waiter.wait(timeout=180) == 0, (tmp_path / "restart.log").read_text()[-3000:]
    finally:
        for p in (first, waiter):
            if p is not None:
                p.kill()
    stopped = re.search(r"stopped by SIGTERM at step (\d+); checkpoint step-0*(\d+)", (tmp_path / "first.log").read_text())
    assert stopped and stopped.group(1) == stopped.group(2), (tmp_path / "first.log").read_text()[-3000:]
    restart = (tmp_path / "restart.log").read_text()
    assert restart.count("waiting up to 120 s") == 1 and f"resumed at step {stopped.group(1)}" in restart, restart[-3000:]
    assert_trained_once(out, RUN_STEPS, tmp_path / "first.log", tmp_path / "restart.log")


def test_the_same_sweep_twice_over_one_output_folder(data_dir, tmp_path, capsys):
    from sparsecomm.tools import sweep

    out = tmp_path / "runs"
    args = ["--preset", "logreg", "--reducers", "exact", "--seeds", "0", "--workers", "1", "--data-dir", str(data_dir),
            "--output-dir", str(out), "--set", "task_options.path=tiny.svm", "--set", "epochs=20",
            "--set", "records.progress=false"]
    first = launch([PY, "-m", "sparsecomm", "sweep", *args], clean_env(), tmp_path / "first.log")
    try:
        deadline = time.time() + 120
        while not list(out.glob(".sweeps/*.lock")):
            assert time.time() < deadline and first.poll() is None, (tmp_path / "first.log").read_text()
            time.sleep(0.05)
        assert sweep.main(args) == 2
        text = capsys.readouterr()
        assert text.out == "" and text.err.count("\n") == 1
        assert text.err.startswith(f"error: this sweep is already running over {out}: pid {first.pid} on host {HOST} "
                                   f"since "), text.err
        assert text.err.endswith(f" (alive); let it finish or stop it (kill {first.pid}), then run this command again "
                                 f"to go on\n"), text.err
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGINT)
        first.wait(timeout=120)
    assert not list(out.glob(".sweeps/*.lock")), "a stopped sweep gives its lock back"
