"""Real launchers for the launcher tests: Open MPI and a single-node SLURM, installed from
Debian's packages and started without systemd by the tests themselves."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = {"mpirun": "openmpi-bin", "slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client",
            "munged": "munge"}


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)),
                                      None)


def ensure_packages(binaries: tuple[str, ...]) -> str | None:
    """Install the Debian packages behind ``binaries`` if missing; a reason to skip, or None."""
    missing = [b for b in binaries if _which(b) is None]
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"{', '.join(missing)} missing and installing Debian packages needs root"
    if shutil.which("apt-get") is None:
        return f"{', '.join(missing)} missing and there is no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    packages = sorted({PACKAGES[b] for b in missing})
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *packages]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {done.stderr.strip()[-300:]}"
    missing = [b for b in binaries if _which(b) is None]
    return f"{', '.join(missing)} still missing after installing {packages}" if missing else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class SingleNodeSlurm:
    """slurmctld + slurmd on this host, configured in a temporary folder (SLURM_CONF)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.host = socket.gethostname().split(".")[0]

    def start(self) -> str | None:
        """Start the daemons; a reason to skip, or None."""
        if os.geteuid() != 0:
            return "starting slurmctld/slurmd without systemd needs root here"
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        self.conf.write_text("\n".join([
            "ClusterName=sparsecomm-test", f"SlurmctldHost={self.host}", "AuthType=auth/munge",
            "CredType=cred/munge", "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={self.root}/state", f"SlurmdSpoolDir={self.root}/spool",
            f"SlurmctldPidFile={self.root}/slurmctld.pid", f"SlurmdPidFile={self.root}/slurmd.pid",
            f"SlurmctldLogFile={self.root}/log/slurmctld.log", f"SlurmdLogFile={self.root}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "ReturnToService=2", "MpiDefault=none", "JobRequeue=1",
            f"SlurmctldPort={free_port()}", f"SlurmdPort={free_port()}",
            f"NodeName={self.host} CPUs={cpus} State=UNKNOWN",
            "PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))
        reason = self._munge()
        if reason:
            return reason
        for daemon in ("slurmctld", "slurmd"):
            done = subprocess.run([_which(daemon)], env=self.env, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                return f"{daemon} did not start: {done.stderr.strip()[-300:]}"
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return None
            time.sleep(1)
        return f"the SLURM node did not become idle: {self.log_tail()}"

    def _munge(self) -> str | None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return None
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            os.makedirs(d, exist_ok=True)
        if not os.path.exists("/etc/munge/munge.key"):
            subprocess.run(["mungekey", "--create"], capture_output=True)
        done = subprocess.run([_which("munged"), "--force"], capture_output=True, text=True)
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode != 0:
            return f"munged did not start: {done.stderr.strip()[-300:]}"
        return None

    def log_tail(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                out.append(f"{name}: " + " | ".join(path.read_text().splitlines()[-5:]))
        return "; ".join(out)

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              timeout=kw.pop("timeout", 60), **kw)

    def state(self, job: str) -> str:
        """The job's JobState from scontrol; "GONE" once slurmctld has forgotten it, "?" when the query failed.

        squeue is not used: a transient controller timeout makes it print nothing, which reads like a job
        that has left the queue.
        """
        done = self.run("scontrol", "show", "job", "-o", job)
        if done.returncode != 0:
            return "GONE" if "Invalid job id" in done.stderr else "?"
        found = re.search(r"\bJobState=(\S+)", done.stdout)
        return found.group(1) if found else "?"

    def stop(self) -> None:
        self.run("scancel", "--user=root")
        for name in ("slurmd", "slurmctld"):
            pid_file = self.root / f"{name}.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text().strip()), 15)
                except (ValueError, ProcessLookupError):
                    pass
