"""Run a grid of training runs and tabulate them:
``python -m sparsecomm sweep --preset P --reducers a,b --densities 0.01,0.001 --seeds 0,1``.

Each grid point (reducer x density x seed; ``exact`` has no density: one run per seed) is a
normal ``./run.sh`` job with its normal run directory: one after another on this machine
(``--workers`` local workers each), or with ``--slurm`` one task of a SLURM job array submitted
through ``pararun``. Every point's settings are checked before anything runs. Finished runs are
skipped, interrupted ones resume from their checkpoint, so running the same command again
continues a sweep; while one sweep runs, the same sweep started again stops with one line (a
lock in ``OUTPUT_DIR/.sweeps``), and each run directory is one job's anyway. Ctrl-C (or SIGTERM, SIGUSR1) is passed on to the current run, which
checkpoints; the sweep then stops. The sweep ends with the compare table of its runs.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..commandline import OneLineParser
from ..lock import Held, LockError, RunLock
from ..units import duration
from .grid import Grid, GridError, Point, build, check, parse_density, parse_list, parse_seed, shell_exports, state

__all__ = ["main"]

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
RUN_SH = REPO / "run.sh"
PARARUN = REPO / "pararun"

EXAMPLES = """\
examples:
  python -m sparsecomm sweep --preset mnist-cnn --reducers exact,topk,exdyna --densities 0.01,0.001 --seeds 0,1
  python -m sparsecomm sweep --preset lstm-ptb-small --reducers sage --densities 0.01 --seeds 0,1,2 --slurm
  python -m sparsecomm sweep --preset logreg --reducers topk --densities 0.1 --seeds 0 --set task_options.path=a9a

Run the same command again to continue: finished runs are skipped, interrupted ones resume.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m sparsecomm sweep", epilog=EXAMPLES,
                description="Run reducers x densities x seeds of one preset through run.sh (or as a SLURM job "
                            "array), resumably, and print the comparison table of the runs.")
    p.add_argument("--preset", help="the preset every run starts from (python -m sparsecomm.train --list-presets)")
    p.add_argument("--reducers", help="comma-separated reducers (python -m sparsecomm.train --list-reducers)")
    p.add_argument("--densities", help="comma-separated densities in (0, 1] (exact ignores them)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer setting for every run, e.g. --set optimizer.lr=0.05 (repeatable)")
    p.add_argument("--workers", default="auto",
                   help="workers per run: locally NPROC for run.sh (auto: one per GPU, else 2); with --slurm the "
                        "tasks per job (auto: as pararun's #SBATCH header says)")
    p.add_argument("--data-dir", default=str(REPO / "data"), help="the data directory (default: ./data, as run.sh)")
    p.add_argument("--output-dir", default=str(REPO / "runs"), help="where run directories go (default: ./runs)")
    p.add_argument("--slurm", action="store_true", help="submit a SLURM job array through pararun, one task per run")
    p.add_argument("--entry", nargs=2, metavar=("FILE", "INDEX"),
                   help="print the run.sh variables of one point of a saved grid as shell exports (pararun uses "
                        "this in each array task), then exit")
    return p.parse_args(argv)


# ---------------------------------------------------------------------- the grid
def _grid(args: argparse.Namespace) -> Grid:
    """The grid the command line names (workers still 0), its lists parsed; nothing checked yet."""
    if not args.preset:
        raise GridError("--preset is missing; name one (python -m sparsecomm.train --list-presets lists them)")
    reducers = parse_list("--reducers", args.reducers, hint="reducers such as exact,exdyna "
                          "(python -m sparsecomm.train --list-reducers)")
    densities = None if args.densities is None else parse_list(
        "--densities", args.densities, parse_density, hint="densities in (0, 1] such as 0.01,0.001")
    seeds = parse_list("--seeds", args.seeds, parse_seed, hint="integer seeds such as 0,1")
    return build(args.preset, reducers, densities, seeds, 0, args.data_dir, args.output_dir, args.settings)


def _workers_option(text: str) -> int | None:
    """``--workers``: a positive integer, or None for auto."""
    if text == "auto":
        return None
    if not text.isdigit() or int(text) < 1:
        raise GridError(f"--workers must be a positive integer or 'auto', got {text!r}")
    return int(text)


def _local_workers(wanted: int | None) -> int:
    if wanted is not None:
        return wanted
    import torch

    return (torch.cuda.device_count() if torch.cuda.is_available() else 0) or 2  # run.sh's NPROC default


def _show(path: str | Path) -> str:
    """A path as short as it can be said: relative to here when below here."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def _head(index: int, grid: Grid) -> str:
    return f"[{index + 1}/{len(grid.points)}] {grid.points[index].label}"


def print_table(grid: Grid) -> None:
    """The compare table of the grid's runs that have records."""
    from .compare import load, table, tables_text
    from .runs import is_run

    dirs = [Path(p.run_dir) for p in grid.points if is_run(Path(p.run_dir))]
    if not dirs:
        log.info("no run of this sweep has records yet")
        return
    sys.stdout.write(tables_text(table(load(dirs))))
    sys.stdout.flush()


