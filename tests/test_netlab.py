"""Multi-host runs over real links: hosts made as network namespaces on a bridge
(``sparsecomm.tools.netlab``, addresses 10.213.0.x, traffic only between them), run.sh started on each
the seeds' way (``hostip``/``port``) and with ``MASTER_ADDR``/``MASTER_PORT``; a host whose link
goes down mid-run. Skipped with the reason where namespaces cannot be made (not root, no
iproute2). The jobs are the launcher tests' logistic regression, which cannot diverge."""
import os
import signal
import subprocess
import time

import pytest

from sparsecomm.tools import netlab
from test_launchers import ROOT, _wait_for_metrics, assert_same_end, data_dir, job_env, straight_plain  # noqa: F401

BOUND_S = 60


@pytest.mark.parametrize("args,message", [
    (["up", "2", "fast"], "rate 'fast' is not a rate; use a number with kbit, mbit, gbit or tbit"),
    (["up", "2", "0mbit"], "rate '0mbit' is not a rate"),
    (["up", "0", "1gbit"], f"hosts must be 1 to {netlab.MAX_HOSTS}"),
    (["up", str(netlab.MAX_HOSTS + 1), "1gbit"], f"hosts must be 1 to {netlab.MAX_HOSTS}"),
])
def test_bad_input_is_one_line(capsys, args, message):
    """Checked before anything is built (no privileges needed)."""
    assert netlab.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err, err


def test_a_host_that_already_exists_is_refused(capsys):
    """A namespace of the lab's name made by someone else: named, left alone, exit 2."""
    try:
        netlab.down(force=True)
        netlab.up(1, "1gbit")
        netlab.down()
    except netlab.NetlabError as exc:
        pytest.skip(str(exc))
    name = netlab.host_name(0)
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        assert netlab.main(["up", "2", "1gbit"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {name} already exist(s) but no netlab state file") and "\n" not in err, err
        assert name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    finally:
        subprocess.run(["ip", "netns", "del", name], timeout=30)


@pytest.fixture(scope="module")
def lab():
    try:
        netlab.down(force=True)  # leftovers of an interrupted earlier run
        made = netlab.up(2, "1gbit")
    except netlab.NetlabError as exc:
        print(f"\nskipping netlab tests: {exc}")
        pytest.skip(str(exc))
    yield made
    netlab.down()


def start(host, env):
    return subprocess.Popen(netlab.host_command(host, ["./run.sh"]), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def host_env(data_dir, out, rank, how, port, epochs=2, **extra):
    address = netlab.host_address(0)
    where = {"hostip": address, "port": port} if how == "hostip" else {"MASTER_ADDR": address, "MASTER_PORT": port}
    return job_env(data_dir, out, epochs=epochs, RANK=rank, WORLD_SIZE=2, LOCAL_RANK=0, **where, **extra)


@pytest.mark.parametrize("how", ["hostip", "master_addr"])
def test_two_hosts_train_like_one(lab, data_dir, straight_plain, tmp_path, how):  # noqa: F811
    """Rendezvous across addresses, the interface picked and named by run.sh, training to the end
    with the parameters of the same job on one host."""
    out = tmp_path / "runs"
    procs = [start(r, host_env(data_dir, out, r, how, 29611)) for r in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    assert "collectives use network interface eth0 (it routes to 10.213.0.1)" in results[0][1]
    assert_same_end(straight_plain, out)


@pytest.mark.parametrize("down_host", [1, 0])
def test_a_host_whose_link_goes_down(lab, data_dir, tmp_path, down_host):  # noqa: F811
    """The other worker stops within the bound, naming the lost rank (or, when rank 0's host is
    the one cut off, the lost rendezvous store it holds); nothing hangs."""
    out = tmp_path / "runs"
    procs = [start(r, host_env(data_dir, out, r, "master_addr", 29612, epochs=500, SPARSECOMM_HEARTBEAT_TIMEOUT=10))
             for r in range(2)]
    link = f"{netlab.PREFIX}-v{down_host}"
    try:
        _wait_for_metrics(out, lines=3)
        subprocess.run(["ip", "link", "set", link, "down"], check=True)
        cut = time.time()
        other = procs[1 - down_host]
        _, err = other.communicate(timeout=BOUND_S + 30)
        assert time.time() - cut < BOUND_S, f"took {time.time() - cut:.0f} s"
        assert other.returncode == 1, err[-3000:]
        expected = "rank 1 is lost" if down_host == 1 else "lost contact with the job's rendezvous store"
        assert expected in err or (down_host == 1 and "lost rank(s) 1" in err), err[-3000:]
        procs[down_host].communicate(timeout=BOUND_S + 30)  # the cut-off one stops too, on its own
        assert procs[down_host].returncode != 0
    finally:
        subprocess.run(["ip", "link", "set", link, "up"])
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
