"""The one training loop, shared by every task and every reducer."""
from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .. import reducers
from ..tasks import build_task
from .checkpoint import Checkpoints
from ..config import ConfigError, RunConfig
from ..job import Job
from .optim import LearningRate, build_optimizer, peak_lr
from .checks import check_optimizer
from ..lock import Held, LockError, RunLock
from .records import Recorder, RunInUse, check_run_dir, environment, run_lock, run_name, set_aside
from .workers import ProcessWorker, VirtualWorkers

__all__ = ["Trainer", "Stopped", "STOP_SIGNALS"]

log = logging.getLogger(__name__)

# What SLURM sends before a time limit or preemption (--signal), what schedulers send to stop,
# and Ctrl-C: each makes every rank checkpoint and stop at the same step.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

# Steps after the start (or a resume) at which rank 0 projects the run's length, and the steps
# left out of that measurement at the start (warm-up: allocation, caches, first collectives).
_PROJECT_AT = 30
_PROJECT_SKIP = 5

# While another job holds the run directory and this one waits for it, rank 0 looks again this often.
_WAIT_POLL_S = 2.0

# A method whose achieved density is off its target by more than this factor, on more than
# half of the steps, gets a warning in the log and in summary.json.
_DENSITY_FACTOR = 2.0

# Per-step measurements averaged into each training line of metrics.jsonl.
_MEANS = ("density", "local_density", "bytes_sent", "bytes_wire", "t_data", "t_forward", "t_backward",
          "t_select", "t_comm", "t_step")


# What rank 0 found when it tried to take the run directory's lock (the largest wins across ranks).
_TAKEN, _WAITING, _REFUSED = 0, 1, 2


class Stopped(Exception):
    """Training stopped early with a checkpoint written (a signal, or ``max_steps``)."""

    def __init__(self, reason: str, signum: int | None = None) -> None:
        super().__init__(reason)
        self.signum = signum


