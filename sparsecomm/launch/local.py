"""Start the workers of a job on this machine: ``python -m sparsecomm.launch --nproc N -- ARGS``.

run.sh uses it for plain runs (nobody else started the workers). Each worker runs
``python -m sparsecomm.train ARGS`` with the torchrun variables (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) set, in a session of
its own. Unlike ``torchrun --standalone``, which it replaces here:

- every stop signal the launcher gets (Ctrl-C, SIGTERM, SIGUSR1, SIGHUP) is passed on to every
  worker exactly once, so the workers checkpoint and stop together; a second Ctrl-C is passed on
  too and stops them at once;
- a worker that fails stops the others (SIGTERM, then SIGKILL after a grace period), and the
  launcher says which one in one line, without tracebacks;
- the workers die with the launcher (Linux parent-death signal), never orphaned.

The exit status is the failed worker's (128 + signal number when a signal killed it), else the
workers' own (128 + signal number after a stop signal), else 0.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

from .host import free_port

__all__ = ["main", "Workers"]

log = logging.getLogger("sparsecomm.launch.local")

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
GRACE_S = 20.0  # after a failure, how long the other workers get to stop on SIGTERM
_POLL_S = 0.1


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the launcher dies (Linux prctl)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class Workers:
    """N worker processes of one job and the signals passed on to them."""

    def __init__(self, command: list[str], nproc: int, port: int, env: dict[str, str] | None = None) -> None:
        base = dict(os.environ if env is None else env)
        if "OMP_NUM_THREADS" not in base:  # share the cores, as torchrun and run.sh under a launcher do
            base["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
        self.procs: list[subprocess.Popen] = []
        self.pending: list[int] = []
        self.stop_signal: int | None = None
        for rank in range(nproc):
            worker_env = {**base, "RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank),
                          "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                          "SPARSECOMM_LAUNCHER_SAYS_STOPS": "1"}  # the trainer leaves the stop's line to us
            self.procs.append(subprocess.Popen(command, env=worker_env, start_new_session=True,
                                               preexec_fn=_die_with_parent))

    def _on_signal(self, signum: int, frame: object) -> None:
        self.pending.append(signum)

    def _forward(self) -> None:
        while self.pending:
            signum = self.pending.pop(0)
            live = [p for p in self.procs if p.poll() is None]
            if not live:
                continue
            again = self.stop_signal is not None
            log.warning("%s: %s the %d worker(s)%s", signal.Signals(signum).name,
                        "passing it on to" if again else "asking", len(live),
                        "" if again else " to checkpoint and stop (Ctrl-C again stops them at once)")
            self.stop_signal = signum
            for p in live:
                _signal(p, signum)

    def wait(self) -> int:
        """Wait for every worker; returns the launcher's exit status."""
        previous = {s: signal.signal(s, self._on_signal) for s in FORWARDED}
        failed: tuple[int, int] | None = None  # (rank, code) of the first worker that failed
        killed_at: float | None = None
        try:
            while True:
                self._forward()
                codes = [p.poll() for p in self.procs]
                if all(c is not None for c in codes):
                    break
                if failed is None:
                    expected = (None, 0) if self.stop_signal is None else (None, 0, 128 + self.stop_signal,
                                                                            -self.stop_signal)
                    for rank, code in enumerate(codes):
                        if code not in expected:
                            failed = (rank, code)
                            if code != 2:  # a usage error is explained by the worker itself
                                log.error("worker rank %d (pid %d) %s; stopping the other workers",
                                          rank, self.procs[rank].pid, _describe(code))
                            for p in self.procs:
                                if p.poll() is None:
                                    _signal(p, signal.SIGTERM)
                            killed_at = time.monotonic()
                            break
                if killed_at is not None and time.monotonic() - killed_at > GRACE_S:
                    for p in self.procs:
                        if p.poll() is None:
                            _signal(p, signal.SIGKILL)
                    killed_at = None
                time.sleep(_POLL_S)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        if failed is not None:
            return _exit_status(failed[1])
        statuses = [_exit_status(p.returncode) for p in self.procs]
        return max(statuses) if any(statuses) else 0


def _signal(proc: subprocess.Popen, signum: int) -> None:
    try:
        proc.send_signal(signum)
    except ProcessLookupError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsecomm.launch",
                                description="Start NPROC workers of one job on this machine "
                                            "(python -m sparsecomm.train ARGS each).")
    p.add_argument("--nproc", type=int, required=True, help="number of workers")
    p.add_argument("--port", type=int, help="rendezvous port on 127.0.0.1 (default: MASTER_PORT, else a free one)")
    p.add_argument("--module", default="sparsecomm.train", help="the module each worker runs")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for every worker (after --)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [launcher] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.nproc < 1:
        print(f"error: --nproc must be a positive integer, got {args.nproc}", file=sys.stderr)
        return 2
    port = args.port or int(os.environ.get("MASTER_PORT") or 0) or free_port("127.0.0.1")
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    workers = Workers([sys.executable, "-m", args.module, *rest], args.nproc, port)
    return workers.wait()


if __name__ == "__main__":
    sys.exit(main())
