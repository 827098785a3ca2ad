"""What a SLURM step's environment says in SLURM's own notations: tasks per node
(``2(x3),1``), node lists (``node[01-04,07]``), and the port a job's rendezvous uses."""
from __future__ import annotations

import shutil
import subprocess

__all__ = ["tasks_on_node", "first_listed_host", "first_host", "job_port"]


def tasks_on_node(spec: str, node: str) -> str:
    """The task count of node number ``node`` in a tasks-per-node ``spec`` such as ``2(x3),1``
    (two tasks on each of nodes 0 to 2, one on node 3); "" when the spec does not reach it."""
    try:
        index = int(node)
    except ValueError:
        index = 0
    first = 0
    for part in spec.split(",") if spec else []:
        count, repeats = part.split("(")[0], 1
        if "(x" in part:
            repeats = int(part.rsplit("(x", 1)[1].removesuffix(")"))
        if index < first + repeats:
            return count
        first += repeats
    return ""


def first_listed_host(nodelist: str) -> str:
    """The first host of a node list, read without SLURM's tools: ``node[01-04,07]`` -> ``node01``,
    ``a,b`` -> ``a``."""
    host = nodelist.split(",")[0]
    if "[" in host:
        inside = nodelist.split("[", 1)[1]
        for stop in "-,]":
            inside = inside.split(stop)[0]
        host = host.split("[")[0] + inside
    return host


def first_host(nodelist: str) -> str:
    """The first host of ``nodelist``: from ``scontrol show hostnames`` where scontrol is
    installed (a failing one raises :class:`subprocess.CalledProcessError`), else read from the
    list itself."""
    if shutil.which("scontrol") is None:
        return first_listed_host(nodelist)
    done = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    return lines[0] if lines else ""


def job_port(job_id: str) -> int:
    """The rendezvous port of SLURM job ``job_id``: 20000 to 39999, the same on every node."""
    return 20000 + int(job_id) % 20000
