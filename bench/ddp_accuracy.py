"""Time to a target metric of PyTorch's DDP hooks against sparsecomm's, from two measurements.

Synchronous data-parallel training computes the same steps whatever the link between the
workers, so the time a configuration needs to reach a metric is the steps it needs times its
step time on that link. ``train`` measures the first: a preset's model, data, optimizer and
learning-rate schedule, trained by the project's task (the data path of run.sh: each worker's
shard, its batches, its loss and the evaluation) under DistributedDataParallel with each
configuration of ``bench/ddp_links.py`` (DDP's default, PyTorch's fp16, bf16 and PowerSGD hooks,
sparsecomm's methods through its hook in either scope), on P gloo processes of this machine,
evaluated every ``--eval-every`` steps. ``table`` multiplies the steps to each target by the
configuration's median step time on netlab hosts at each rate, from a ``bench/ddp_links.py
run`` results file (the same configurations and model, synthetic batches of the preset's shape).

    .venv/bin/python bench/ddp_accuracy.py train --model mnist_cnn --data-dir DATA --workers 2 \\
        --out bench/results/ddp_accuracy.json
    .venv/bin/python bench/ddp_accuracy.py table bench/results/ddp_accuracy.json bench/results/ddp_links-h2-idle.json
    .venv/bin/python bench/ddp_accuracy.py train --model lstm --data-dir DATA --epochs 2 --eval-every 250 \\
        --configs ddp,torch-bf16,torch-powersgd,powersgd/bucket,exdyna/bucket,topk/bucket \\
        --out bench/results/ddp_accuracy-lstm.json
    .venv/bin/python bench/ddp_accuracy.py table bench/results/ddp_accuracy-lstm.json \\
        bench/results/ddp_links-h2-idle.json --targets 200,170,150

The metric is the task's on its evaluation split: test accuracy for the MNIST CNN, validation
perplexity for the PTB LSTM (lower is better; a target is reached at or under it).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ddp_links  # noqa: E402  (bench/ddp_links.py: the configurations)
import gloo_workers  # noqa: E402
import results_files  # noqa: E402
from sparsecomm.config import load_config  # noqa: E402
from sparsecomm.launch.job import join  # noqa: E402
from sparsecomm.tasks import build_task  # noqa: E402
from sparsecomm.train.optim import LearningRate, build_optimizer, peak_lr  # noqa: E402
from sparsecomm.train.presets import find_preset  # noqa: E402

# bench/ddp_links.py's model names and the presets they train to
PRESETS = {"mnist_cnn": "mnist-cnn", "lstm": "lstm-ptb-small", "resnet20": "resnet20-cifar10-short"}
CONFIGS = "ddp,torch-fp16,torch-bf16,torch-powersgd,fp16/bucket,powersgd/bucket,topk/bucket,exdyna/bucket"
TARGETS = {"accuracy": (0.97, 0.98, 0.985), "perplexity": (200.0, 170.0, 150.0)}


def _metric(task: Any, module: torch.nn.Module) -> tuple[str, float]:
    """The task's metric on its validation split where it has one, else on its test split (a
    collective: every rank scores its part)."""
    module.eval()
    with torch.no_grad():
        lines = task.evaluate(module)
    module.train()
    by_split = {line["split"]: line[task.metric] for line in lines if task.metric in line}
    split = "valid" if "valid" in by_split else task.metric_split
    return split, by_split[split]


def _train_one(label: str, args: argparse.Namespace, cfg: Any, task: Any) -> dict[str, Any]:
    """One configuration trained by the preset for ``--epochs`` (default: the preset's) or
    ``--max-steps``; rank 0's metric by step."""
    job = task.job
    if label == "local":  # in bench/ddp_links.py no exchange at all (no_sync), which cannot train together
        raise ValueError("configuration 'local' does not train as one job; pick another of bench/ddp_links.py's")
    torch.manual_seed(cfg.seed)
    module = task.build_model()
    net, state = ddp_links.wrap(module, label, args)
    for name in ("init_hidden", "detach_hidden"):  # what the language task's loss asks the model for
        if hasattr(module, name):
            setattr(net, name, getattr(module, name))
    epochs = args.epochs or cfg.epochs
    schedule = LearningRate(peak_lr(cfg.optimizer, cfg.batch_per_worker(job.world), job.world), cfg.optimizer.lr,
                            cfg.schedule, epochs=cfg.epochs, workers=job.world)
    opt = build_optimizer(module, cfg.optimizer, schedule(0.0))
    per_epoch = task.steps_per_epoch()
    total = math.ceil(epochs * per_epoch)
    if args.max_steps:
        total = min(total, args.max_steps)
    curve, step, start, split = [], 0, time.perf_counter(), None
    module.train()
    for epoch in range(math.ceil(total / per_epoch)):
        task.begin_epoch(epoch)  # as the training loop does, with the method's epoch context
        if state is not None:
            state.begin_epoch(epoch, schedule(float(epoch)), cfg.epochs)
        for batch in task.batches(epoch, 0):
            lr = schedule(step / per_epoch)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.zero_grad()
            task.loss(net, batch).backward()
            if cfg.clip_norm:
                torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.clip_norm)
            opt.step()
            step += 1
            if step % args.eval_every == 0 or step == total:
                split, value = _metric(task, module)
                curve.append((step, value))
                if job.is_main:
                    print(f"{label}: step {step}, {split} {task.metric} {value:.4f}", flush=True)
            if step == total:
                break
    return {"curve": curve, "steps": step, "seconds": time.perf_counter() - start, "metric": task.metric,
            "split": split, "higher_is_better": task.higher_is_better}