# ---------------------------------------------------------------------- local runs
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)  # as sparsecomm.launch.local passes on


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the sweep dies (Linux), so the run checkpoints."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


class _OneRun:
    """Starts ./run.sh for one point at a time, in a session of its own, and passes every stop
    signal the sweep gets on to it (to its process group: run.sh, the check it is running, or the
    launcher it became, which passes it on to the workers). Remembers the first signal."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._proc: subprocess.Popen | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_OneRun":
        self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.signum = self.signum or signum
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signum)
            except ProcessLookupError:
                pass

    def run(self, env: dict[str, str]) -> int:
        self._proc = subprocess.Popen([str(RUN_SH)], cwd=REPO, env=env, start_new_session=True,
                                      preexec_fn=_die_with_parent)
        try:
            if self.signum is not None:  # came while starting it
                self._forward(self.signum)
            return self._proc.wait()
        finally:
            self._proc = None


def run_locally(grid: Grid) -> int:
    """Run the unfinished points one after another; 0, 1 when a run failed, 128 + the signal
    number when stopped."""
    env = {**os.environ, "NPROC": str(grid.workers)}
    failed: list[str] = []
    with _OneRun() as runner:
        for i, point in enumerate(grid.points):
            head = _head(i, grid)
            if runner.signum is not None:
                return _stopped(runner.signum, head, None)
            where = state(point)
            if where.finished:
                log.info("%s: complete, skipped (%s)", head, _show(point.run_dir))
                continue
            log.info("%s: %s in %s", head, where.action, _show(point.run_dir))
            started = time.monotonic()
            code = runner.run({**env, **grid.env(point)})
            took = duration(time.monotonic() - started)
            stop = runner.signum or (code - 128 if code - 128 in STOP_SIGNALS else None)
            if stop is not None:
                return _stopped(stop, head, point.run_dir)
            if code != 0:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
                log.info("%s: failed (%s) after %s", head, how, took)
                failed.append(point.label)
            elif state(point).finished:
                log.info("%s: complete in %s", head, took)
            else:
                log.info("%s: stopped before the end of its schedule after %s (max_steps); raise max_steps (or "
                         "leave it out) and run the command again to go on from there", head, took)
    print_table(grid)
    if failed:
        log.info("%d of %d runs failed (%s); run the same command again to retry them", len(failed),
                 len(grid.points), "; ".join(failed))
        return 1
    empty = [point.label for point in grid.points if not _has_records(point)]
    if empty:
        log.info("%d of %d runs wrote no records (%s): there is nothing to compare; their output above says why",
                 len(empty), len(grid.points), "; ".join(empty))
        return 1
    return 0


def _has_records(point: Point) -> bool:
    from .runs import is_run, load_run

    run_dir = Path(point.run_dir)
    return is_run(run_dir) and load_run(run_dir).status != "empty"


def _stopped(signum: int, head: str, run_dir: str | None) -> int:
    """Say where the sweep stopped and how to go on; the exit status."""
    name = signal.Signals(signum).name
    if run_dir is None:
        log.info("%s: not started (%s)", head, name)
    else:
        kept = (Path(run_dir) / "checkpoints" / "latest.json").is_file()
        log.info("%s: stopped by %s, %s", head, name, "its checkpoint kept" if kept else "before its first checkpoint")
    log.info("sweep stopped by %s; run the same command again to resume (finished runs are skipped, an interrupted "
             "one resumes from its checkpoint)", name)
    return 128 + signum


# ---------------------------------------------------------------------- SLURM
# Job states of a job array task that is not over yet.
_ACTIVE = ("PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
           "RESIZING", "SIGNALING", "STAGE_OUT")


def sbatch_header(text: str) -> dict[str, str]:
    """The ``#SBATCH --key=value`` options of a batch script (``##SBATCH`` lines are commented out)."""
    return dict(re.findall(r"^#SBATCH\s+--([\w-]+)=(\S+)", text, re.M))


def slurm_workers(header: dict[str, str], wanted: int | None) -> tuple[int, list[str]]:
    """Workers per run as pararun's header has them (``--ntasks``, else ``--nodes`` x
    ``--ntasks-per-node``), or ``wanted`` with the sbatch options that make it so."""
    if "ntasks" in header:
        if wanted is not None:
            return wanted, [f"--ntasks={wanted}"]
        sizes = {"ntasks": header["ntasks"]}
    else:
        sizes = {"nodes": header.get("nodes", "1"), "ntasks-per-node": header.get("ntasks-per-node", "1")}
    if not all(v.isdigit() and int(v) > 0 for v in sizes.values()):
        said = " ".join(f"--{k}={v}" for k, v in sizes.items())
        raise GridError(f"pararun's header (#SBATCH {said}) does not fix the worker count, which names the run "
                        f"directories; give whole numbers there")
    if "ntasks" in sizes:
        return int(sizes["ntasks"]), []
    nodes = int(sizes["nodes"])
    if wanted is None:
        return nodes * int(sizes["ntasks-per-node"]), []
    if wanted % nodes:
        raise GridError(f"--workers {wanted} does not divide over the {nodes} nodes of pararun's header "
                        f"(#SBATCH --nodes={nodes}); give a multiple of {nodes}")
    return wanted, [f"--ntasks-per-node={wanted // nodes}"]