class Trainer:
    """Builds task, model, optimizer and reducer from a configuration and trains, evaluating,
    recording and checkpointing as configured. Resumes from the run directory's latest
    checkpoint unless ``fresh``. With ``job.virtual`` = W, this one process trains W virtual
    workers (see :mod:`.workers`).

    The run directory is this job's from the start to the end of :meth:`run`: rank 0 holds its
    lock (:func:`.records.run_lock`) before anything is written or moved. While another live
    job holds it, :class:`.records.RunInUse` is raised on every rank, after waiting up to
    ``wait_s`` seconds for that job to end."""

    def __init__(self, cfg: RunConfig, job: Job, fresh: bool = False, wait_s: float = 0.0) -> None:
        # Stop signals are caught from the start: one that arrives while the data loads stops
        # the run after its first step, with a checkpoint, like any other.
        self._signal: int | None = None
        self._handlers = _catch(STOP_SIGNALS, self._on_signal)
        self._lock: RunLock | None = None
        try:
            self._build(cfg, job, fresh, wait_s)
        except BaseException:
            _release(self._handlers)
            if self._lock is not None:
                self._lock.release()
            raise

    def _build(self, cfg: RunConfig, job: Job, fresh: bool, wait_s: float) -> None:
        self.cfg = cfg.validate()
        self.job = job
        P = job.workers
        self.run_dir = Path(cfg.output_dir) / run_name(cfg, P, virtual=bool(job.virtual))
        self._lock = self._claim(wait_s)
        check_run_dir(self.run_dir)
        torch.manual_seed(cfg.seed)  # the same initial model on every rank
        self.task = build_task(cfg, job)  # a virtual run evaluates on it; its workers train on views of it
        self.model = self.task.build_model().to(job.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Gradients live in one flat buffer that backward accumulates into and the reducer
        # averages in place: no flatten copy, no copy back.
        self.flat_grad = reducers.bind_flat_gradients(self.params)
        self.grads = [p.grad for p in self.params]
        self.schedule = LearningRate(peak_lr(cfg.optimizer, cfg.batch_per_worker(P), P), cfg.optimizer.lr,
                                     cfg.schedule, epochs=cfg.epochs, workers=P)
        if self.schedule.lowered_start and job.is_main:
            log.warning("the warm-up would start at %g, above its peak %g at %d workers of %d: it starts at %g "
                        "(the peak / %d) instead", cfg.schedule.warmup_from, self.schedule.peak, P,
                        cfg.batch_per_worker(P), self.schedule.start, P)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.schedule(0.0))
        rc = cfg.reducer

        def build_reducer(group: Any) -> reducers.Reducer:
            return reducers.build(rc.name, density=rc.density, error_feedback=rc.error_feedback, group=group,
                                  seed=cfg.seed, sync_timing=cfg.records.profile, **rc.options)

        if job.virtual:
            self._check_virtual_data(P)
            self.workers: Any = VirtualWorkers(cfg, job, self.task, self.model, self.params, self.grads, build_reducer)
        else:
            self.workers = ProcessWorker(cfg, job, self.task, self.params, self.grads, build_reducer)
        self.reducer = self.workers.reducer  # rank 0's (or this rank's): its measurements are recorded
        check_optimizer(cfg, self.reducer)
        self.workers.attach(self.model)
        self.steps_per_epoch = self.workers.steps_per_epoch()
        if self.steps_per_epoch < 1:
            raise ValueError(f"task {cfg.task!r} yields no training batch per worker (batch size "
                             f"{cfg.batch_per_worker(P)} x {P}{' virtual' if job.virtual else ''} workers exceeds "
                             f"the training data)")
        self.total_steps = math.ceil(cfg.epochs * self.steps_per_epoch)
        self.checkpoints = Checkpoints(self.run_dir, job)
        resumed = self.checkpoints.exists() and not fresh
        if not resumed:
            self._keep_earlier_run(fresh)
        self.recorder = Recorder(self.run_dir, job.is_main, cfg.records.tensorboard)
        self.step = 0
        self.elapsed = 0.0
        self.totals = {"bytes_sent": 0.0, "bytes_wire": 0.0, "density": 0.0, "local_density": 0.0,
                       "steps": 0, "skipped": 0, "off_target": 0}
        self.best: dict[str, Any] | None = None
        self.evaluations: list[dict[str, Any]] = []
        self._saved_step: int | None = None
        self._saved_tag: str | None = None
        self._described: dict[str, Any] | None = None
        self._window: dict[str, float] = {}
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=job.device)
        self._loss_count = 0
        self._clock: list[float] = []  # end times of this process's first steps (for the projection)
        if resumed:
            self._resume()
        backend = "virtual" if job.virtual else (
            "nccl" if job.device.type == "cuda" and job.world > 1 else ("gloo" if job.world > 1 else "none"))
        self.recorder.write_config(cfg, environment(P, backend, str(job.device), virtual=bool(job.virtual)))
        self.recorder.open(self.step if resumed else None)
        if job.is_main:
            log.info("run %s: %s, %d %sworkers, %d steps per epoch, %d steps in all%s", self.run_dir, cfg.task,
                     P, "virtual " if job.virtual else "", self.steps_per_epoch, self.total_steps,
                     f", resumed at step {self.step}" if resumed else "")

    def _claim(self, wait_s: float) -> RunLock | None:
        """Rank 0 takes the run directory's lock, waiting up to ``wait_s`` seconds for a live
        holder to end (saying so once); every rank learns the outcome, so that all go on or all
        stop together. Rank 0's lock (None on the other ranks)."""
        run_dir, job = self.run_dir, self.job
        lock = run_lock(run_dir) if job.is_main else None
        deadline = time.monotonic() + wait_s
        waited = False
        refusal: ConfigError | None = None
        while True:
            verdict = _TAKEN
            if lock is not None:
                try:
                    lock.acquire()
                except Held as held:
                    if time.monotonic() < deadline:
                        if not waited:
                            log.warning("the run directory %s is in use by another job: %s; waiting up to %g s for "
                                        "it to end (--wait-for-run)", run_dir, held.holder.describe(), wait_s)
                        waited, verdict = True, _WAITING
                    else:
                        refusal, verdict = RunInUse(run_dir, held.holder, wait_s), _REFUSED
                except LockError as exc:
                    refusal, verdict = ConfigError(str(exc)), _REFUSED
            verdict = int(job.max(float(verdict)))
            if verdict == _TAKEN:
                if waited:
                    log.info("the other job has let go of %s; this one goes on", run_dir)
                return lock
            if verdict == _REFUSED:
                raise refusal or ConfigError(f"rank 0 could not take the run directory {run_dir}")
            signum = int(job.max(float(self._signal or 0)))
            if signum:
                raise Stopped(f"stopped by {signal.Signals(signum).name} while waiting for {run_dir}", signum)
            time.sleep(_WAIT_POLL_S)

    def _check_virtual_data(self, workers: int) -> None:
        """Virtual workers need at least one training example each (one line otherwise)."""
        examples = self.task.train_examples()
        if examples is not None and workers > examples:
            raise ValueError(f"--virtual-workers {workers} exceeds the {examples:,} training examples of "
                             f"{self.cfg.task!r}: every worker needs at least one")

    def _keep_earlier_run(self, fresh: bool) -> None:
        """Starting from step 0 where an earlier run left records: move them aside, never over them."""
        moved = set_aside(self.run_dir) if self.job.is_main else None
        self.job.barrier()
        if moved is not None:
            log.warning("%s: the earlier run in %s was moved aside to %s",
                        "--fresh" if fresh else "no checkpoint to resume", self.run_dir, moved)

    # ------------------------------------------------------------------------- running
    def run(self) -> dict[str, Any]:
        """Train to the end (or until stopped) and return the summary; the run directory's lock
        is given back either way."""
        try:
            try:
                self._train()
            finally:
                _release(self._handlers)
                self.recorder.close()
            return self._summary()
        finally:
            if self._lock is not None:
                self._lock.release()

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self._signal = signum
        log.debug("rank %d received %s: will checkpoint and stop after this step",
                  self.job.rank, signal.Signals(signum).name)

    def _train(self) -> None:
        cfg, job = self.cfg, self.job
        started = time.perf_counter() - self.elapsed
        while self.step < self.total_steps:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            self.workers.begin_epoch(epoch, self.schedule(self.step / self.steps_per_epoch), cfg.epochs)
            end = min((epoch + 1) * self.steps_per_epoch, self.total_steps)  # this segment's last step
            progress = _progress(job.is_main and cfg.records.progress, end - self.step,
                                 f"epoch {epoch + 1}/{math.ceil(cfg.epochs)}")
            mark = time.perf_counter()
            before = self.step
            for batch in self.workers.batches(epoch, start):
                self._train_step(batch, epoch, time.perf_counter() - mark)
                progress.update(1)
                self.elapsed = time.perf_counter() - started
                if len(self._clock) < _PROJECT_AT:
                    self._clock.append(self.elapsed)
                    if len(self._clock) == _PROJECT_AT:
                        self._project()
                if cfg.records.progress and job.is_main and self.step % 10 == 0 and self._loss_count:
                    progress.set_postfix(loss=f"{float(self._loss_sum) / self._loss_count:.4g}", refresh=False)
                if self.step % cfg.records.log_every == 0:
                    self._log_training(epoch)
                if self.step == 1 or self.step % cfg.records.log_every == 0:
                    self._describe_reducer()
                if self.step >= end:
                    break
                if self._evaluation_step():
                    self._evaluate(self.step / self.steps_per_epoch)
                    self.elapsed = time.perf_counter() - started
                self._stop_if_asked(progress)  # not at a segment's end: evaluation comes first there
                mark = time.perf_counter()
            progress.close()
            if self.step == before:
                raise RuntimeError(f"task {cfg.task!r} yielded no batch for epoch {epoch} from batch {start} "
                                   f"although {self.steps_per_epoch} were announced")
            finished_epoch = self.step % self.steps_per_epoch == 0
            last = self.step >= self.total_steps
            if last:  # the steps since the last training line get theirs (a run shorter than log_every too)
                self._log_training(epoch)
            if (finished_epoch and (epoch + 1) % max(cfg.records.eval_every, 1) == 0) or last or self._evaluation_step():
                self._evaluate(epoch + 1 if finished_epoch else self.step / self.steps_per_epoch)
                self.elapsed = time.perf_counter() - started
            every = cfg.records.checkpoint_every
            if last or (finished_epoch and every and (epoch + 1) % every == 0):
                self._checkpoint()
            if not last:
                self._stop_if_asked(None)

    def _evaluation_step(self) -> bool:
        every = self.cfg.records.eval_every_steps
        return bool(every) and self.step % every == 0

    def _stop_if_asked(self, progress: Any) -> None:
        """Checkpoint (unless this step's is written) and raise :class:`Stopped` when every
        rank agrees a stop was asked for."""
        stop = self._stop_reason()
        if stop is None:
            return
        if progress is not None:
            progress.close()
        if self._saved_step != self.step:
            self._checkpoint()
        raise Stopped(f"{stop[0]}; checkpoint {self._saved_tag} in {self.checkpoints.root}", stop[1])

    def _train_step(self, batch: Any, epoch: int, t_data: float) -> None:
        cfg, model, sync = self.cfg, self.model, self._sync
        lr = self.schedule(self.step / self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        loss, count, t_forward, t_backward = self.workers.backward(model, batch, self.flat_grad, sync)
        if any(p.grad is not g for p, g in zip(self.params, self.grads)):
            raise RuntimeError("a parameter's .grad was replaced (the training loop keeps gradients in one flat "
                               "buffer); do not set .grad or call zero_grad(set_to_none=True) inside a task")
        self.workers.reduce(self.flat_grad)
        sync()
        t3 = time.perf_counter()
        r = self.reducer
        skipped = bool(r.stat("skipped"))
        if not skipped:
            if cfg.clip_norm:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_norm)
            self.optimizer.step()
        sync()
        t4 = time.perf_counter()
        self.step += 1
        self._loss_sum += loss.to(torch.float64)
        self._loss_count += count
        measured = {"density": r.stat("density", 0.0), "local_density": r.stat("local_density", 0.0),
                    "bytes_sent": r.stat("bytes_sent", 0), "bytes_wire": r.stat("bytes_wire", 0.0),
                    "t_data": t_data, "t_forward": t_forward, "t_backward": t_backward,
                    "t_select": r.stat("t_select", 0.0), "t_comm": r.stat("t_comm", 0.0),
                    "t_step": t4 - t3}
        for key, value in measured.items():
            self._window[key] = self._window.get(key, 0.0) + float(value)
        self._window["n"] = self._window.get("n", 0.0) + 1
        for key in ("bytes_sent", "bytes_wire", "density", "local_density"):
            self.totals[key] += float(measured[key])
        self.totals["steps"] += 1
        self.totals["skipped"] += int(skipped)
        target = r.stat("target_density", 0.0) or 0.0
        if not skipped and target > 0:
            ratio = float(measured["density"]) / target
            self.totals["off_target"] = self.totals.get("off_target", 0) + int(
                not 1 / _DENSITY_FACTOR <= ratio <= _DENSITY_FACTOR)
        self._lr = lr

    def _sync(self) -> None:
        if self.cfg.records.profile and self.job.device.type == "cuda":
            torch.cuda.synchronize(self.job.device)

    def _stop_reason(self) -> tuple[str, int | None] | None:
        """Agreed by every rank (one tiny all-reduce per step): stop now?"""
        signum = int(self.job.max(float(self._signal or 0)))
        if signum:
            return f"stopped by {signal.Signals(signum).name} at step {self.step}", signum
        if self.cfg.max_steps is not None and self.step >= self.cfg.max_steps and self.step < self.total_steps:
            return f"stopped at max_steps={self.cfg.max_steps}", None
        return None

    # -------------------------------------------------------------------- measurements
    def _project(self) -> None:
        """Rank 0 says how long an epoch and the rest of the run will take, from the steps so far."""
        if not self.job.is_main:
            return
        per_step = (self._clock[-1] - self._clock[_PROJECT_SKIP - 1]) / (len(self._clock) - _PROJECT_SKIP)
        left = self.total_steps - self.step
        message = (f"projected from steps {self.step - len(self._clock) + _PROJECT_SKIP + 1}-{self.step}: "
                   f"{per_step * 1000:.4g} ms per step, {_duration(per_step * self.steps_per_epoch)} per epoch "
                   f"({self.steps_per_epoch} steps), {_duration(per_step * left)} for the remaining {left} steps "
                   f"(evaluation not included)")
        if self.job.device.type == "cpu" and per_step * left > 86400:
            log.warning("%s: this set-up is sized for GPUs; on this CPU it would take %s", message,
                        _duration(per_step * left))
        else:
            log.info("%s", message)

    def _log_training(self, epoch: int) -> None:
        n = self._window.pop("n", 0.0)
        if not n:
            return
        loss_sum, count = self.job.sum([float(self._loss_sum), float(self._loss_count)])
        record: dict[str, Any] = {"step": self.step, "epoch": self.step / self.steps_per_epoch,
                                  "loss": loss_sum / count if count else float("nan"), "lr": self._lr}
        record.update({key: self._window.get(key, 0.0) / n for key in _MEANS})
        stats = self.reducer.stats
        for key in ("threshold", "residual_norm", "load_imbalance"):
            if key in stats:
                record[key] = stats[key]
        record["skipped_steps"] = self.totals["skipped"]
        record["time"] = self.elapsed
        self.recorder.log(record)
        self._window = {}
        self._loss_sum.zero_()
        self._loss_count = 0

    def _describe_reducer(self) -> None:
        """Write which method this is, its options and what it decided or fitted (``reducer.json``),
        whenever that changes."""
        reducer = self.workers.reducer
        info = {"method": reducer.name, **reducer.options(), **self.workers.describe()}
        if self.job.is_main and info != self._described:
            (self.run_dir / "reducer.json").write_text(json.dumps({"step": self.step, **info}, indent=1) + "\n")
            self._described = info

    def _evaluate(self, epoch: float) -> None:
        self.model.eval()
        with torch.no_grad():
            results = self.task.evaluate(self.model)
        for result in results:
            record = {"step": self.step, "epoch": epoch, **result, "time": self.elapsed,
                      "bytes_sent": self.totals["bytes_sent"]}
            self.evaluations.append(record)
            self.recorder.log(record)
            if result.get("split") == self.task.metric_split and self.task.metric in result:
                value = result[self.task.metric]
                better = self.best is None or (value > self.best["value"] if self.task.higher_is_better
                                               else value < self.best["value"])
                if better:
                    self.best = {"value": value, "epoch": epoch, "step": self.step, "time": self.elapsed}
        if self.job.is_main and results:
            log.info("epoch %s: %s", f"{epoch:.4g}", "; ".join(
                ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()) for r in results))

    def _summary(self) -> dict[str, Any]:
        steps = max(self.totals["steps"], 1)
        final = {}
        for record in self.evaluations:
            final[record["split"]] = {k: v for k, v in record.items() if k not in ("split",)}
        summary = {
            "run": self.run_dir.name,
            "task": self.cfg.task, "model": self.cfg.model, "reducer": self.cfg.reducer.name,
            "target_density": self.cfg.reducer.density, "workers": self.job.workers,
            "virtual": bool(self.job.virtual),
            "steps": self.step, "epochs": self.step / self.steps_per_epoch, "complete": self.step >= self.total_steps,
            "metric": self.task.metric, "higher_is_better": self.task.higher_is_better,
            "final": final,
            "best": self.best,
            "mean_density": self.totals["density"] / steps,
            "mean_local_density": self.totals["local_density"] / steps,
            "total_bytes_sent": self.totals["bytes_sent"], "total_bytes_wire": self.totals["bytes_wire"],
            "bytes_sent_per_step": self.totals["bytes_sent"] / steps,
            "skipped_steps": self.totals["skipped"],
            "wall_time": self.elapsed,
            "time_to_best": None if self.best is None else self.best["time"],
            "warnings": self._warnings(),
        }
        self.recorder.write_summary(summary)
        return summary

    def _warnings(self) -> list[str]:
        """What a reader of the results must know: a method that missed its target density."""
        warnings = []
        counted = self.totals["steps"] - self.totals["skipped"]
        off = self.totals.get("off_target", 0)
        if counted and off > counted / 2:
            mean = self.totals["density"] / max(self.totals["steps"], 1)
            warnings.append(f"achieved density was more than {_DENSITY_FACTOR:g}x off the target "
                            f"{self.reducer.target_density:g} on {off} of {counted} steps (mean {mean:.3g})")
        if self.job.is_main:
            for warning in warnings:
                log.warning("%s: %s", self.cfg.reducer.name, warning)
        return warnings

    # --------------------------------------------------------------------- checkpoints
    def _checkpoint(self) -> None:
        shared = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                  "step": self.step, "elapsed": self.elapsed, "totals": dict(self.totals),
                  "best": self.best, "evaluations": self.evaluations, "config": self.cfg.to_dict()}
        local = self.workers.state()  # one per worker this process holds; the first also keeps the loop's own
        local[0] = {**local[0], "window": dict(self._window), "loss": [float(self._loss_sum), self._loss_count]}
        self._saved_tag = f"step-{self.step:09d}"
        self.checkpoints.save(self._saved_tag, shared, local if self.job.virtual else local[0], {"step": self.step})
        self._saved_step = self.step
        if self.job.is_main:
            log.info("checkpoint %s written in %s", self._saved_tag, self.checkpoints.root)

    def _resume(self) -> None:
        shared, local, info = self.checkpoints.load()
        local = local if self.job.virtual else [local]
        self._saved_tag = info["tag"]
        saved = shared["config"]
        mine = self.cfg.to_dict()
        keys = ("task", "model", "model_options", "task_options", "seed", "clip_norm", "data", "optimizer",
                "schedule", "reducer")
        differ = [k for k in keys if _identity(saved.get(k), k) != _identity(mine.get(k), k)]
        if differ:
            raise ValueError(f"the checkpoint in {self.checkpoints.root} was written with other settings "
                             f"({', '.join(differ)} differ); start a fresh run (--fresh) or use another output "
                             f"directory")
        self.model.load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        self.step = int(shared["step"])
        self.elapsed = float(shared["elapsed"])
        self.totals = dict(shared["totals"])
        self.best = shared["best"]
        self.evaluations = list(shared["evaluations"])
        self.workers.load_state(local)
        self._window = dict(local[0]["window"])
        self._loss_sum.fill_(local[0]["loss"][0])
        self._loss_count = int(local[0]["loss"][1])


def _identity(section: Any, key: str) -> Any:
    """The part of a config section that changes results (paths and loader workers do not)."""
    if key == "data" and isinstance(section, dict):
        return {k: v for k, v in section.items() if k not in ("dir", "cache_dir", "loader_workers")}
    return section


def _catch(signals: tuple[int, ...], handler: Any) -> dict[int, Any]:
    """Install ``handler`` for ``signals`` (only possible in the main thread); the previous ones."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in signals}


def _release(previous: dict[int, Any]) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler)
    previous.clear()


def _duration(seconds: float) -> str:
    """3 d 4 h, 2 h 05 min, 4 min 10 s, 12.3 s."""
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400} d {s % 86400 // 3600} h"
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{seconds:.3g} s"


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(active: bool, total: int, desc: str):
    if not active:
        return _NoProgress()
    import sys

    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30)
