"""``python -m sparsecomm.train.start [TRAINER OPTIONS]``: start one job as run.sh describes it.

run.sh finds the Python environment, exports its variables (PRESET, MODEL, ..., DATA_DIR,
OUTPUT_DIR) and hands over here with EXTRA_ARGS and its own arguments as the arguments. Then:

1. who started this process (:mod:`sparsecomm.launch.launcher`); settings the launcher
   contradicts stop the job;
2. every setting is checked in this process (:mod:`.precheck`): a bad one stops the job with
   one line from rank 0 and exit status 2; the other ranks wait :data:`QUIET_RANK_WAIT_S`
   first, so that an MPI launcher, seeing a silent rank fail, does not stop rank 0 before it
   speaks;
3. under a launcher: the rendezvous (:mod:`sparsecomm.launch.rendezvous`), the network
   interface (:mod:`sparsecomm.launch.interface`) and this node's cores shared among its workers;
4. the data (:mod:`sparsecomm.launch.data`): prepared by rank 0, awaited by the others;
5. this process becomes the trainer (``python -m sparsecomm.train``), or for a plain run the
   local launcher (``python -m sparsecomm.launch``), by exec: signals and exit statuses are theirs.

What it says is run.sh's: ``run.sh [rank N]: ...`` lines on standard error.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ..launch import data, host, interface, rendezvous
from ..launch.launcher import Launcher, LaunchError, check_launch, check_nproc, detect
from ..launch.variables import Variables
from .precheck import Checked, read_answer, run_check

__all__ = ["main", "Handover", "plain", "launched"]

# The checkout run.sh belongs to (this module is imported from it: run.sh puts it first on PYTHONPATH).
ROOT = Path(__file__).parents[2]
QUIET_RANK_WAIT_S = 20.0

Say = Callable[[str], None]


@dataclass(frozen=True)
class Handover:
    """The program this process becomes: ``python -m MODULE ARGS`` with environment ``env``."""

    module: str
    args: list[str]
    env: dict[str, str]


class _Refused(Exception):
    """The settings check failed (and rank 0 has said why)."""

    def __init__(self, rank: str) -> None:
        super().__init__(rank)
        self.rank = rank


class _Exit(Exception):
    """End with ``status``; whatever is to be said has been said."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _check(args: list[str], variables: Variables, workers: str, rank: str) -> tuple[Checked, list[str]]:
    """The check's answer, and ``args`` naming the preset the check chose where none was named."""
    status, out = run_check(args, workers, rank)
    if status != 0:
        raise _Refused(rank)
    checked = read_answer(out)
    if checked is None:  # the options asked for something else (--help): its answer is all
        sys.stdout.write(out)
        raise _Exit(0)
    if not variables.named_preset:
        args = ["--preset", checked.preset, *args]
    return checked, args


def _data(task: str, data_dir: str, first: bool, say: Say) -> None:
    if data.folder(task) is None:
        return
    if first:
        status = data.prepare(ROOT / "prepare_dataset.sh", data_dir, task)
        if status:
            raise _Exit(status)
    else:
        data.wait_prepared(data_dir, task, say)


def plain(variables: Variables, args: Sequence[str], env: dict[str, str], say: Say) -> Handover:
    """A run nobody launched, with trainer options ``args``: check, prepare the data, then the
    local launcher starts the workers."""
    check_nproc(variables.nproc)
    port = env.get("MASTER_PORT") or ""
    if port and not host.port_is_free(port):
        raise LaunchError(f"port {port} on this host is in use; unset MASTER_PORT or pick another")
    checked, trainer = _check(list(args), variables, variables.nproc or "auto", env.get("RANK") or "0")
    _data(checked.task, variables.data_dir, True, say)
    say(f"starting {checked.workers} local worker(s) "
        f"({'NCCL, one GPU each' if checked.gpus > 0 else 'gloo on the CPU'})")
    return Handover("sparsecomm.launch", ["--nproc", checked.workers, *(["--port", port] if port else []), "--",
                                          *trainer], env)