def _active(job: str) -> bool:
    done = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True)
    return done.returncode == 0 and any(s in _ACTIVE for s in re.findall(r"\bJobState=(\S+)", done.stdout))


def submit(grid: Grid, sbatch_options: list[str]) -> int:
    """Submit the unfinished points as one job array through pararun; say how to follow it."""
    folder = Path(grid.output_dir) / ".sweeps" / grid.key
    job_file = folder / "job"
    if job_file.is_file() and _active(job_file.read_text().strip()):
        job = job_file.read_text().strip()
        print(f"error: job {job} of this sweep is still queued or running (squeue -j {job}); wait for it, or "
              f"scancel {job}, then run this command again", file=sys.stderr)
        return 1
    todo = []
    for i, point in enumerate(grid.points):
        where = state(point)
        if where.finished:
            log.info("%s: complete, skipped (%s)", _head(i, grid), _show(point.run_dir))
        else:
            log.info("%s: array task %d, %s in %s", _head(i, grid), i, where.action, _show(point.run_dir))
            todo.append(i)
    if not todo:
        log.info("all %d runs of this sweep are complete; nothing to submit", len(grid.points))
        print_table(grid)
        return 0
    grid_file = folder / "grid.json"
    grid.save(grid_file)
    cmd = [shutil.which("sbatch") or "sbatch", "--parsable", f"--array={','.join(map(str, todo))}",
           f"--output={folder}/%A_%a.out", *sbatch_options, str(PARARUN)]
    env = {**os.environ, "SPARSECOMM_SWEEP": str(grid_file), "SPARSECOMM_SWEEP_PYTHON": sys.executable}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"error: sbatch failed (exit {done.returncode}): {' '.join(done.stderr.split())}", file=sys.stderr)
        return 1
    job = done.stdout.strip().split(";")[0]
    job_file.write_text(job + "\n")
    dirs = " ".join(_show(p.run_dir) for p in grid.points)
    log.info("submitted job array %s: %d task(s), one run each, with %d worker(s)", job, len(todo), grid.workers)
    log.info("follow it: squeue -j %s; tail -f %s/%s_*.out", job, _show(folder), job)
    log.info("once it is done, the table: python -m sparsecomm compare %s", dirs)
    log.info("(or run this command again: it shows the table when every run is complete, and resubmits the rest)")
    return 0


# ---------------------------------------------------------------------- main
def _entry(file: str, index: str) -> int:
    grid = Grid.load(Path(file))
    n = len(grid.points)
    if not index.isdigit() or int(index) >= n:
        raise GridError(f"--entry: no grid point {index!r} in {file}; it has points 0 to {n - 1}")
    point = grid.points[int(index)]
    print(f"sweep {file}: point {index}, {point.label}, in {point.run_dir}", file=sys.stderr)
    sys.stdout.write(shell_exports({**grid.env(point), "NPROC": ""}))  # under SLURM, srun decides
    return 0


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    log.handlers[:] = [logging.StreamHandler(sys.stdout)]  # the sweep's own lines: its output
    log.setLevel(logging.INFO)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _setup_logging()
    try:
        if args.entry:
            return _entry(*args.entry)
        wanted = _workers_option(args.workers)
        sbatch_options: list[str] = []
        if args.slurm:
            if shutil.which("sbatch") is None:
                raise GridError("--slurm needs SLURM's sbatch, which is not on PATH; without it, leave --slurm out "
                                "to run the grid on this machine")
            workers, sbatch_options = slurm_workers(sbatch_header(PARARUN.read_text()), wanted)
        grid = _grid(args)
        if not args.slurm:
            workers = _local_workers(wanted)
        grid = check(dataclasses.replace(grid, workers=workers))
    except GridError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweep interrupted before any run started", file=sys.stderr)
        return 130
    lock = sweep_lock(grid)
    try:
        lock.acquire()
    except Held as held:
        print(f"error: this sweep is already running over {_show(grid.output_dir)}: {held.holder.describe()}; let it "
              f"finish or stop it ({held.holder.how_to_stop()}), then run this command again to go on", file=sys.stderr)
        return 2
    except LockError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        log.info("sweep: %d run(s) of %s, %d worker(s) each, settings checked", len(grid.points), args.preset,
                 workers)
        return submit(grid, sbatch_options) if args.slurm else run_locally(grid)
    finally:
        lock.release()


def sweep_lock(grid: Grid) -> RunLock:
    """The lock that makes a grid one sweep's at a time: ``OUTPUT_DIR/.sweeps/<grid key>.lock``."""
    return RunLock(Path(grid.output_dir) / ".sweeps" / f"{grid.key}.lock", f"sweep {grid.key}")


if __name__ == "__main__":
    sys.exit(main())
