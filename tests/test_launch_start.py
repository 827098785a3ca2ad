"""The pieces run.sh hands over to (python -m sparsecomm.train.start), each alone: launcher
detection, SLURM's notations, the rendezvous rules, port checks, the network interface, run.sh's
variables and EXTRA_ARGS, the data step, the in-process settings check, and the order they run
in. No job is started here; tests/test_launchers.py starts real ones."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

import tiny_data
from sparsecomm.launch import data, host, interface, rendezvous, slurm
from sparsecomm.launch.launcher import Launcher, LaunchError, check_launch, check_nproc, detect
from sparsecomm.launch.variables import Variables
from sparsecomm.train import precheck, start

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ who started us ------------
def test_nobody():
    assert detect({"RANK": "1"}, 7) is None and detect({}, 7) is None


def test_torchrun():
    env = {"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert detect(env, 7) == Launcher("torchrun", "3", "4", "1", "2")


def test_slurm_step():
    env = {"SLURM_STEP_NUM_TASKS": "7", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "3",
           "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_TASKS_PER_NODE": "9", "SLURM_JOB_ID": "42",
           "SLURM_STEP_ID": "0", "RANK": "0", "WORLD_SIZE": "1"}
    assert detect(env, 7) == Launcher("slurm", "5", "7", "1", "1", "slurm-42-0")
    del env["SLURM_STEP_TASKS_PER_NODE"], env["SLURM_LOCALID"], env["SLURM_JOB_ID"]
    assert detect(env, 7) == Launcher("slurm", "5", "7", "0", "", "slurm-0-0")  # node 3 is past "9"'s one node


def test_open_mpi_keys_the_job_by_its_namespace_else_the_parent():
    env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "PMIX_NAMESPACE": "prterun-vm-1@1"}
    assert detect(env, 7) == Launcher("Open MPI", "1", "2", "1", "2", "ompi-prterun-vm-1@1")
    del env["PMIX_NAMESPACE"]
    assert detect({**env, "OMPI_MCA_ess_base_jobid": "99"}, 7).job_key == "ompi-99"
    assert detect(env, 7).job_key == "ompi-7"


def test_mpich_and_intel_mpi():
    env = {"PMI_SIZE": "4", "PMI_RANK": "2", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "2", "PMI_KVSNAME": "kvs_1"}
    assert detect(env, 7) == Launcher("MPICH/Intel MPI", "2", "4", "0", "2", "pmi-kvs_1")
    assert detect({"PMI_SIZE": "4", "PMI_RANK": "2"}, 7) == Launcher("MPICH/Intel MPI", "2", "4", "0", "", "pmi-7")


def test_ranks_by_hand():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1"}
    assert detect(env, 7) == Launcher("environment", "1", "2", "", "")


def test_launcher_contradictions():
    good = Launcher("Open MPI", "1", "2", "1", "2", "ompi-1")
    check_launch(good, "")
    check_launch(good, "2")
    for launcher, nproc, message in [
            (Launcher("environment", "x", "2", "", ""), "", "bad rank x or world size 2 from environment"),
            (Launcher("environment", "1", "0", "", ""), "", "bad rank 1 or world size 0 from environment"),
            (Launcher("environment", "3", "2", "", ""), "", "rank 3 is out of range for world size 2 (from environment)"),
            (good, "3", "NPROC=3 conflicts with the 2 worker(s) Open MPI started on this node; unset NPROC")]:
        with pytest.raises(LaunchError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            check_launch(launcher, nproc)
        assert err.value.status == 2
    check_nproc("")
    check_nproc("12")
    for bad in ("0", "-1", "two", "02"):
        with pytest.raises(LaunchError, match=f"NPROC must be a positive integer, got '{bad}'"):
            check_nproc(bad)


# ------------------------------------------------------------------------ SLURM ---------------
@pytest.mark.parametrize("spec, node, count", [("2(x3),1", "0", "2"), ("2(x3),1", "2", "2"), ("2(x3),1", "3", "1"),
                                               ("2(x3),1", "4", ""), ("4", "0", "4"), ("1,3,2", "1", "3"),
                                               ("", "0", ""), ("2(x2)", "x", "2")])
def test_tasks_on_node(spec, node, count):
    assert slurm.tasks_on_node(spec, node) == count


@pytest.mark.parametrize("nodelist, first", [("node[01-04,07]", "node01"), ("node[07,01-04]", "node07"),
                                             ("a,b", "a"), ("gpu[3]", "gpu3"), ("solo", "solo"), ("", "")])
def test_first_listed_host(nodelist, first):
    assert slurm.first_listed_host(nodelist) == first


def test_first_host_asks_scontrol_when_there_is_one(monkeypatch):
    monkeypatch.setattr(slurm.shutil, "which", lambda name: None)
    assert slurm.first_host("node[01-04]") == "node01"
    monkeypatch.setattr(slurm.shutil, "which", lambda name: "/usr/bin/scontrol")
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "n01\nn02\n", "")

    monkeypatch.setattr(slurm.subprocess, "run", run)
    assert slurm.first_host("n[01-02]") == "n01" and calls == [["scontrol", "show", "hostnames", "n[01-02]"]]


def test_job_port():
    assert slurm.job_port("0") == 20000 and slurm.job_port("123456") == 23456 and slurm.job_port("19999") == 39999


# -------------------------------------------------------------------- ports, hosts ------------
def test_port_checks():
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert not host.port_is_free(busy) and not host.port_is_free(str(busy))
    assert host.port_is_free(host.free_port())
    assert not host.port_is_free("http") and not host.port_is_free("70000")


def test_this_host():
    assert host.is_this_host("127.0.0.1") and host.is_this_host("localhost")
    assert host.is_this_host(socket.gethostname())
    assert not host.is_this_host("203.0.113.7")  # TEST-NET-3: nobody's
    assert host.own_address() in host.addresses() or host.own_address() == socket.gethostname()
    assert host.cores() >= 1


# ---------------------------------------------------------------------- rendezvous ------------
MPI_RANK0 = Launcher("Open MPI", "0", "2", "0", "2", "ompi-1")
MPI_RANK1 = Launcher("Open MPI", "1", "2", "1", "2", "ompi-1")


def test_given_address_and_the_seeds_names():
    assert rendezvous.given({"MASTER_ADDR": "a", "MASTER_PORT": "1", "hostip": "b", "port": "2"}) == ("a", "1")
    assert rendezvous.given({"hostip": "b", "port": "2"}) == ("b", "2")
    assert rendezvous.given({"MASTER_ADDR": "", "hostip": "b"}) == ("b", "")


def test_a_given_port_in_use_on_rank_0s_host_is_refused(tmp_path):
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        busy = str(s.getsockname()[1])
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": busy}
        with pytest.raises(LaunchError, match=f"port {busy} on 127.0.0.1 is in use; unset MASTER_PORT"):
            rendezvous.for_launcher(MPI_RANK0, env, str(tmp_path))
        assert rendezvous.for_launcher(MPI_RANK1, env, str(tmp_path)) == ("127.0.0.1", busy)  # only rank 0 checks
        # another host's port is not this host's business
        assert rendezvous.for_launcher(MPI_RANK0, {**env, "MASTER_ADDR": "203.0.113.7"}, str(tmp_path))[1] == busy
    assert not (tmp_path / ".rendezvous").exists()


def test_slurm_meets_at_its_first_node(monkeypatch, tmp_path):
    monkeypatch.setattr(slurm, "first_host", lambda nodelist: f"first-of-{nodelist}")
    launcher = Launcher("slurm", "1", "4", "1", "2", "slurm-77-0")
    env = {"SLURM_STEP_NODELIST": "n[1-2]", "SLURM_JOB_NODELIST": "n[1-9]", "SLURM_JOB_ID": "20077"}
    assert rendezvous.for_launcher(launcher, env, str(tmp_path)) == ("first-of-n[1-2]", "20077")
    assert rendezvous.for_launcher(launcher, {**env, "MASTER_PORT": "555"}, str(tmp_path)) == ("first-of-n[1-2]", "555")


def test_file_rendezvous_rank_0_publishes_and_the_others_read(tmp_path):
    address, port = rendezvous.for_launcher(MPI_RANK0, {}, str(tmp_path))
    path = tmp_path / ".rendezvous" / "ompi-1"
    assert path.read_text() == f"{address} {port}\n" and host.port_is_free(port)
    assert list(path.parent.iterdir()) == [path]  # no partial file left
    assert rendezvous.for_launcher(MPI_RANK1, {}, str(tmp_path)) == (address, port)
    # rank 0 keeps a given address and publishes a free port with it
    assert rendezvous.for_launcher(MPI_RANK0, {"hostip": "10.1.2.3"}, str(tmp_path))[0] == "10.1.2.3"
    assert path.read_text().startswith("10.1.2.3 ")
    assert rendezvous.rendezvous_file(str(tmp_path), "") == tmp_path / ".rendezvous" / "job"


def test_an_earlier_jobs_file_is_not_read(tmp_path):
    path = tmp_path / "ompi-1"
    path.write_text("10.0.0.9 1234\n")
    now = time.time()
    os.utime(path, (now - 31, now - 31))
    assert not rendezvous.is_current(path, int(now))
    os.utime(path, (now - 29, now - 29))
    assert rendezvous.is_current(path, int(now))
    empty = tmp_path / "empty"
    empty.write_text("")
    assert not rendezvous.is_current(empty, int(now)) and not rendezvous.is_current(tmp_path / "none", int(now))


def test_waiting_for_rank_0_reads_its_file_once_current_and_gives_up_after_the_wait(tmp_path):
    path = tmp_path / "ompi-1"
    path.write_text("stale 1\n")
    os.utime(path, (1.0, 1.0))
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 3:
            path.write_text("10.0.0.2 29500\n")

    assert rendezvous.wait_published(path, sleep=sleep) == ("10.0.0.2", "29500")
    assert sleeps == [0.5, 0.5, 0.5]
    os.utime(path, (1.0, 1.0))
    sleeps.clear()
    with pytest.raises(LaunchError) as err:
        rendezvous.wait_published(path, sleep=sleeps.append)
    assert len(sleeps) == 240 and err.value.status == 2
    assert str(err.value) == (f"rank 0 did not publish its address in {path} within 2 minutes; on several nodes "
                              f"OUTPUT_DIR must be on a shared file system, or set MASTER_ADDR and MASTER_PORT "
                              f"(hostip/port)")


# ------------------------------------------------------------------------ interface -----------
ROUTE = "10.213.0.1 dev eth0 src 10.213.0.2 uid 0 \\    cache \n"
LOCAL_ROUTE = "local 10.213.0.1 dev lo table local src 10.213.0.1 uid 0 \\    cache <local> \n"
ADDRESSES = ("1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n"
             "4: eth0    inet 10.213.0.1/24 brd 10.213.0.255 scope global eth0\\       valid_lft forever\n")


def test_reading_ips_output():
    assert interface.route_device(ROUTE) == "eth0" and interface.route_device(LOCAL_ROUTE) == "lo"
    assert interface.route_device("x dev a via y dev b\n") == "b" and interface.route_device("") is None
    assert interface.holder(ADDRESSES, "10.213.0.1") == "eth0" and interface.holder(ADDRESSES, "10.213.0.2") is None


@pytest.fixture
def fake_ip(monkeypatch):
    monkeypatch.setattr(interface.shutil, "which", lambda name, path=None: "/sbin/ip")
    calls = []

    def ip(route, addresses=ADDRESSES):
        def run(*args):
            calls.append(args)
            return route if args[1] == "route" else addresses
        return run
    return ip, calls


def test_the_interface_that_routes_to_rank_0(fake_ip):
    ip, calls = fake_ip
    assert interface.choose("10.213.0.1", {}, ip(ROUTE)) == "eth0"
    assert calls == [("-o", "route", "get", "10.213.0.1")]
    assert interface.choose("10.213.0.1", {}, ip(LOCAL_ROUTE)) == "eth0"  # rank 0's own: the one holding it
    assert interface.choose("10.213.0.1", {}, ip(LOCAL_ROUTE, ADDRESSES.splitlines()[0])) is None
    assert interface.choose("10.213.0.1", {}, ip("")) is None


def test_no_interface_when_named_loopback_or_without_ip(fake_ip, monkeypatch):
    ip, calls = fake_ip
    assert interface.choose("10.213.0.1", {"GLOO_SOCKET_IFNAME": "eth1"}, ip(ROUTE)) is None
    assert interface.choose("10.213.0.1", {"NCCL_SOCKET_IFNAME": "eth1"}, ip(ROUTE)) is None
    assert interface.choose("127.0.0.1", {}, ip(ROUTE)) is None and interface.choose("localhost", {}, ip(ROUTE)) is None
    assert not calls
    monkeypatch.setattr(interface.shutil, "which", lambda name, path=None: None)
    assert interface.choose("10.213.0.1", {}, ip(ROUTE)) is None


def test_an_address_that_does_not_resolve_stops_the_job(fake_ip, monkeypatch):
    ip, _ = fake_ip
    monkeypatch.setattr(interface, "ipv4_address", lambda name: None)
    with pytest.raises(LaunchError, match="the rendezvous address nohost does not resolve"):
        interface.choose("nohost", {}, ip(ROUTE))


def test_a_failing_ip_stops_the_job_with_its_status(fake_ip, monkeypatch):
    monkeypatch.setattr(interface.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 2, "", "RTNETLINK answers: Network is unreachable\n"))
    with pytest.raises(LaunchError, match="`ip -o route get 10.9.9.9` failed .exit 2.: RTNETLINK") as err:
        interface.choose("10.9.9.9", {})
    assert err.value.status == 2


# ------------------------------------------------------------- run.sh's variables -------------
def test_variables_become_trainer_options():
    env = {"PRESET": "mnist-cnn", "REDUCER": "topk", "DENSITY": "0.01", "EPOCHS": "3", "SEED": "1", "NPROC": "2",
           "DATA_DIR": "/d", "OUTPUT_DIR": "/o", "MODEL": "", "EXTRA_ARGS": "--fresh"}
    v = Variables.from_env(env)
    assert v.nproc == "2" and v.named_preset == "mnist-cnn"
    assert v.trainer_args(["--fresh", "x y"]) == ["--data-dir", "/d", "--output-dir", "/o", "--preset", "mnist-cnn",
                                                  "--reducer", "topk", "--density", "0.01", "--epochs", "3",
                                                  "--seed", "1", "--fresh", "x y"]
    assert Variables("/d", "/o").trainer_args() == ["--data-dir", "/d", "--output-dir", "/o", "--preset",
                                                    "resnet18-cifar10"]
    by_model = Variables("/d", "/o", model="vgg16", dataset="cifar10")
    assert by_model.named_preset == "" and by_model.trainer_args() == ["--data-dir", "/d", "--output-dir", "/o",
                                                                       "--model", "vgg16", "--task", "cifar10"]


@pytest.fixture
def handover_stub(tmp_path):
    """A copy of run.sh whose .venv python only answers run.sh's environment probe and writes
    the arguments and variables it was handed over, one a line."""
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(ROOT / "run.sh", tmp_path / "run.sh")
    stub = tmp_path / ".venv" / "bin" / "python"
    stub.write_text('#!/bin/bash\n[[ $1 == -c ]] && exit "${STUB_PROBE:-0}"\n'
                    'shift; printf "%s\\n" "$@" > "$STUB_OUT"; '
                    'env | grep -E "^(PRESET|MODEL|DATA_DIR|OUTPUT_DIR|NPROC|EXTRA_ARGS)=" | sort >> "$STUB_OUT"\n')
    stub.chmod(0o755)
    return tmp_path


def _run_sh(folder, *args, **env):
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    return subprocess.run([str(folder / "run.sh"), *args], env={**keep, "STUB_OUT": str(folder / "out"), **env},
                          capture_output=True, text=True, timeout=60)


def test_extra_args_are_shell_quoted_and_come_before_run_shs_own(handover_stub):
    done = _run_sh(handover_stub, "--seed", "a b", PRESET="logreg",
                   EXTRA_ARGS="--set 'reducer.options={foo: 1}' --set \"x=a b\" --fresh")
    assert done.returncode == 0, done.stderr
    lines = (handover_stub / "out").read_text().splitlines()
    assert lines == ["sparsecomm.train.start", "--set", "reducer.options={foo: 1}", "--set", "x=a b", "--fresh",
                     "--seed", "a b", f"DATA_DIR={handover_stub}/data",
                     "EXTRA_ARGS=--set 'reducer.options={foo: 1}' --set \"x=a b\" --fresh", "MODEL=", "NPROC=",
                     f"OUTPUT_DIR={handover_stub}/runs", "PRESET=logreg"]


def test_run_sh_never_installs_under_a_launcher(handover_stub):
    done = _run_sh(handover_stub, STUB_PROBE="1", PYTHON=str(handover_stub / ".venv" / "bin" / "python"),
                   OMPI_COMM_WORLD_SIZE="2", OMPI_COMM_WORLD_RANK="1")
    assert done.returncode == 2 and not (handover_stub / "out").exists()
    assert done.stderr.startswith("run.sh [rank 1]: error: sparsecomm is not installed for ")
    assert "run.sh never installs under a launcher (many ranks would race). Run ./run.sh --setup once" in done.stderr


# ---------------------------------------------------------------------------- data ------------
def test_data_folders():
    assert data.folder("wikitext2") == "wikitext-2" and data.folder("mnist") == "mnist"
    assert data.folder("logreg") is None and data.folder("ml-100k") == "ml-100k"


def test_the_other_ranks_wait_for_the_marker(tmp_path):
    said, sleeps = [], []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) == 5:
            tiny_data.mark_prepared(tmp_path, "wikitext2", "zip")

    (tmp_path / "wikitext-2").mkdir()
    data.wait_prepared(str(tmp_path), "wikitext2", said.append, every_s=2, sleep=sleep)
    assert len(sleeps) == 5
    assert said == [f"waiting for rank 0 to prepare wikitext2 in {tmp_path}/wikitext-2"] * 3


def test_preparing_gives_the_scripts_status(tmp_path):
    script = tmp_path / "prepare.sh"
    script.write_text('#!/bin/bash\necho "$@" > "${0%.sh}.args"; [[ $3 == killed ]] && kill -TERM $$; exit 3\n')
    script.chmod(0o755)
    assert data.prepare(script, "/d", "mnist") == 3
    assert (tmp_path / "prepare.args").read_text() == "--data-dir /d mnist\n"
    assert data.prepare(script, "/d", "killed") == 128 + signal.SIGTERM


# ------------------------------------------------------------------ the settings check --------
def test_reading_the_checks_answer():
    answer = precheck.read_answer("preset=logreg\ntask=logreg\ngpus=0\nworkers=2\nrun_dir=/o/x\n")
    assert answer == precheck.Checked("logreg", "logreg", 0, "2")
    assert precheck.read_answer("usage: python -m sparsecomm.train [-h]\n  --set KEY=VALUE\n") is None


def test_the_check_runs_here_and_only_rank_0_speaks(tmp_path, capsys):
    tiny_data.write_libsvm(tmp_path, "tiny.svm", n=64, features=8)
    args = ["--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "runs"), "--preset", "logreg",
            "--set", "task_options.path=tiny.svm"]
    before = os.environ.get("RANK")
    status, out = precheck.run_check(args, "2", "0")
    assert status == 0 and precheck.read_answer(out) == precheck.Checked("logreg", "logreg", 0, "2")
    assert os.environ.get("RANK") == before and not (tmp_path / "runs").exists()
    capsys.readouterr()
    assert precheck.run_check([*args, "--reducer", "exdina"], "2", "0")[0] == 2
    assert "unknown reducer 'exdina'" in capsys.readouterr().err
    assert precheck.run_check([*args, "--reducer", "exdina"], "2", "1")[0] == 2
    assert capsys.readouterr().err == ""
    assert precheck.run_check([*args, "--fersh"], "2", "0")[0] == 2


# ----------------------------------------------------------------- the order of things -------
@pytest.fixture
def quiet_job(monkeypatch):
    """start's steps with the check, the data and the interface replaced by records of their calls."""
    calls = []

    def check(args, workers, rank):
        calls.append(("check", workers, rank))
        return 0, "preset=logreg\ntask=mnist\ngpus=0\nworkers=2\n"

    monkeypatch.setattr(start, "run_check", check)
    monkeypatch.setattr(start.data, "prepare", lambda script, d, task: calls.append(("prepare", task)) or 0)
    monkeypatch.setattr(start.data, "wait_prepared", lambda d, task, say: calls.append(("wait", task)))
    monkeypatch.setattr(start.interface, "choose", lambda address, env: "eth0")
    monkeypatch.setattr(start.host, "cores", lambda: 8)
    return calls


