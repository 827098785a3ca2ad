"""What a method costs as FSDP2's reduce-scatter (sparsecomm.fsdp): memory per rank, and what
selecting per FSDP unit changes against selecting over the whole model.

Memory, in P gloo processes (the model split with ``shard_children``: one FSDP unit per
child, the root's unit holding the rest), after a few backward passes with the method, per
rank: this rank's parameter shards, the residuals its reducers keep (one unsharded gradient
per unit), and the largest unit's flat gradient (the buffer one call builds and drops).

Selection, in this process on one gradient of the unsharded model (seeded batch): top-k over
the whole model (``global_topk``, ExDyna, MiCRO, SAGE... aim at that set) against top-k
inside each unit with the unit's share of the density (what they select under FSDP): the
fraction of the whole-model set kept, and the fraction of the gradient's squared norm each
set carries.

    .venv/bin/python bench/fsdp_memory.py [--model resnet20|resnet18|lstm_lm] [--method topk] [--density 0.01]
                                          [--workers 2]
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
from sparsecomm.fsdp import register_reducer, shard_children  # noqa: E402
from sparsecomm.models import build_model  # noqa: E402

MODELS = {"resnet20": {"num_classes": 10}, "resnet18": {"num_classes": 10},
          "lstm_lm": {"vocab_size": 10000, "emsize": 200, "nhid": 200, "nlayers": 2, "tie_weights": False}}


def model_and_loss(name: str, seed: int = 0) -> tuple[nn.Module, callable]:
    torch.manual_seed(seed)
    model = build_model(name, **MODELS[name])
    if name == "lstm_lm":
        x = torch.randint(0, 10000, (35, 8), generator=torch.Generator().manual_seed(seed + 1))

        def loss(m: nn.Module) -> torch.Tensor:
            out = m(x)
            out = out[0] if isinstance(out, tuple) else out
            return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), x.reshape(-1))
    else:
        x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
        y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(seed + 2))

        def loss(m: nn.Module) -> torch.Tensor:
            return nn.functional.cross_entropy(m(x), y)
    return model, loss


def _memory(rank: int, results: dict, name: str, method: str, density: float, steps: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    model, loss = model_and_loss(name, seed=rank)
    shard_children(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    state = register_reducer(model, method, density=density)
    for _ in range(steps):
        model.zero_grad()
        loss(model).backward()
    shards = sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters())
    largest = max(rs.numel for rs in state.modules.values()) * 4
    full = sum(rs.numel for rs in state.modules.values()) * 4
    results.update({"units": len(state.modules), "parameter_shard_bytes": shards, "gradient_bytes": full,
                    "residual_bytes": state.residual_bytes(), "largest_unit_gradient_bytes": largest,
                    "density": state.stats["density"], "bytes_sent": state.stats["bytes_sent"]})


def selection(name: str, density: float) -> dict:
    """Top-k over the whole model's gradient against top-k inside each child's gradient."""
    model, loss = model_and_loss(name)
    loss(model).backward()
    children = [[p.grad.reshape(-1) for p in c.parameters()] for c in model.children() if list(c.parameters())]
    rest = [p.grad.reshape(-1) for p in model.parameters()
            if not any(p is q for c in model.children() for q in c.parameters())]
    units = [torch.cat(u) for u in children + ([rest] if rest else [])]
    g = torch.cat(units).abs()
    k = max(1, int(density * g.numel()))
    whole = set(torch.topk(g, k).indices.tolist())
    picked, at = [], 0
    for u in units:
        ku = max(1, int(density * u.numel()))
        picked += (torch.topk(u.abs(), ku).indices + at).tolist()
        at += u.numel()
    per_unit = set(picked)
    energy = float(g.square().sum())
    share = lambda s: float(g[torch.tensor(sorted(s))].square().sum()) / energy  # noqa: E731
    return {"units": len(units), "k": k, "per_unit_k": len(per_unit), "kept_of_whole_model_set": len(whole & per_unit) / k,
            "whole_model_energy": share(whole), "per_unit_energy": share(per_unit)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20", choices=sorted(MODELS))
    ap.add_argument("--method", default="topk")
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    memory = gloo_workers.run(_memory, args.workers, args.model, args.method, args.density, args.steps, threads=1)
    out = {"model": args.model, "method": args.method, "density": args.density, "workers": args.workers,
           "memory_rank0": memory, "residual_over_shards": memory["residual_bytes"] / memory["parameter_shard_bytes"],
           "selection": selection(args.model, args.density)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
