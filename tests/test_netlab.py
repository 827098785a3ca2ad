"""Multi-host runs over real links: hosts made as network namespaces on a bridge
(``sparsecomm.netlab``, addresses 10.213.0.x, traffic only between them), run.sh started on each
the seeds' way (``hostip``/``port``) and with ``MASTER_ADDR``/``MASTER_PORT``; a host whose link
goes down mid-run. Skipped with the reason where namespaces cannot be made (not root, no
iproute2). The jobs are the launcher tests' logistic regression, which cannot diverge."""
import os
import signal
import subprocess
import time

import pytest

from sparsecomm import netlab
from test_launchers import ROOT, _wait_for_metrics, assert_same_end, data_dir, job_env, straight_plain  # noqa: F401

BOUND_S = 60


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
