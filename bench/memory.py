"""Extra memory of every reducer: what it keeps between steps, and the peak one reduce allocates.

For each method, on gradients shaped like a real model (ResNet-18 on CIFAR-10 by default) held
as the training loop holds them (views of one flat buffer, reduced in place), one worker:

  - kept: bytes the reducer holds after its first reduce (residual, the spare buffer for x,
    scratch and output buffers, method state), as the net allocation of that first call;
  - peak: the largest amount of memory one later reduce allocates beyond what existed before
    it (its transient temporaries), from the allocator's events (``torch.profiler`` with
    ``profile_memory=True`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA);

both also as multiples of the gradient's size. The goal (the project's issue on fast paths) is
a peak of at most 1x the gradient.

``--workers P`` (CPU) measures in P gloo processes on 127.0.0.1 instead, each reducer on the
default process group, and reports the largest figures of any rank: what an all-gather
exchange receives (P rows of every worker's encoded vector) is then part of the peak, as in
training. With one worker the single-worker communicator's all-gather is a copy of the row.

    .venv/bin/python bench/memory.py [--model resnet18|lstm] [--density 0.001] [--device cpu|cuda] [--workers P]
                                     [--selection auto|torch|fused]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gloo_workers  # noqa: E402  (bench/gloo_workers.py)
import results_files  # noqa: E402  (bench/results_files.py)
from reducers import auto_scale, model_shapes  # noqa: E402  (bench/reducers.py)
from sparsecomm import reducers  # noqa: E402


def _profiled_peak(fn) -> tuple[int, int]:
    """(peak, net) bytes allocated on the CPU while ``fn`` runs, from the allocator's own events.

    The profiler records every CPU allocation and free as a ``[memory]`` event; their running
    sum in time order is the allocator's level. (The per-operator ``cpu_memory_usage`` of
    ``prof.events()`` is no substitute: each allocation is counted once in every enclosing
    operator, e.g. three times for ``aten::to`` > ``aten::_to_copy`` > ``aten::empty_strided``,
    and a temporary made and freed inside one operator is invisible there. Summing those
    overstated peaks by up to 4x before 2026-12-01.)"""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cpu = (DeviceType.CPU, DeviceType.MKLDNN, DeviceType.IDEEP)
    records = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() in cpu)
    level = peak = 0
    for _, nbytes in records:
        level += nbytes
        peak = max(peak, level)
    return peak, level


def _cuda_peak(fn, device: torch.device) -> tuple[int, int]:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, torch.cuda.memory_allocated(device) - before


def measure(name: str, shapes, scale: float, density: float, device: torch.device, selection: str = "auto") -> dict:
    layout = reducers.Layout.of([torch.empty(s) for s in shapes])
    flat = torch.empty(layout.numel, device=device)
    views = layout.split(flat)
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(s, generator=gen) * scale).to(device) for s in shapes]
    options = {"groups": [len(shapes)]} if name in ("omgs", "agtf") else {}  # no timing-based fit in the way
    if selection != "auto" and "selection" in reducers.method_options(name):
        options["selection"] = selection
    r = reducers.build(name, density=density, **options)
    peak = _cuda_peak if device.type == "cuda" else _profiled_peak

    def step():
        torch._foreach_copy_(views, grads)
        r.reduce(views, out=views)

    args = (device,) if device.type == "cuda" else ()
    gc.collect()  # no earlier method's cyclic garbage freed inside a measurement
    _, kept = peak(step, *args)
    step()  # settle lazily sized buffers
    gc.collect()
    top, _ = peak(step, *args)
    size = layout.numel * flat.element_size()
    return {"method": name, "gradient_bytes": size, "kept_bytes": kept, "peak_bytes": top,
            "kept_ratio": kept / size, "peak_ratio": top / size}


def _run(args, rank: int = 0) -> list[dict]:
    torch.set_num_threads(1)
    device = torch.device(args.device)
    shapes = model_shapes(args.model)
    d = sum(torch.Size(s).numel() for s in shapes)
    scale = auto_scale(d, args.density)
    rows = []
    if rank == 0:
        print(f"{args.model}: d = {d:,} ({d * 4 / 2**20:.1f} MiB of float32 gradient), density {args.density}, "
              f"{device}, {args.workers} worker(s)")
        print(f"{'method':<12} {'kept MiB':>9} {'kept/grad':>10} {'peak MiB':>9} {'peak/grad':>10}")
    for name in [m for m in args.methods.split(",") if m]:
        row = measure(name, shapes, scale, args.density, device, args.selection)
        if args.workers > 1:  # the largest figures of any rank
            everyone: list = [None] * args.workers
            dist.all_gather_object(everyone, row)
            for key in ("kept_bytes", "peak_bytes", "kept_ratio", "peak_ratio"):
                row[key] = max(r[key] for r in everyone)
        rows.append(row)
        if rank == 0:
            print(f"{name:<12} {row['kept_bytes'] / 2**20:9.1f} {row['kept_ratio']:10.2f} "
                  f"{row['peak_bytes'] / 2**20:9.1f} {row['peak_ratio']:10.2f}", flush=True)
    return rows


def _worker(rank: int, results: dict, args) -> None:
    results["rows"] = _run(args, rank)


def _write(args, rows: list[dict]) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results_files.keep_earlier(args.out)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", choices=("resnet18", "lstm"))
    p.add_argument("--methods", default=",".join(reducers.available()))
    p.add_argument("--density", type=float, default=0.001)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--workers", type=int, default=1, help="gloo processes on this machine (CPU only)")
    p.add_argument("--selection", default="auto", choices=("auto", "torch", "fused"),
                   help="the selection option of the methods that have one (exdyna, micro, thresh, sage)")
    p.add_argument("--out", default="bench/results/memory.json")
    args = p.parse_args()
    if args.workers < 1 or (args.workers > 1 and args.device != "cpu"):
        p.error("--workers: a positive count, more than 1 only with --device cpu")
    if args.workers == 1:
        _write(args, _run(args))
    else:
        _write(args, gloo_workers.run(_worker, args.workers, args)["rows"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
