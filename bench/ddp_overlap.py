"""How much of the DDP hook's exchange bucket scope hides behind backward.

Trains an MLP on random data with ``--workers`` gloo processes under DistributedDataParallel
and times whole iterations (zero_grad, forward, backward with the hook, SGD step) for:

  - ``local``             no exchange at all (DDP's ``no_sync()``): the floor
  - ``ddp``               DDP's own all-reduce (overlapped by DDP)
  - ``METHOD/model``      the sparsecomm hook, the whole model reduced after the last bucket
  - ``METHOD/bucket``     the sparsecomm hook, each bucket reduced as DDP hands it over, on a
                          worker thread, while backward goes on
  - ``torch-fp16``, ``torch-powersgd``  PyTorch's own hooks, for reference

Configurations are interleaved round by round (every configuration runs ``--steps`` steps in
each of ``--rounds`` rounds) so that a shared machine's load drifts over all of them alike;
reported are medians over all timed steps (rank 0). ``hidden`` is
``1 - (T(bucket) - T(local)) / (T(model) - T(local))``: the share of model scope's cost over
the floor that bucket scope removed.

    .venv/bin/python bench/ddp_overlap.py [--methods exact,topk,fp16,powersgd] [--workers 2]
        [--width 1024 --depth 4] [--bucket-mb 1] [--steps 10 --rounds 5]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sparsecomm.ddp import ReducerHookState, reducer_hook

import gloo_workers  # bench/gloo_workers.py: the process harness
import results_files  # bench/results_files.py: earlier results are set aside


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Flatten(), nn.Linear(784, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def configurations(args) -> list[str]:
    labels = ["local", "ddp"]
    for method in args.methods.split(","):
        labels += [f"{method}/model", f"{method}/bucket"]
    return labels + [f"torch-{name}" for name in args.torch_hooks.split(",") if name]


def build(label: str, args) -> tuple[DDP, ReducerHookState | None, bool]:
    """The DDP model of a configuration, its sparsecomm state (or None), and whether it syncs."""
    net = DDP(make_model(args.width, args.depth), bucket_cap_mb=args.bucket_mb)
    state = None
    if "/" in label:
        method, scope = label.split("/")
        state = ReducerHookState(method, density=args.density, scope=scope)
        net.register_comm_hook(state, reducer_hook)
    elif label == "torch-fp16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        net.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif label == "torch-powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook
        net.register_comm_hook(powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=2,
                                                           start_powerSGD_iter=2, min_compression_rate=1),
                               powerSGD_hook.powerSGD_hook)
    return net, state, label != "local"


def worker(rank: int, results: dict, args) -> None:
    labels = configurations(args)
    runs = {label: build(label, args) for label in labels}
    optims = {label: torch.optim.SGD(net.parameters(), lr=0.01) for label, (net, _, _) in runs.items()}
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = [(torch.randn(args.batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (args.batch,), generator=gen))
               for _ in range(4)]
    times: dict[str, dict[str, list[float]]] = {label: {"t_iter": [], "t_backward": [], "t_reduce": []}
                                                for label in labels}
    for round_ in range(args.rounds + 1):  # round 0 warms up (DDP's rebuild, first steps)
        for label in labels:
            net, state, sync = runs[label]
            opt = optims[label]
            for step in range(args.steps):
                x, y = batches[step % len(batches)]
                _, t_backward, _, t_iter = timed_step(net, opt, partial(_cross_entropy, net, x, y), sync)
                if round_:
                    times[label]["t_iter"].append(t_iter)
                    times[label]["t_backward"].append(t_backward)
                    if state is not None:
                        s = state.stats
                        times[label]["t_reduce"].append(s.get("t_select", 0.0) + s.get("t_comm", 0.0))
    for label in labels:
        results[label] = summary(times[label], runs[label][1])


def _cross_entropy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(net(x), y)


def timed_step(net: nn.Module, opt: torch.optim.Optimizer, loss_of: Callable[[], torch.Tensor],
               sync: bool) -> tuple[float, float, float, float]:
    """One iteration (zero_grad, forward, backward, optimizer step) after a barrier, timed:
    (forward, backward, step, whole) seconds. ``sync`` False: under DDP's ``no_sync()``, which
    must hold over forward too (DDP decides at forward whether backward syncs). Also
    bench/ddp_links.py's."""
    dist.barrier()
    t0 = time.perf_counter()
    with contextlib.nullcontext() if sync else net.no_sync():
        opt.zero_grad()
        loss = loss_of()
        t1 = time.perf_counter()
        loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2, t3 - t0


def summary(times: dict[str, list[float]], state: ReducerHookState | None) -> dict:
    """A configuration's medians, with the sparsecomm hook's scope, buckets and bytes (also
    bench/ddp_links.py's)."""
    row = {k: statistics.median(v) if v else None for k, v in times.items()}
    if state is not None:
        row["scope"] = state.scope
        row["buckets"] = state.stats.get("buckets", 1)
        row["bytes_sent"] = state.stats.get("bytes_sent")
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="exact,topk,fp16,powersgd")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--bucket-mb", type=float, default=1.0)
    p.add_argument("--torch-hooks", default="fp16", help="PyTorch's own hooks to time too: fp16, powersgd")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="bench/results/ddp_overlap.json")
    args = p.parse_args()
    results = gloo_workers.run(worker, args.workers, args, threads=args.threads)
    params = sum(q.numel() for q in make_model(args.width, args.depth).parameters())
    print(f"MLP 784-{args.width}x{args.depth}-10 ({params / 1e6:.2f}M parameters), batch {args.batch}, "
          f"{args.workers} gloo workers x {args.threads} thread(s), buckets of {args.bucket_mb} MB, density "
          f"{args.density}; medians of {args.steps * args.rounds} steps (rank 0), ms")
    head = f"{'config':<18} {'iteration':>10} {'backward':>9} {'reduce':>8} {'buckets':>8} {'hidden':>7}"
    print(head)
    print("-" * len(head))
    floor = results["local"]["t_iter"]
    for label in configurations(args):
        r = results[label]
        hidden = ""
        if label.endswith("/bucket"):
            model = results[label.replace("/bucket", "/model")]["t_iter"]
            if model > floor:
                r["hidden"] = 1 - (r["t_iter"] - floor) / (model - floor)
                hidden = f"{r['hidden']:.2f}"
        reduce = "" if not r.get("t_reduce") else f"{r['t_reduce'] * 1e3:.2f}"
        print(f"{label:<18} {r['t_iter'] * 1e3:>10.2f} {r['t_backward'] * 1e3:>9.2f} {reduce:>8} "
              f"{r.get('buckets', ''):>8} {hidden:>7}")
    results_files.write(args.out, vars(args), results)


if __name__ == "__main__":
    main()
