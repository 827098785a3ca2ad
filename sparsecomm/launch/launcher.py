"""Who started this process, read from the environment: torchrun, a SLURM step, Open MPI,
MPICH or Intel MPI (PMI), RANK and WORLD_SIZE set by hand, or nobody.

Each launcher names this process's rank, the job's world size, the local rank and (where it
says) how many workers it started on this node. The values are kept as the environment spells
them: they are exported to the trainer and quoted in messages as they are.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from . import slurm

__all__ = ["Launcher", "LaunchError", "detect", "check_launch", "check_nproc"]


class LaunchError(Exception):
    """A setting or a state the job cannot start with: its message is one line naming the bad
    value and what to do; ``status`` is the exit status (2 for a bad setting)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Launcher:
    """This process's place in a job some launcher started."""

    name: str         # as messages say it: torchrun, slurm, Open MPI, MPICH/Intel MPI, environment
    rank: str
    world: str
    local_rank: str   # "" when the launcher names none
    local_size: str   # workers the launcher started on this node; "" when it does not say
    job_key: str = ""  # names this job's rendezvous file; "" when the launcher gives the address

    @property
    def is_first(self) -> bool:
        """Rank 0, the one that speaks for the job, publishes the rendezvous and prepares the data."""
        return self.rank == "0"


def detect(env: Mapping[str, str], ppid: int) -> Launcher | None:
    """The launcher the environment ``env`` shows, or None when nobody started this process as
    part of a job (a plain run). ``ppid``: the parent process, which keys an MPI job that names
    no job id."""
    def get(name: str) -> str:
        return env.get(name) or ""

    if (get("TORCHELASTIC_RUN_ID") or get("GROUP_RANK")) and get("RANK") and get("WORLD_SIZE"):
        return Launcher("torchrun", get("RANK"), get("WORLD_SIZE"), get("LOCAL_RANK"), get("LOCAL_WORLD_SIZE"))
    if get("SLURM_STEP_NUM_TASKS") and get("SLURM_PROCID"):
        spec = get("SLURM_STEP_TASKS_PER_NODE") or get("SLURM_TASKS_PER_NODE")
        return Launcher("slurm", get("SLURM_PROCID"), get("SLURM_STEP_NUM_TASKS"), get("SLURM_LOCALID") or "0",
                        slurm.tasks_on_node(spec, get("SLURM_NODEID") or "0"),
                        f"slurm-{get('SLURM_JOB_ID') or '0'}-{get('SLURM_STEP_ID') or '0'}")
    if get("OMPI_COMM_WORLD_SIZE"):
        job = get("PMIX_NAMESPACE") or get("OMPI_MCA_orte_ess_jobid") or get("OMPI_MCA_ess_base_jobid") or str(ppid)
        return Launcher("Open MPI", get("OMPI_COMM_WORLD_RANK"), get("OMPI_COMM_WORLD_SIZE"),
                        get("OMPI_COMM_WORLD_LOCAL_RANK") or "0", get("OMPI_COMM_WORLD_LOCAL_SIZE"), f"ompi-{job}")
    if get("PMI_SIZE") and get("PMI_RANK"):
        return Launcher("MPICH/Intel MPI", get("PMI_RANK"), get("PMI_SIZE"),
                        get("MPI_LOCALRANKID") or get("PMI_LOCAL_RANK") or "0",
                        get("MPI_LOCALNRANKS") or get("PMI_LOCAL_SIZE"),
                        f"pmi-{get('PMI_KVSNAME') or get('PMI_ID') or str(ppid)}")
    if get("RANK") and get("WORLD_SIZE"):  # set by hand or by another tool, with MASTER_ADDR/MASTER_PORT
        return Launcher("environment", get("RANK"), get("WORLD_SIZE"), get("LOCAL_RANK"), get("LOCAL_WORLD_SIZE"))
    return None


def _positive(text: str) -> bool:
    return re.fullmatch(r"[1-9][0-9]*", text) is not None


def check_launch(launcher: Launcher, nproc: str) -> None:
    """Raise :class:`LaunchError` when the launcher's rank or world size is not a number, the
    rank is out of range, or ``nproc`` (run.sh's NPROC) contradicts the workers it started here."""
    if not (_positive(launcher.world) and re.fullmatch(r"[0-9]+", launcher.rank)):
        raise LaunchError(f"bad rank {launcher.rank} or world size {launcher.world} from {launcher.name}")
    if int(launcher.rank) >= int(launcher.world):
        raise LaunchError(f"rank {launcher.rank} is out of range for world size {launcher.world} "
                          f"(from {launcher.name})")
    if nproc and launcher.local_size and nproc != launcher.local_size:
        raise LaunchError(f"NPROC={nproc} conflicts with the {launcher.local_size} worker(s) {launcher.name} started "
                          f"on this node; unset NPROC (under a launcher the launcher decides) or change the "
                          f"launcher's task count")


def check_nproc(nproc: str) -> None:
    """Raise :class:`LaunchError` unless ``nproc`` (a plain run's NPROC) is empty or a positive integer."""
    if nproc and not _positive(nproc):
        raise LaunchError(f"NPROC must be a positive integer, got '{nproc}'")
