"""What a method costs as FSDP2's reduce-scatter (sparsecomm.fsdp): memory per rank, and what
selecting per FSDP unit changes against selecting over the whole model.

Memory, in P gloo processes (the model split with ``shard_children``: one FSDP unit per
child, the root's unit holding the rest), per rank: this rank's parameter shards, the
residuals its reducers keep (one unsharded gradient per unit, in ``--residual-dtype``), and
everything the reducers hold from one backward to the next (``held_bytes``, every tensor
storage reachable from them, by kind: residuals, the compensated vector's spare buffer and the
scratch buffers, which ``--keep-buffers false`` drops after each call, and the rest: method
state and caches); and the mean time of a backward, the method's and FSDP's own reduce-scatter
(``exact``), over ``--steps`` passes after two untimed ones.

Selection, in this process on one gradient of the unsharded model (seeded batch): top-k over
the whole model (``global_topk``, ExDyna, MiCRO, SAGE... aim at that set) against top-k
inside each unit with the unit's share of the density (what they select under FSDP): the
fraction of the whole-model set kept, and the fraction of the gradient's squared norm each
set carries.

    .venv/bin/python bench/fsdp_memory.py [--model resnet20|resnet18|lstm_lm] [--method topk] [--density 0.01]
                                          [--workers 2] [--residual-dtype bfloat16] [--keep-buffers true|false]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gloo_workers  # noqa: E402  (bench/gloo_workers.py)
from sparsecomm import reducers  # noqa: E402
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


def _registered(name: str, rank: int, method: str, density: float, options: dict) -> tuple[nn.Module, callable, object]:
    from torch.distributed.device_mesh import init_device_mesh

    model, loss = model_and_loss(name, seed=rank)
    shard_children(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    return model, loss, register_reducer(model, method, density=density, **options)


def _backward(model: nn.Module, loss: callable) -> None:
    model.zero_grad()
    loss(model).backward()


def held_tensors(root: object) -> dict[int, int]:
    """Every tensor storage reachable from ``root`` through sparsecomm's own objects, dicts,
    lists, tuples and sets: {storage address: bytes}. Counts each storage once, however many
    views of it are reachable."""
    seen_objects: set[int] = set()
    storages: dict[int, int] = {}
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen_objects:
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(obj, dict):
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif type(obj).__module__.startswith("sparsecomm") and hasattr(obj, "__dict__"):
            todo.extend(vars(obj).values())
    return storages


def held_by_reducers(state) -> dict[str, int]:
    """Bytes the registration's reducers hold between backward passes, by kind: residuals, the
    compensated vector's spare buffers, workspace buffers (scratch, output), and the rest
    (method state, caches of the exchange and the selection)."""
    kinds = {"residual": 0, "spare": 0, "buffers": 0, "other": 0}
    for rs in state.modules.values():
        if rs.reducer is None:
            continue
        held = held_tensors(rs.reducer)
        feedback, workspace = rs.reducer.workspace.feedback, rs.reducer.workspace
        named = {"residual": [feedback._m], "spare": [feedback._x], "buffers": list(workspace.buffers.values())}
        for kind, tensors in named.items():
            for t in tensors:
                if t is not None:
                    kinds[kind] += held.pop(t.untyped_storage().data_ptr(), 0)
        kinds["other"] += sum(held.values())
    return kinds


def _memory(rank: int, results: dict, name: str, method: str, density: float, steps: int, options: dict) -> None:
    timed = {}
    for which, opts in (("exact", {}), (method, options)):
        model, loss, state = _registered(name, rank, which, density, opts)
        _backward(model, loss)
        _backward(model, loss)  # lazily sized buffers settle
        times = []
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            _backward(model, loss)
            times.append(time.perf_counter() - start)
        timed[which] = sum(times) / len(times)
    shards = sum(p.to_local().numel() * p.to_local().element_size() for p in model.parameters())
    largest = max(rs.numel for rs in state.modules.values()) * 4
    full = sum(rs.numel for rs in state.modules.values()) * 4
    held = held_by_reducers(state)
    row = {"units": len(state.modules), "parameter_shard_bytes": shards, "gradient_bytes": full,
           "residual_bytes": state.residual_bytes(), "largest_unit_gradient_bytes": largest,
           "held_bytes": held, "held_total_bytes": sum(held.values()),
           "backward_seconds": timed[method], "exact_backward_seconds": timed["exact"],
           "density": state.stats["density"], "bytes_sent": state.stats["bytes_sent"]}
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, row)
    results.update(everyone[0])
    results["held_total_bytes"] = max(r["held_total_bytes"] for r in everyone)  # the largest of any rank


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
    ap.add_argument("--steps", type=int, default=3, help="timed backward passes (after two untimed ones)")
    ap.add_argument("--residual-dtype", default=None, choices=reducers.RESIDUAL_DTYPES)
    ap.add_argument("--keep-buffers", default=None, choices=("true", "false"),
                    help="register_reducer's keep_buffers (its default when left out)")
    args = ap.parse_args()
    options = {} if args.residual_dtype is None else {"residual_dtype": args.residual_dtype}
    if args.keep_buffers is not None:
        options["keep_buffers"] = args.keep_buffers == "true"
    memory = gloo_workers.run(_memory, args.workers, args.model, args.method, args.density, args.steps, options,
                              threads=1)
    out = {"model": args.model, "method": args.method, "density": args.density, "workers": args.workers,
           "options": options, "memory": memory,
           "residual_over_shards": memory["residual_bytes"] / memory["parameter_shard_bytes"],
           "held_over_shards": memory["held_total_bytes"] / memory["parameter_shard_bytes"],
           "selection": selection(args.model, args.density)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
