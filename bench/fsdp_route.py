"""Bytes per step of a method as FSDP2's reduce-scatter with and without routing (issue 22):
``register_reducer(..., route=True)`` sends each selected pair only to the rank owning its
shard (one all-to-all, after a small all-gather of the counts), ``route=False`` all-gathers
every rank's pairs to every rank. For the quantisers and casts (qsgd, terngrad, efsignsgd,
signsgd, fp16, bf16), where every coordinate travels, routing sends each rank only its shard's
part of every encoded row (one all-to-all per window) instead of all-gathering the rows;
``--density`` is not used by them. For the methods whose values were all-reduced at positions
everyone learns or knows (exdyna, micro, deft, randomk, cltk, gtopk), the positions travel as
before and each rank's values only to their owners (one all-to-all): ``bytes_wire`` compares
the ring all-reduce's estimate with the bytes the all-to-all brings.

P gloo processes; the model split with ``shard_children`` (one FSDP unit per child, the root's
unit holding the rest), each rank its own seeded batches; per backward, every unit's counters
summed over the units (``state.stats``): ``bytes_wire`` (what reaches this rank: the
handshake, the counts' all-gather, the pairs), ``bytes_sent`` (what it hands over). Reported:
the mean over steps on each rank, their mean and largest over ranks, and how many unit calls
routed (the others took the all-gather, no dearer at their counts).

    .venv/bin/python bench/fsdp_route.py [--model mnist_cnn|resnet20|lstm_lm] [--method topk] [--density 0.01]
                                         [--workers 2] [--steps 3]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gloo_workers  # noqa: E402  (bench/gloo_workers.py)
from fsdp_memory import MODELS, model_and_loss  # noqa: E402
from sparsecomm.fsdp import register_reducer, shard_children  # noqa: E402
from sparsecomm.models import build_model  # noqa: E402

MNIST = {"mnist_cnn": {"num_classes": 10}}


def _model(name: str, seed: int) -> tuple[nn.Module, callable]:
    if name not in MNIST:
        return model_and_loss(name, seed)
    torch.manual_seed(seed)
    model = build_model(name, **MNIST[name]).eval()  # no dropout: the same gradient either way

    def loss(m: nn.Module, t: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1000 * seed + t)
        x, y = torch.randn(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen)
        return nn.functional.cross_entropy(m(x), y)
    return model, loss


def _bytes(rank: int, results: dict, name: str, method: str, density: float, steps: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    mine = {}
    for route in (False, True):
        model, loss = _model(name, rank)
        shard_children(model, mesh=init_device_mesh("cpu", (world,)))
        state = register_reducer(model, method, density=density, route=route)
        wire = sent = 0.0
        routed = calls = 0
        for t in range(steps):
            model.zero_grad()
            (loss(model, t) if name in MNIST else loss(model)).backward()
            wire += state.stats["bytes_wire"]
            sent += state.stats["bytes_sent"]
            for rs in state.modules.values():
                calls += 1
                routed += bool(rs.stat("routed", False))
        mine["routed" if route else "unrouted"] = {"bytes_wire": wire / steps, "bytes_sent": sent / steps,
                                                   "unit_calls_routed": routed, "unit_calls": calls}
        mine["units"] = len(state.modules)
        mine["density"] = state.stats["density"]
        mine["local_density"] = state.stats["local_density"]
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        out = {"units": mine["units"]}
        for key in ("unrouted", "routed"):
            ranks = [r[key] for r in everyone]
            out[key] = {f"{b}_{how}": f(r[b] for r in ranks) for b in ("bytes_wire", "bytes_sent")
                        for how, f in (("mean", lambda v: sum(v) / world), ("max", max))}
            out[key]["unit_calls_routed"] = sum(r["unit_calls_routed"] for r in ranks)
            out[key]["unit_calls"] = sum(r["unit_calls"] for r in ranks)
        out["wire_routed_over_unrouted"] = out["routed"]["bytes_wire_mean"] / out["unrouted"]["bytes_wire_mean"]
        out["local_density_rank0"] = mine["local_density"]
        results.update(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mnist_cnn", choices=sorted({*MODELS, *MNIST}))
    ap.add_argument("--method", default="topk")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    got = gloo_workers.run(_bytes, args.workers, args.model, args.method, args.density, args.steps, threads=1)
    print(json.dumps({"model": args.model, "method": args.method, "density": args.density,
                      "workers": args.workers, "steps": args.steps, **got}, indent=1))


if __name__ == "__main__":
    main()