def test_a_plain_run_hands_over_to_the_local_launcher(quiet_job, tmp_path):
    said = []
    v = Variables(str(tmp_path / "d"), str(tmp_path / "o"), model="cnn")
    got = start.plain(v, v.trainer_args(), {"MASTER_PORT": str(host.free_port())}, said.append)
    port = got.env["MASTER_PORT"]
    assert got.module == "sparsecomm.launch"
    assert got.args == ["--nproc", "2", "--port", port, "--", "--preset", "logreg", *v.trainer_args()]
    assert quiet_job == [("check", "auto", "0"), ("prepare", "mnist")]
    assert said == ["starting 2 local worker(s) (gloo on the CPU)"]


def test_rank_0_of_an_mpi_job_publishes_and_says_where(quiet_job, tmp_path):
    said = []
    v = Variables(str(tmp_path / "d"), str(tmp_path / "o"), preset="logreg")
    got = start.launched(MPI_RANK0, v, v.trainer_args(), {"PATH": "/bin"}, said.append)
    address, port = (tmp_path / "o" / ".rendezvous" / "ompi-1").read_text().split()
    assert got.module == "sparsecomm.train" and got.args == v.trainer_args()
    assert got.env == {"PATH": "/bin", "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": address,
                       "MASTER_PORT": port, "GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0",
                       "LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "4"}
    assert said == [f"collectives use network interface eth0 (it routes to {address}); set GLOO_SOCKET_IFNAME / "
                    f"NCCL_SOCKET_IFNAME to choose another",
                    f"Open MPI started 2 worker(s); rendezvous at {address}:{port}"]
    assert quiet_job == [("check", "2", "0"), ("prepare", "mnist")]


def test_the_other_ranks_read_the_address_and_wait_for_the_data(quiet_job, tmp_path):
    rendezvous.publish(tmp_path / "o" / ".rendezvous" / "ompi-1", "10.0.0.5", "2345")
    said = []
    v = Variables(str(tmp_path / "d"), str(tmp_path / "o"), preset="logreg")
    got = start.launched(MPI_RANK1, v, v.trainer_args(), {"OMP_NUM_THREADS": "3"}, said.append)
    assert (got.env["MASTER_ADDR"], got.env["MASTER_PORT"], got.env["OMP_NUM_THREADS"]) == ("10.0.0.5", "2345", "3")
    assert said == [] and quiet_job == [("check", "2", "1"), ("wait", "mnist")]


def test_ranks_by_hand_need_the_address(quiet_job, tmp_path):
    v = Variables(str(tmp_path / "d"), str(tmp_path / "o"), preset="logreg")
    by_hand = Launcher("environment", "1", "2", "", "")
    with pytest.raises(LaunchError, match="RANK and WORLD_SIZE are set but not the rendezvous address"):
        start.launched(by_hand, v, [], {"MASTER_ADDR": "10.0.0.1"}, print)
    got = start.launched(by_hand, v, [], {"hostip": "10.0.0.1", "port": "99"}, print)
    assert (got.env["MASTER_ADDR"], got.env["MASTER_PORT"], got.env["LOCAL_RANK"]) == ("10.0.0.1", "99", "0")
    assert "LOCAL_WORLD_SIZE" not in got.env


def _main(monkeypatch, env):
    for name in ("RANK", "WORLD_SIZE", "NPROC", "MASTER_PORT", "OMPI_COMM_WORLD_SIZE", "DENSITY", "EPOCHS", "SEED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return start.main([])


def test_main_says_a_bad_setting_in_one_line(monkeypatch, capsys, quiet_job):
    assert _main(monkeypatch, {"NPROC": "two", "DATA_DIR": "/d", "OUTPUT_DIR": "/o"}) == 2
    assert capsys.readouterr().err == "run.sh: error: NPROC must be a positive integer, got 'two'\n"
    assert _main(monkeypatch, {"RANK": "3", "WORLD_SIZE": "2", "DATA_DIR": "/d", "OUTPUT_DIR": "/o"}) == 2
    assert capsys.readouterr().err == ("run.sh [rank 3]: error: rank 3 is out of range for world size 2 "
                                       "(from environment)\n")
    for name, value, says in [("DENSITY", "abc", "DENSITY must be a number in (0, 1], got 'abc'"),
                              ("DENSITY", "2", "DENSITY must be a number in (0, 1], got '2'"),
                              ("EPOCHS", "0", "EPOCHS must be a positive number (fractions allowed), got '0'"),
                              ("SEED", "x", "SEED must be an integer, got 'x'")]:
        # run.sh's variable by its name, not the trainer's option it stands for (--density)
        assert _main(monkeypatch, {name: value, "DATA_DIR": "/d", "OUTPUT_DIR": "/o"}) == 2
        assert capsys.readouterr().err == f"run.sh: error: {says}\n"
    # under a launcher, rank 0 alone says it (every rank would say the same); the others wait, then end
    slept = []
    monkeypatch.setattr(start.time, "sleep", slept.append)
    assert _main(monkeypatch, {"RANK": "1", "WORLD_SIZE": "2", "DENSITY": "abc", "DATA_DIR": "/d", "OUTPUT_DIR": "/o"}) == 2
    assert capsys.readouterr().err == "" and slept == [start.QUIET_RANK_WAIT_S]
    assert quiet_job == []


def test_a_refused_check_ends_the_quiet_ranks_later(monkeypatch, capsys):
    monkeypatch.setattr(start, "run_check", lambda args, workers, rank: (2, ""))
    slept = []
    monkeypatch.setattr(start.time, "sleep", slept.append)
    env = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "DATA_DIR": "/d", "OUTPUT_DIR": "/o"}
    assert _main(monkeypatch, env) == 2 and slept == [start.QUIET_RANK_WAIT_S]
    assert _main(monkeypatch, {**env, "OMPI_COMM_WORLD_RANK": "0"}) == 2 and slept == [start.QUIET_RANK_WAIT_S]
    assert capsys.readouterr().err == ""


def test_the_cpu_notice_names_a_quick_job_with_the_mirror_the_user_gave(monkeypatch):
    """The quick job the CPU notice suggests keeps SPARSECOMM_DATA_URL: offline, its data comes
    from the same mirror (copied as printed, the command without it failed to fetch MNIST)."""
    from sparsecomm.config import load_config
    from sparsecomm.train import estimate
    from sparsecomm.train.presets import find_preset

    monkeypatch.setattr(estimate, "estimate_on_cpu", lambda cfg, workers: estimate.CpuEstimate(
        100 if cfg.preset == estimate.QUICK_PRESET else 10**6, 1.0))
    slow, quick = (load_config(find_preset(p), preset_name=p) for p in ("resnet18-cifar10", estimate.QUICK_PRESET))
    monkeypatch.delenv("SPARSECOMM_DATA_URL", raising=False)
    assert estimate.cpu_notice(slow, 2, quick).endswith("in minutes on this CPU: PRESET=mnist-cnn ./run.sh (about 1 min 40 s)")
    monkeypatch.setenv("SPARSECOMM_DATA_URL", "/data/my mirror")
    assert "on this CPU: SPARSECOMM_DATA_URL='/data/my mirror' PRESET=mnist-cnn ./run.sh (about" in \
        estimate.cpu_notice(slow, 2, quick)
