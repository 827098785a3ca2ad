"""The one training loop, shared by every task and every reducer."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import torch

from .. import reducers
from ..reducers.buckets import BucketReducer
from ..config import ConfigError, DataConfig, ReducerConfig, RunConfig
from ..launch.job import Job
from ..lock import Held, LockError, RunLock
from ..progress import progress
from ..tasks import build_task
from .checkpoint import Checkpoints
from .checks import check_optimizer, check_sharded, reducer_scope
from .evaluation import Evaluator
from .meter import Meter, Moment, Pace
from .optim import LearningRate, build_optimizer, peak_lr
from .records import Recorder, RunInUse, check_run_dir, environment, run_lock, run_name, set_aside
from .sharded import ShardedWorker, load_model_shards, load_optimizer_shards, local_shards, shard_model
from .workers import ProcessWorker, VirtualWorkers

__all__ = ["Trainer", "Stopped", "STOP_SIGNALS"]

log = logging.getLogger(__name__)

# The method's own stats of the last step before a training line that the line carries: the
# threshold controllers' state (SAGE's alpha, beta, gamma and examined density among them),
# the residual's norm and the index all-gather's padding waste.
_LOGGED_STATS = ("threshold", "residual_norm", "load_imbalance", "exam_density", "alpha", "beta", "gamma")

# What SLURM sends before a time limit or preemption (--signal), what schedulers send to stop,
# and Ctrl-C: each makes every rank checkpoint and stop at the same step.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
# set by sparsecomm.launch.local in its workers: it tells the user of a stop itself
LAUNCHER_SAYS_STOPS = "SPARSECOMM_LAUNCHER_SAYS_STOPS"

# While another job holds the run directory and this one waits for it, rank 0 looks again this often.
_WAIT_POLL_S = 2.0

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


    The loop (:meth:`_train`) only orders the parts; each decides from the :class:`Moment`
    after a step whether its turn has come: the meter's training line, the evaluator, the
    checkpoint, a stop.

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
            self._build(cfg.validate(), job, fresh, wait_s)
        except BaseException:
            _release(self._handlers)
            if self._lock is not None:
                self._lock.release()
            raise

    # ------------------------------------------------------------------------ building
    def _build(self, cfg: RunConfig, job: Job, fresh: bool, wait_s: float) -> None:
        self.cfg, self.job = cfg, job
        self.run_dir = Path(cfg.output_dir) / run_name(cfg, job.workers, virtual=bool(job.virtual))
        self._lock = self._claim(wait_s)
        check_run_dir(self.run_dir)
        self._build_model()
        self._build_workers()
        self.checkpoints = Checkpoints(self.run_dir, job)
        self.meter = Meter(job, cfg.records.log_every)
        self.evaluator = Evaluator(self.task, cfg.records, job.is_main)
        self.pace = Pace(job.is_main)
        self.step = 0
        self._started = time.perf_counter()
        self._saved_tag: str | None = None
        self._described: dict[str, Any] | None = None
        self._lr = self.schedule(0.0)
        self.summary: dict[str, Any] | None = None  # the last one written
        resumed = self.checkpoints.exists() and not fresh
        if resumed:
            self._resume()
        else:
            self._keep_earlier_run(fresh)
        self._open_records(resumed)

    def _build_model(self) -> None:
        cfg, job = self.cfg, self.job
        torch.manual_seed(cfg.seed)  # the same initial model on every rank
        self.task = build_task(cfg, job)  # a virtual run evaluates on it; its workers train on views of it
        self.model = self.task.build_model().to(job.device)
        self.sharded = cfg.parallel == "fsdp"
        if self.sharded:  # FSDP units; each unit's gradient is reduced inside backward, by the method
            check_sharded(job.workers, bool(job.virtual))
            self.model = shard_model(self.model, job.device, job.world)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # Gradients live in one flat buffer that backward accumulates into and the reducer
        # averages in place: no flatten copy, no copy back (FSDP keeps its own sharded ones).
        self.flat_grad = None if self.sharded else reducers.bind_flat_gradients(self.params)
        self.grads = None if self.sharded else [p.grad for p in self.params]
        P = job.workers
        self.schedule = LearningRate(peak_lr(cfg.optimizer, cfg.batch_per_worker(P), P), cfg.optimizer.lr,
                                     cfg.schedule, epochs=cfg.epochs, workers=P)
        if self.schedule.lowered_start and job.is_main:
            log.warning("the warm-up would start at %g, above its peak %g at %d workers of %d: it starts at %g "
                        "(the peak / %d) instead", cfg.schedule.warmup_from, self.schedule.peak, P,
                        cfg.batch_per_worker(P), self.schedule.start, P)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, self.schedule(0.0))

    def _build_workers(self) -> None:
        cfg, job = self.cfg, self.job
        rc = cfg.reducer
        # bucket scope: groups of parameters reduced as backward produces them (on a worker
        # thread; one after another for virtual workers, which run their backwards in turn)
        self.scope = reducer_scope(cfg)

        def build_reducer(group: Any) -> Any:
            settings = dict(density=rc.density, error_feedback=rc.error_feedback, group=group, seed=cfg.seed,
                            sync_timing=cfg.records.profile, **rc.options)
            if self.scope == "bucket":
                return BucketReducer(rc.name, bucket_mb=rc.bucket_mb, overlap=not job.virtual, **settings)
            return reducers.build(rc.name, **settings)

        if self.sharded:
            self.workers: Any = ShardedWorker(cfg, job, self.task, self.model, build_reducer)
        elif job.virtual:
            self._check_virtual_data(job.workers)
            self.workers = VirtualWorkers(cfg, job, self.task, self.model, self.params, self.grads, build_reducer)
        else:
            self.workers = ProcessWorker(cfg, job, self.task, self.params, self.grads, build_reducer)
        self.reducer = self.workers.reducer  # rank 0's (or this rank's): its measurements are recorded
        check_optimizer(cfg, self.reducer)
        self.workers.attach(self.model)
        self.steps_per_epoch = self.workers.steps_per_epoch()
        if self.steps_per_epoch < 1:
            raise ValueError(f"task {cfg.task!r} yields no training batch per worker (batch size "
                             f"{cfg.batch_per_worker(job.workers)} x {job.workers}"
                             f"{' virtual' if job.virtual else ''} workers exceeds the training data)")
        self.total_steps = math.ceil(cfg.epochs * self.steps_per_epoch)

    def _open_records(self, resumed: bool) -> None:
        cfg, job = self.cfg, self.job
        self.recorder = Recorder(self.run_dir, job.is_main, cfg.records.tensorboard)
        backend = "virtual" if job.virtual else (
            "nccl" if job.device.type == "cuda" and job.world > 1 else ("gloo" if job.world > 1 else "none"))
        env = environment(job.workers, backend, str(job.device), virtual=bool(job.virtual))
        self.recorder.write_config(cfg, {**env, "reducer_scope": self.scope})
        self.recorder.open(self.step if resumed else None)
        if job.is_main:
            log.info("run %s: %s, %d %sworkers, %d steps per epoch, %d steps in all%s", self.run_dir, cfg.task,
                     job.workers, "virtual " if job.virtual else "", self.steps_per_epoch, self.total_steps,
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
    @property
    def elapsed(self) -> float:
        """Seconds this run has trained and evaluated, over all its resumptions."""
        return time.perf_counter() - self._started

    @property
    def complete(self) -> bool:
        """Trained to the schedule's last step and evaluated there."""
        return self.step >= self.total_steps and self.evaluator.evaluated_at(self.step)

    def run(self) -> dict[str, Any]:
        """Train to the end (or until stopped: :class:`Stopped`, after the summary is written)
        and return the summary; the run directory's lock is given back either way."""
        try:
            try:
                if self.complete:
                    if self.job.is_main:
                        log.info("run %s is complete (step %d of %d): nothing to train; --fresh starts it again, "
                                 "moving this one aside", self.run_dir, self.step, self.total_steps)
                elif self.cfg.max_steps is not None and self.step >= self.cfg.max_steps:
                    # Training would take one step past the checkpoint before it looked at max_steps.
                    if self.job.is_main:
                        log.info("run %s is at step %d of %d, already at max_steps=%d: nothing to train; raise "
                                 "max_steps (or leave it out) to go on", self.run_dir, self.step, self.total_steps,
                                 self.cfg.max_steps)
                else:
                    self._train()
            except Stopped:
                self._summary()
                raise
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
        if self.job.is_main and os.environ.get(LAUNCHER_SAYS_STOPS) != "1":
            # said at once, from the handler (the step under way may take minutes); os.write,
            # not logging, which a handler must not enter; the local launcher says it itself
            os.write(2, f"rank 0 received {signal.Signals(signum).name}: checkpointing after the step under way, "
                        f"then stopping{' (Ctrl-C again stops at once)' if signum == signal.SIGINT else ''}\n"
                     .encode())

    def _train(self) -> None:
        """Epoch by epoch, step by step: train, then let each part take its turn."""
        while True:
            epoch, start = divmod(self.step, self.steps_per_epoch)
            self.workers.begin_epoch(epoch, self.schedule(self.step / self.steps_per_epoch), self.cfg.epochs)
            bar = self._progress(epoch)
            before = self.step
            mark = time.perf_counter()
            for batch in self.workers.batches(epoch, start):
                self._train_step(batch, t_data=time.perf_counter() - mark)
                at = self._moment()
                self._show_progress(bar)
                if at.epoch_end or at.last or at.stop is not None:
                    bar.close()
                if self.meter.should_log(at):
                    self._log_training(at)
                if at.step == 1 or self.meter.should_log(at):
                    self._describe_reducer()
                if self.evaluator.should_evaluate(at):
                    self._evaluate(at)
                if self._should_checkpoint(at):
                    self._checkpoint()
                if at.stop is not None:
                    raise Stopped(f"{at.stop}; checkpoint {self._saved_tag} in {self.checkpoints.root}", at.signal)
                if at.last or at.epoch_end:
                    break
                mark = time.perf_counter()
            bar.close()
            if self.step == before:
                raise RuntimeError(f"task {self.cfg.task!r} yielded no batch for epoch {epoch} from batch {start} "
                                   f"although {self.steps_per_epoch} were announced")
            if self.step >= self.total_steps:
                return

    def _moment(self) -> Moment:
        """Where the run stands after this step; a stop agreed by every rank (one tiny
        all-reduce per step, none at the last)."""
        step = self.step
        at = Moment(step, step / self.steps_per_epoch, step % self.steps_per_epoch == 0, step >= self.total_steps)
        if at.last:
            return at
        signum = int(self.job.max(float(self._signal or 0)))
        if signum:
            name = signal.Signals(signum).name
            return dataclasses.replace(at, stop=f"stopped by {name} at step {step}", signal=signum)
        if self.cfg.max_steps is not None and step >= self.cfg.max_steps:
            return dataclasses.replace(at, stop=f"stopped at max_steps={self.cfg.max_steps}")
        return at

    def _should_checkpoint(self, at: Moment) -> bool:
        every = self.cfg.records.checkpoint_every
        return at.last or at.stop is not None or (at.epoch_end and bool(every) and at.epochs_done % every == 0)

    def _train_step(self, batch: Any, t_data: float) -> None:
        sync = self._sync
        self._lr = lr = self.schedule(self.step / self.steps_per_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss, count, t_forward, t_backward = self.workers.backward(self.model, batch, self.flat_grad, sync)
        if not self.sharded and any(p.grad is not g for p, g in zip(self.params, self.grads)):
            raise RuntimeError("a parameter's .grad was replaced (the training loop keeps gradients in one flat "
                               "buffer); do not set .grad or call zero_grad(set_to_none=True) inside a task")
        self.workers.reduce(self.flat_grad)
        sync()
        t3 = time.perf_counter()
        r = self.reducer
        skipped = bool(r.stat("skipped"))
        if not skipped:
            if self.cfg.clip_norm:
                torch.nn.utils.clip_grad_norm_(self.params, self.cfg.clip_norm)
            self.optimizer.step()
        sync()
        self.step += 1
        measured = {"density": r.stat("density", 0.0), "local_density": r.stat("local_density", 0.0),
                    "bytes_sent": r.stat("bytes_sent", 0), "bytes_wire": r.stat("bytes_wire", 0.0),
                    "t_data": t_data, "t_forward": t_forward, "t_backward": t_backward,
                    "t_select": r.stat("t_select", 0.0), "t_comm": r.stat("t_comm", 0.0),
                    "t_step": time.perf_counter() - t3}
        self.meter.add(measured, loss, count, skipped, r.stat("target_density", 0.0) or 0.0)
        self.pace.tick(self.elapsed, self.step, self.steps_per_epoch, self.total_steps, self.job.device.type)

    def _sync(self) -> None:
        if self.cfg.records.profile and self.job.device.type == "cuda":
            torch.cuda.synchronize(self.job.device)

    # ----------------------------------------------------------------- the parts' turns
    def _progress(self, epoch: int) -> Any:
        end = min((epoch + 1) * self.steps_per_epoch, self.total_steps)
        return progress(end - self.step, f"epoch {epoch + 1}/{math.ceil(self.cfg.epochs)}", "step",
                        show=self.job.is_main and self.cfg.records.progress, logger=log)

    def _show_progress(self, bar: Any) -> None:
        bar.update(1)
        if self.job.is_main and self.step % 10 == 0:
            loss = self.meter.running_loss()
            if loss is not None:
                bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    def _log_training(self, at: Moment) -> None:
        line = self.meter.training_line(at)
        if line is None:
            return
        stats = self.reducer.stats
        line["lr"] = self._lr
        line.update({key: stats[key] for key in _LOGGED_STATS if key in stats})
        line["skipped_steps"] = self.meter.totals["skipped"]
        line["time"] = self.elapsed
        self.recorder.log(line)

    def _describe_reducer(self) -> None:
        """Write which method this is, its options and what it decided or fitted (``reducer.json``),
        whenever that changes."""
        reducer = self.workers.reducer
        info = {"method": reducer.name, "scope": self.scope, **reducer.options(), **self.workers.describe()}
        if self.job.is_main and info != self._described:
            (self.run_dir / "reducer.json").write_text(json.dumps({"step": self.step, **info}, indent=1) + "\n")
            self._described = info

    def _evaluate(self, at: Moment) -> None:
        with self.workers.whole_model(self.model) if self.sharded else contextlib.nullcontext():
            lines = self.evaluator.evaluate(self.model, at, self.elapsed, self.meter.totals["bytes_sent"])
        for line in lines:
            self.recorder.log(line)

    def _summary(self) -> dict[str, Any]:
        summary = {
            "run": self.run_dir.name,
            "task": self.cfg.task, "model": self.cfg.model, "reducer": self.cfg.reducer.name, "scope": self.scope,
            "target_density": self.cfg.reducer.density, "workers": self.job.workers,
            "uses_density": reducers.lookup(self.cfg.reducer.name).uses_density,
            "virtual": bool(self.job.virtual), "parallel": self.cfg.parallel,
            "steps": self.step, "total_steps": self.total_steps, "epochs": self.step / self.steps_per_epoch,
            "complete": self.complete,
            "metric": self.task.metric, "higher_is_better": self.task.higher_is_better,
            "final": self.evaluator.final(),
            "best": self.evaluator.best,
            **self.meter.summary(),
            "wall_time": self.elapsed,
            "time_to_best": None if self.evaluator.best is None else self.evaluator.best["time"],
            "warnings": self.meter.warnings(self.reducer.target_density),
        }
        if self.job.is_main:
            for warning in summary["warnings"]:
                log.warning("%s: %s", self.cfg.reducer.name, warning)
        self.recorder.write_summary(summary)
        self.summary = summary
        return summary

    # --------------------------------------------------------------------- checkpoints
    def _checkpoint(self) -> None:
        model, optimizer = self.model.state_dict(), self.optimizer.state_dict()
        shared = {} if self.sharded else {"model": model, "optimizer": optimizer}  # sharded: each rank its own
        shared.update({"step": self.step, "elapsed": self.elapsed, "totals": self.meter.shared_state(),
                       **self.evaluator.state(), "config": self.cfg.to_dict()})
        local = self.workers.state()  # one per worker this process holds; the first also keeps the meter's window
        if self.sharded:
            local[0] = {**local[0], "model": local_shards(model), "optimizer": local_shards(optimizer)}
        local[0] = {**local[0], **self.meter.local_state()}
        self._saved_tag = f"step-{self.step:09d}"
        self.checkpoints.save(self._saved_tag, shared, local if self.job.virtual else local[0], {"step": self.step})
        if self.job.is_main:
            log.info("checkpoint %s written in %s", self._saved_tag, self.checkpoints.root)

    def _resume(self) -> None:
        shared, local, info = self.checkpoints.load()
        local = local if self.job.virtual else [local]
        self._saved_tag = info["tag"]
        saved = shared["config"]
        mine = self.cfg.to_dict()
        keys = ("task", "model", "model_options", "task_options", "seed", "clip_norm", "data", "optimizer",
                "schedule", "reducer", "parallel") + (("epochs",) if self.cfg.schedule.decay == "cosine" else ())
        differ = [k for k in keys if _identity(saved.get(k), k) != _identity(mine.get(k), k)]
        if differ:
            raise ConfigError(f"the checkpoint in {self.checkpoints.root} was written with other settings "
                              f"({', '.join(differ)} differ"
                              f"{'; a cosine schedule depends on epochs' if 'epochs' in differ else ''}); start a "
                              f"fresh run (--fresh) or use another output directory")
        step = int(shared["step"])
        if step > self.total_steps:
            need = math.ceil(step / self.steps_per_epoch * 1000) / 1000
            raise ConfigError(f"the checkpoint in {self.checkpoints.root} is at step {step}, past the end of this "
                              f"schedule (step {self.total_steps}: epochs {self.cfg.epochs:g} x "
                              f"{self.steps_per_epoch} steps); set epochs to at least {need:g} to go on from it, "
                              f"or start afresh with --fresh (the earlier run is moved aside)")
        if self.sharded:
            load_model_shards(self.model, local[0]["model"])
            load_optimizer_shards(self.optimizer, local[0]["optimizer"])
        else:
            self.model.load_state_dict(shared["model"])
            self.optimizer.load_state_dict(shared["optimizer"])
        self.step = step
        self._started = time.perf_counter() - float(shared["elapsed"])
        self.evaluator.load_state(shared)
        self.workers.load_state(local)
        self.meter.load_state(shared["totals"], local[0], self.job.device)


def _identity(section: Any, key: str) -> Any:
    """The part of a config section that changes results: not paths, and not settings this
    version no longer has (a checkpoint may be older than the schema)."""
    if key == "parallel":
        return section or "replicated"  # a checkpoint from before the setting
    if key == "data" and isinstance(section, dict):
        known = {f.name for f in dataclasses.fields(DataConfig)}
        return {k: v for k, v in section.items() if k in known and k not in ("dir", "cache_dir")}
    if key == "reducer" and isinstance(section, dict):  # settings added since: their defaults
        return {**dataclasses.asdict(ReducerConfig()), **section}
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


