"""How fast ExDyna, MiCRO and SAGE reach their target density, and how they follow a gradient
scale that jumps 10x up and back down (real gloo workers on this CPU).

    .venv/bin/python bench/warm_start.py [--workers 2] [--methods exdyna,sage] [--density 0.01]
        [--gains 0.05,0.1,0.15,0.2,0.3,0.5] [--steps-per-phase 60] [--acceleration 0.25]
        [--max-acceleration 1.5] [--no-error-feedback] [--per-step]
    .venv/bin/python bench/warm_start.py --runs OUTPUT_DIR

``--runs`` instead summarises training runs recorded with ``records.log_every=1`` (one line per
step in metrics.jsonl): mean density and local density, the share of steps within 2x of the
target, and the ratios of the first 12 steps.

Each configuration runs on the same gradients: ``scale * spread * N(0, 1)`` with a fixed
log-normal spread per coordinate (heavier tails than a Gaussian) and a fresh draw per worker
and step; the scale is 0.01, then 0.1 from ``--steps-per-phase`` on, then 0.01 again. For each
configuration it prints, per phase, the steps until density / target is within 2x and stays
there for the rest of the phase ("settle"; "-" when it never does), the extreme ratios after
settling, and the crossings of the target after settling (oscillation). ``--per-step`` prints
every ratio. Configurations: the published method (controller "paper", no warm start), the
warm start alone, and the fast controller with warm start at each gain in ``--gains`` (the
gain is sparsecomm.reducers.select.control.FAST_GAIN, set here before building; --acceleration and
--max-acceleration set the growth of ExDyna's and MiCRO's downward steps likewise).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsecomm import reducers
from sparsecomm.reducers.select import control

D = 100_000


def scale_at(step: int, phase: int) -> float:
    return 0.1 if phase <= step < 2 * phase else 0.01


def grads(rank: int, step: int, phase: int) -> list[torch.Tensor]:
    spread = torch.exp(0.5 * torch.randn(D, generator=torch.Generator().manual_seed(1)))
    noise = torch.randn(D, generator=torch.Generator().manual_seed(1_000 * step + rank + 7))
    g = noise * spread * scale_at(step, phase)
    return [g[:60_000].view(600, 100), g[60_000:]]


def run(name: str, options: dict, gain: float, steps: int, args: argparse.Namespace) -> list[float]:
    """density / target per step (SAGE: each worker's own density, which it controls)."""
    control.FAST_GAIN = gain
    control.FAST_ACCELERATION = args.acceleration
    control.FAST_MAX_ACCELERATION = args.max_acceleration
    r = reducers.build(name, density=args.density, error_feedback=not args.no_error_feedback, **options)
    me = dist.get_rank() if dist.is_initialized() else 0
    key = "local_density" if name == "sage" else "density"
    out = []
    for t in range(steps):
        r.reduce(grads(me, t, args.steps_per_phase))
        out.append(r.stats[key] / args.density)
    return out


def settle(ratios: list[float]) -> tuple[int | None, float, float, int]:
    """(first step after which every ratio is within 2x, min and max after it, target crossings)."""
    inside = [0.5 <= q <= 2.0 for q in ratios]
    first = None
    for i in range(len(ratios)):
        if all(inside[i:]):
            first = i
            break
    if first is None:
        return None, min(ratios), max(ratios), 0
    rest = ratios[first:]
    crossings = sum(1 for a, b in zip(rest, rest[1:]) if (a - 1) * (b - 1) < 0 and abs(math.log(b)) > math.log(1.1))
    return first, min(rest), max(rest), crossings


def worker(rank: int, size: int, port: int, args: argparse.Namespace, configs: list, queue) -> None:
    torch.set_num_threads(1)
    if size > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    for label, name, options, gain in configs:
        ratios = run(name, options, gain, 3 * args.steps_per_phase, args)
        if rank == 0:
            queue.put((label, name, ratios))
    if rank == 0:
        queue.put(None)
    if size > 1:
        dist.destroy_process_group()


def summarise_runs(folder: str) -> None:
    """One line per sparse run under ``folder`` (its metrics.jsonl must hold a line per step)."""
    for run in sorted(Path(folder).iterdir()):
        metrics, summary = run / "metrics.jsonl", run / "summary.json"
        if not metrics.is_file() or not summary.is_file():
            continue
        target = json.loads(summary.read_text())["target_density"]
        steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if "density" in r]
        if not steps or all(r["density"] >= 1 for r in steps):  # a dense run
            continue
        cells = []
        for key in ("density", "local_density"):
            ratios = [r[key] / target for r in steps]
            within = sum(0.5 <= q <= 2 for q in ratios) / len(ratios)
            cells.append(f"{key} mean {sum(r[key] for r in steps) / len(steps):.4f}, within 2x {within:.0%}")
        first = " ".join(f"{r['density'] / target:.2g}" for r in steps[:12])
        print(f"{run.name}: {len(steps)} steps; " + "; ".join(cells) + f"; density/target, steps 1-12: {first}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", help="summarise the training runs in this output directory instead")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--methods", default="exdyna,sage")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--gains", default="0.05,0.1,0.15,0.2,0.3,0.5")
    p.add_argument("--steps-per-phase", type=int, default=60)
    p.add_argument("--acceleration", type=float, default=control.FAST_ACCELERATION,
                   help="ExDyna/MiCRO: downward steps grow by min(max, ratio ** -this) per step below the band")
    p.add_argument("--max-acceleration", type=float, default=control.FAST_MAX_ACCELERATION)
    p.add_argument("--no-error-feedback", action="store_true")
    p.add_argument("--per-step", action="store_true")
    args = p.parse_args()
    if args.runs:
        summarise_runs(args.runs)
        return
    configs = []
    for name in args.methods.split(","):
        configs.append(("paper, no warm start", name, {"controller": "paper", "warm_start": False}, 0.0))
        configs.append(("paper, warm start", name, {"controller": "paper"}, 0.0))
        for gain in (float(g) for g in args.gains.split(",") if g):
            configs.append((f"fast gain {gain:g}, warm start", name, {"controller": "fast"}, gain))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args.workers, port, args, configs, queue))
             for r in range(args.workers)]
    for proc in procs:
        proc.start()
    n = args.steps_per_phase
    print(f"d = {D:,}, {args.workers} workers, target density {args.density:g}, scale x10 at step {n}, "
          f"back at step {2 * n}; per phase: settle step (within 2x from then on) | min-max after | "
          f"crossings | share within 2x from step 20")
    while (item := queue.get()) is not None:
        label, name, ratios = item
        cells = []
        for ph in range(3):
            part = ratios[ph * n:(ph + 1) * n]
            first, lo, hi, cross = settle(part)
            late = sum(0.5 <= q <= 2 for q in part[20:]) / max(1, len(part) - 20)
            cells.append(f"{'-' if first is None else first:>3} | {lo:5.2f}-{hi:5.2f} | {cross} | {late:4.0%}")
        print(f"{name:7} {label:28} " + "   ".join(cells) + f"   median {statistics.median(ratios):.2f}")
        if args.per_step:
            print("   " + " ".join(f"{q:.2g}" for q in ratios))
    for proc in procs:
        proc.join()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
