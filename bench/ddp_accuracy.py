"""Time to accuracy of PyTorch's DDP hooks against sparsecomm's, from two measurements.

Synchronous data-parallel training computes the same steps whatever the link between the
workers, so the time a configuration needs to reach an accuracy is the steps it needs times
its step time on that link. ``train`` measures the first: the MNIST CNN's preset (real MNIST,
64 images per worker, SGD with momentum 0.9 at lr 0.05, 2 epochs) under
DistributedDataParallel with each configuration of ``bench/ddp_links.py`` (DDP's default,
PyTorch's fp16, bf16 and PowerSGD hooks, sparsecomm's methods through its hook in either
scope), on P gloo processes of this machine, test accuracy every ``--eval-every`` steps.
``table`` multiplies the steps to each target by the configuration's median step time on
netlab hosts at each rate, from a ``bench/ddp_links.py run`` results file (the same
configurations, the same model, synthetic batches of the preset's shape).

    .venv/bin/python bench/ddp_accuracy.py train --data-dir DATA --workers 2 \\
        --configs ddp,torch-fp16,torch-bf16,torch-powersgd,fp16/bucket,powersgd/bucket,topk/bucket,exdyna/bucket \\
        --out bench/results/ddp_accuracy.json
    .venv/bin/python bench/ddp_accuracy.py table bench/results/ddp_accuracy.json bench/results/ddp_links-h2.json

The workers' data: each epoch a permutation of the 60,000 training images seeded by the
epoch, cut into P equal contiguous shards, one per worker (the remainder dropped).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ddp_links  # noqa: E402  (bench/ddp_links.py: the configurations)
import gloo_workers  # noqa: E402
import results_files  # noqa: E402
from sparsecomm.config import load_config  # noqa: E402
from sparsecomm.data.augment import NORMALIZATION, normalize  # noqa: E402
from sparsecomm.data.images import load_mnist  # noqa: E402
from sparsecomm.train.presets import find_preset  # noqa: E402

PRESET = "mnist-cnn"  # its batch per worker, SGD settings and epochs
CONFIGS = "ddp,torch-fp16,torch-bf16,torch-powersgd,fp16/bucket,powersgd/bucket,topk/bucket,exdyna/bucket"
TARGETS = (0.97, 0.98, 0.985)


def _images(data_dir: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_mnist(data_dir, "mnist", split)
    mean, std = NORMALIZATION["mnist"]
    return normalize(data.images.permute(0, 3, 1, 2), mean, std), data.labels


def _accuracy(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        right = sum(int((net(images[a:a + 1000]).argmax(1) == labels[a:a + 1000]).sum())
                    for a in range(0, len(labels), 1000))
    net.train()
    return right / len(labels)


def _train_one(label: str, args: argparse.Namespace, train: tuple, test: tuple) -> dict[str, Any]:
    """One configuration trained to the end of the preset; rank 0's test accuracies by step."""
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(find_preset(PRESET))
    batch_size, epochs = cfg.data.batch_size, round(cfg.epochs)
    net, _ = ddp_links._build("mnist_cnn", label, args)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum)
    images, labels = train
    per_worker = len(labels) // world
    steps_per_epoch = per_worker // batch_size
    curve, step, start = [], 0, time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        mine = order[rank * per_worker:(rank + 1) * per_worker]
        for b in range(steps_per_epoch):
            batch = mine[b * batch_size:(b + 1) * batch_size]
            opt.zero_grad()
            F.cross_entropy(net(images[batch]), labels[batch]).backward()
            opt.step()
            step += 1
            if step % args.eval_every == 0 or step == epochs * steps_per_epoch:
                accuracy = _accuracy(net.module, *test) if rank == 0 else None
                curve.append((step, accuracy))
                if rank == 0:
                    print(f"{label}: step {step}, test accuracy {accuracy:.4f}", flush=True)
    return {"curve": curve, "steps": step, "seconds": time.perf_counter() - start}


def _worker(rank: int, results: dict, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    train, test = _images(args.data_dir, "train"), _images(args.data_dir, "test")
    runs = {}
    for label in args.configs.split(","):
        torch.manual_seed(0)
        runs[label] = _train_one(label, args, train, test)
    results.update(runs)


def steps_to(curve: list, target: float) -> int | None:
    """The first evaluated step at which the test accuracy reached ``target`` (None: never)."""
    return next((step for step, accuracy in curve if accuracy is not None and accuracy >= target), None)


def train(args: argparse.Namespace) -> int:
    runs = gloo_workers.run(_worker, args.workers, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results_files.keep_earlier(args.out)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=1))
    print(f"wrote {args.out}")
    return 0


def table(args: argparse.Namespace) -> int:
    """Steps to each target, and seconds to it at each rate of the link results."""
    runs = json.loads(Path(args.accuracy).read_text())["runs"]
    cells = [c for c in json.loads(Path(args.links).read_text())["cells"]
             if c["model"] == "mnist_cnn" and c["hosts"] == args.hosts]
    rates = [c["rate"] for c in cells]
    target = args.target
    head = ["configuration", "final accuracy", *(f"steps to {t:g}" for t in TARGETS),
            *(f"s to {target:g} at {r}" for r in rates)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    best: dict[str, tuple[float, str]] = {}
    for label, run in runs.items():
        final = run["curve"][-1][1]
        reached = [steps_to(run["curve"], t) for t in TARGETS]
        times = []
        for cell in cells:
            row = cell["rows"].get(label)
            n = steps_to(run["curve"], target)
            seconds = None if row is None or n is None else n * row["t_iter"]
            times.append("-" if seconds is None else f"{seconds:.0f}")
            if seconds is not None and seconds < best.get(cell["rate"], (float("inf"), ""))[0]:
                best[cell["rate"]] = (seconds, label)
        lines.append("| " + " | ".join([label, f"{final:.4f}", *("-" if n is None else str(n) for n in reached),
                                        *times]) + " |")
    print("\n".join(lines))
    for rate, (seconds, label) in best.items():
        print(f"- {rate}: first to {target:g}: {label} ({seconds:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True)
    t = verbs.add_parser("train")
    t.add_argument("--data-dir", required=True)
    t.add_argument("--workers", type=int, default=2)
    t.add_argument("--configs", default=CONFIGS)
    t.add_argument("--density", type=float, default=0.01)
    t.add_argument("--bucket-mb", type=float, default=None)
    t.add_argument("--eval-every", type=int, default=50)
    t.add_argument("--out", default="bench/results/ddp_accuracy.json")
    s = verbs.add_parser("table")
    s.add_argument("accuracy")
    s.add_argument("links")
    s.add_argument("--hosts", type=int, default=2)
    s.add_argument("--target", type=float, default=0.98)
    args = p.parse_args(argv)
    return train(args) if args.verb == "train" else table(args)


if __name__ == "__main__":
    sys.exit(main())