def _threads(local_size: str) -> str:
    """OMP_NUM_THREADS for one of ``local_size`` workers on this node: its share of the cores, as torchrun gives."""
    return str(max(1, host.cores() // max(1, int(local_size))))


def launched(launcher: Launcher, variables: Variables, args: Sequence[str], env: dict[str, str],
             say: Say) -> Handover:
    """One rank of a launched job, with trainer options ``args``: check, agree on the rendezvous,
    prepare or await the data, then the trainer."""
    check_launch(launcher, variables.nproc)
    checked, trainer = _check(list(args), variables, launcher.world, launcher.rank)
    if launcher.name in ("torchrun", "environment"):
        address, port = rendezvous.given(env)
        if not (address and port):
            raise LaunchError("RANK and WORLD_SIZE are set but not the rendezvous address: set MASTER_ADDR and "
                              "MASTER_PORT (or the seeds' hostip and port)")
    else:
        address, port = rendezvous.for_launcher(launcher, env, variables.output_dir)
    env = {**env, "RANK": launcher.rank, "WORLD_SIZE": launcher.world, "LOCAL_RANK": launcher.local_rank or "0",
           "MASTER_ADDR": address, "MASTER_PORT": port}
    device = interface.choose(address, env)
    if device is not None:
        env.update(dict.fromkeys(interface.VARIABLES, device))
        if launcher.is_first:
            say(f"collectives use network interface {device} (it routes to {address}); set GLOO_SOCKET_IFNAME / "
                f"NCCL_SOCKET_IFNAME to choose another")
    if launcher.local_size:
        env["LOCAL_WORLD_SIZE"] = launcher.local_size
        if not env.get("OMP_NUM_THREADS"):
            env["OMP_NUM_THREADS"] = _threads(launcher.local_size)
    if launcher.is_first:
        say(f"{launcher.name} started {launcher.world} worker(s); rendezvous at {address}:{port}")
    _data(checked.task, variables.data_dir, launcher.is_first, say)
    return Handover("sparsecomm.train", trainer, env)


def _say(rank: str, message: str) -> None:
    print(f"run.sh{f' [rank {rank}]' if rank else ''}: {message}", file=sys.stderr, flush=True)


def _die_of_sigint() -> NoReturn:
    """End as a shell ends on Ctrl-C: killed by SIGINT, without a word."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    sys.exit(128 + signal.SIGINT)


def become(handover: Handover) -> NoReturn:
    """Replace this process with ``python -m MODULE ARGS`` (same pid: the launcher's signals and
    the exit status are the new program's)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", handover.module, *handover.args], handover.env)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the job run.sh's variables describe; returns only when it does not start."""
    args = sys.argv[1:] if argv is None else list(argv)
    env = dict(os.environ)
    launcher = detect(env, os.getppid())
    rank = launcher.rank if launcher is not None else env.get("RANK") or ""

    def say(message: str) -> None:
        _say(rank, message)

    try:
        try:
            variables = Variables.from_env(env)
            try:
                variables.check()
            except LaunchError:  # the same on every rank: said by rank 0 alone, as the settings check does
                if rank not in ("", "0"):
                    raise _Refused(rank) from None
                raise
            trainer = variables.trainer_args(args)
            handover = (plain(variables, trainer, env, say) if launcher is None
                        else launched(launcher, variables, trainer, env, say))
        except _Refused as refused:
            if refused.rank != "0":
                time.sleep(QUIET_RANK_WAIT_S)
            return 2
    except LaunchError as exc:
        say(f"error: {exc}")
        return exc.status
    except _Exit as stop:
        return stop.status
    except OSError as exc:
        say(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        _die_of_sigint()
    become(handover)


if __name__ == "__main__":
    sys.exit(main())