def _worker(rank: int, results: dict, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    preset = PRESETS[args.model]
    cfg = load_config(find_preset(preset), [f"data.dir={args.data_dir}"], preset_name=preset)
    task = build_task(cfg, join("cpu"))
    runs = {label: _train_one(label, args, cfg, task) for label in args.configs.split(",")}
    results.update({"model": args.model, "preset": preset, "runs": runs})


def steps_to(curve: list, target: float, higher_is_better: bool = True) -> int | None:
    """The first evaluated step whose metric reached ``target`` (at or over it, or at or under it
    where lower is better); None: never."""
    return next((step for step, value in curve if value is not None
                 and (value >= target if higher_is_better else value <= target)), None)


def train(args: argparse.Namespace) -> int:
    results = gloo_workers.run(_worker, args.workers, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results_files.keep_earlier(args.out)
    Path(args.out).write_text(json.dumps({"settings": vars(args), **results}, indent=1))
    print(f"wrote {args.out}")
    return 0


def table(args: argparse.Namespace) -> int:
    """Steps to each target, and seconds to the first target at each rate of the link results."""
    data = json.loads(Path(args.accuracy).read_text())
    runs, model = data["runs"], data.get("model", "mnist_cnn")  # files before the LSTM: the MNIST CNN
    first = next(iter(runs.values()))
    metric, higher = first.get("metric", "accuracy"), first.get("higher_is_better", True)
    targets = [float(t) for t in args.targets.split(",")] if args.targets else list(TARGETS[metric])
    cells = [c for c in json.loads(Path(args.links).read_text())["cells"]
             if c["model"] == model and c["hosts"] == args.hosts]
    rates = [c["rate"] for c in cells]
    target = targets[len(targets) // 2] if args.target is None else args.target
    head = ["configuration", f"final {metric}", *(f"steps to {t:g}" for t in targets),
            *(f"s to {target:g} at {r}" for r in rates)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    best: dict[str, tuple[float, str]] = {}
    for label, run in runs.items():
        final = run["curve"][-1][1]
        reached = [steps_to(run["curve"], t, higher) for t in targets]
        n = steps_to(run["curve"], target, higher)
        times = []
        for cell in cells:
            row = cell["rows"].get(label)
            seconds = None if row is None or n is None else n * row["t_iter"]
            times.append("-" if seconds is None else f"{seconds:.0f}")
            if seconds is not None and seconds < best.get(cell["rate"], (float("inf"), ""))[0]:
                best[cell["rate"]] = (seconds, label)
        shown = f"{final:.4f}" if metric == "accuracy" else f"{final:.1f}"
        lines.append("| " + " | ".join([label, shown, *("never" if n is None else str(n) for n in reached),
                                        *times]) + " |")
    print("\n".join(lines))
    for rate, (seconds, label) in best.items():
        print(f"- {rate}: first to {target:g}: {label} ({seconds:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True)
    t = verbs.add_parser("train")
    t.add_argument("--model", choices=sorted(PRESETS), default="mnist_cnn",
                   help="the model, trained by its preset: " + ", ".join(f"{k}: {v}" for k, v in PRESETS.items()))
    t.add_argument("--data-dir", required=True)
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--configs", default=CONFIGS)
    t.add_argument("--density", type=float, default=0.01)
    t.add_argument("--bucket-mb", type=float, default=None)
    t.add_argument("--epochs", type=float, default=None, help="train this many epochs of the preset's "
                   "schedule (default: all of them)")
    t.add_argument("--max-steps", type=int, default=None)
    t.add_argument("--eval-every", type=int, default=50)
    t.add_argument("--out", default="bench/results/ddp_accuracy.json")
    s = verbs.add_parser("table")
    s.add_argument("accuracy")
    s.add_argument("links")
    s.add_argument("--hosts", type=int, default=2)
    s.add_argument("--targets", default=None, help="comma-separated (default: 0.97,0.98,0.985 for accuracy, "
                   "200,170,150 for perplexity)")
    s.add_argument("--target", type=float, default=None, help="the one the seconds are to (default: the "
                   "middle of --targets)")
    args = p.parse_args(argv)
    return train(args) if args.verb == "train" else table(args)


if __name__ == "__main__":
    sys.exit(main())
