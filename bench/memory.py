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

    .venv/bin/python bench/memory.py [--model resnet18|lstm] [--density 0.001] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reducers import auto_scale, model_shapes  # noqa: E402  (bench/reducers.py)
from sparsecomm import reducers  # noqa: E402


def _profiled_peak(fn) -> tuple[int, int]:
    """(peak, net) bytes allocated on the CPU while ``fn`` runs, from the profiler's events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    level = peak = 0
    for e in events:
        level += e.cpu_memory_usage
        peak = max(peak, level)
    return peak, level


def _cuda_peak(fn, device: torch.device) -> tuple[int, int]:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, torch.cuda.memory_allocated(device) - before


def measure(name: str, shapes, scale: float, density: float, device: torch.device) -> dict:
    layout = reducers.Layout.of([torch.empty(s) for s in shapes])
    flat = torch.empty(layout.numel, device=device)
    views = layout.split(flat)
    gen = torch.Generator().manual_seed(0)
    grads = [(torch.randn(s, generator=gen) * scale).to(device) for s in shapes]
    options = {"groups": [len(shapes)]} if name in ("omgs", "agtf") else {}  # no timing-based fit in the way
    r = reducers.build(name, density=density, **options)
    peak = _cuda_peak if device.type == "cuda" else _profiled_peak

    def step():
        torch._foreach_copy_(views, grads)
        r.reduce(views, out=views)

    args = (device,) if device.type == "cuda" else ()
    _, kept = peak(step, *args)
    step()  # settle lazily sized buffers
    top, _ = peak(step, *args)
    size = layout.numel * flat.element_size()
    return {"method": name, "gradient_bytes": size, "kept_bytes": kept, "peak_bytes": top,
            "kept_ratio": kept / size, "peak_ratio": top / size}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", choices=("resnet18", "lstm"))
    p.add_argument("--methods", default=",".join(reducers.available()))
    p.add_argument("--density", type=float, default=0.001)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", default="bench/results/memory.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    shapes = model_shapes(args.model)
    d = sum(torch.Size(s).numel() for s in shapes)
    scale = auto_scale(d, args.density)
    rows = []
    print(f"{args.model}: d = {d:,} ({d * 4 / 2**20:.1f} MiB of float32 gradient), density {args.density}, {device}")
    print(f"{'method':<12} {'kept MiB':>9} {'kept/grad':>10} {'peak MiB':>9} {'peak/grad':>10}")
    for name in [m for m in args.methods.split(",") if m]:
        row = measure(name, shapes, scale, args.density, device)
        rows.append(row)
        print(f"{name:<12} {row['kept_bytes'] / 2**20:9.1f} {row['kept_ratio']:10.2f} {row['peak_bytes'] / 2**20:9.1f} "
              f"{row['peak_ratio']:10.2f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
