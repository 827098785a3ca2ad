"""Training steps of ResNet-18 (CIFAR variant) on one device, dense against compressed: the time split.

One process, CIFAR-10-shaped batches of random images and labels (no data set needed: the
timings do not depend on the pixels), SGD with momentum as the resnet18-cifar10 preset, the
project's flat gradient buffer and reducers as the training loop uses them. With one process
there is no collective: the figures are forward, backward and each method's selection and
bookkeeping on this device, which is what a single lent GPU can show. Prints one line per
method and writes them as JSON.

    python bench/gpu_train.py --device cuda --methods exact,exdyna,topk --steps 60
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsecomm import reducers  # noqa: E402
from sparsecomm.models import build_model  # noqa: E402

import results_files  # noqa: E402  (bench/results_files.py)


def run(method: str, args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = build_model(args.model, num_classes=10).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    reducers.bind_flat_gradients(params)
    grads = [p.grad for p in params]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    reducer = reducers.build(method, density=args.density, sync_timing=device.type == "cuda")
    reducer.attach(model)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    parts: dict[str, list[float]] = {k: [] for k in ("forward", "backward", "select", "reduce", "optimizer", "step")}
    for step in range(args.warmup + args.steps):
        for g in grads:
            g.zero_()
        sync()
        t0 = time.perf_counter()
        loss = loss_fn(model(x), y)
        sync()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        reducer.reduce(grads, out=grads)
        sync()
        t3 = time.perf_counter()
        opt.step()
        sync()
        t4 = time.perf_counter()
        if step >= args.warmup:
            for key, value in (("forward", t1 - t0), ("backward", t2 - t1), ("reduce", t3 - t2),
                               ("select", reducer.stat("t_select", 0.0)), ("optimizer", t4 - t3), ("step", t4 - t0)):
                parts[key].append(value)
    row = {"method": method, "device": str(device), "model": args.model, "batch": args.batch,
           "density": reducer.stat("density", 0.0),
           **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in parts.items()}}
    if device.type == "cuda":
        row["max_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--model", default="resnet18")
    p.add_argument("--methods", default="exact,exdyna,topk,sage,thresh")
    p.add_argument("--density", type=float, default=0.001)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--out", default="bench/results/gpu_train.json")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here (use --device cpu to try the script)")
    device = torch.device(args.device)
    rows = []
    print(f"{'method':<10} {'forward':>8} {'backward':>9} {'select':>8} {'reduce':>8} {'optimizer':>9} {'step':>8} "
          f"{'density':>8}  (ms, medians of {args.steps} steps)")
    for method in args.methods.split(","):
        row = run(method, args, device)
        rows.append(row)
        print(f"{method:<10} {row['forward_ms']:8.2f} {row['backward_ms']:9.2f} {row['select_ms']:8.2f} "
              f"{row['reduce_ms']:8.2f} {row['optimizer_ms']:9.2f} {row['step_ms']:8.2f} {row['density']:8.4g}",
              flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results_files.keep_earlier(args.out)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
