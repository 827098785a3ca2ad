"""FSDP2's reduce-scatter against sparsecomm's methods as its reduce-scatter, on hosts joined by real links.

bench/ddp_links.py's counterpart for sharded training, with its machinery (the netlab per host
count and rate, one worker per host started with ``ip netns exec``, configurations interleaved
round by round, medians of whole iterations, the bytes each host put on its link per step; see
its docstring). Each model (the MNIST CNN and the PTB LSTM 2 x 200, ddp_links's synthetic
batches) is split as the training loop splits it (``sparsecomm.train.sharded.shard_model``:
:func:`sparsecomm.fsdp.shard_children` over a 1-D mesh of every rank: one FSDP unit per child,
the root's unit holding the rest), once per configuration:

  - ``local``      FSDP with ``set_requires_gradient_sync(False)``: parameters all-gathered as
                   always, gradients not reduced: the floor of the gradient exchange
  - ``fsdp``       FSDP's own reduce-scatter, fp32, per unit during backward
  - ``fsdp-bf16``  ``fully_shard(..., mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.bfloat16))``:
                   the reduce-scatter in bfloat16 (parameters and compute stay fp32)
  - ``METHOD``     ``sparsecomm.fsdp.register_reducer(model, METHOD, density=--density)``: the
                   method as every unit's reduce-scatter (``topk``, ``exdyna``, ``powersgd``
                   (rank 2, its default), ``fp16``, or any other of ``reducers.available()``);
                   its collectives run, blocking, inside FSDP's reduce-scatter call of each unit

A row's ``t_reduce`` is the method's ``t_select + t_comm`` summed over the units (none for
FSDP's own), ``bytes_sent`` what the method says it sent; ``tx_bytes`` the host's link counter.

    .venv/bin/python bench/fsdp_links.py run --hosts 2 --rates 100mbit,1gbit --models mnist_cnn,lstm \\
        --out bench/results/fsdp_links.json
    .venv/bin/python bench/fsdp_links.py table bench/results/fsdp_links.json [--markdown]

Needs root and iproute2 (the netlab); refuses to start while another netlab is up.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ddp_links  # bench/ddp_links.py: the hosts, the timing loop, the driver

CONFIGS = "local,fsdp,fsdp-bf16,topk,exdyna,powersgd,fp16"
BASE = "fsdp"


def _build(model: str, label: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """The sharded model of a configuration and its :class:`FSDPReducerState` (or None)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from sparsecomm import reducers
    from sparsecomm.fsdp import register_reducer, shard_children
    from sparsecomm.models import build_model
    from sparsecomm.train.sharded import shard_model

    name, options = ddp_links.SHAPES[model]
    torch.manual_seed(0)
    net = build_model(name, **options)
    if label == "fsdp-bf16":  # shard_model's units, with a reduce dtype
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        shard_children(net, mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.bfloat16))
    else:
        shard_model(net, torch.device("cpu"), dist.get_world_size())
    state = None
    if label == "local":
        net.set_requires_gradient_sync(False)
    elif label in reducers.available():
        state = register_reducer(net, label, density=args.density)
    elif label not in ("fsdp", "fsdp-bf16"):
        raise ValueError(f"unknown configuration {label!r}")
    return net, state


def summary(times: dict[str, list[float]], state: Any) -> dict:
    """A configuration's medians, with the method's bytes sent per step (its last backward)."""
    row = {k: statistics.median(v) if v else None for k, v in times.items()}
    if state is not None:
        row["bytes_sent"] = state.stat("bytes_sent")
        row["units"] = len(state.modules)
    return row


time_model = functools.partial(ddp_links.time_model, build=_build, summarize=summary)


def markdown(cells: list[dict]) -> str:
    """Per model, host count and rate, one table: iteration ms, backward ms, the method's reduce
    ms, MB this host sent per step and of those the gradient exchange's (beyond ``local``'s, which
    are the parameters' all-gathers), the iteration's ratio to ``fsdp``."""
    lines = []
    for cell in cells:
        rows = cell["rows"]
        base = rows.get(BASE, {}).get("t_iter")
        floor = rows.get("local", {}).get("tx_bytes")
        first = next(iter(rows.values()))
        title = (f"**{cell['model']} ({first.get('params', 0) / 1e6:.2f}M parameters), {cell['hosts']} hosts at "
                 f"{cell['rate']}** (rank 0's medians of {first['steps']} steps)")
        head = ("| configuration | iteration ms | backward ms | reduce ms | MB on the link per step | of which gradients "
                "| / fsdp |")
        lines += [title, "", head, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for label, r in rows.items():
            reduce = "" if r.get("t_reduce") is None else f"{r['t_reduce'] * 1e3:.0f}"
            ratio = "" if not base else f"{r['t_iter'] / base:.2f}"
            grads = "" if floor is None or label == "local" else f"{(r['tx_bytes'] - floor) / 1e6:.3g}"
            lines.append(f"| {label} | {r['t_iter'] * 1e3:.0f} | {r['t_backward'] * 1e3:.0f} | {reduce} | "
                         f"{r['tx_bytes'] / 1e6:.3g} | {grads} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def show(args: argparse.Namespace) -> int:
    import json

    cells = [c for f in args.results for c in json.loads(Path(f).read_text())["cells"]]
    print(markdown(cells) if args.markdown else ddp_links.table(cells, BASE))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True)
    r, _, t = ddp_links.run_verbs(verbs, CONFIGS, "mnist_cnn,lstm", "bench/results/fsdp_links.json")
    r.set_defaults(rates="100mbit,1gbit")
    t.add_argument("--markdown", action="store_true", help="docs/benchmarks.md's tables")
    args = p.parse_args(argv)
    if args.verb == "run":
        return ddp_links.run(args, script=__file__, base=BASE)
    if args.verb == "worker":
        return ddp_links.worker(args, timer=time_model)
    return show(args)


if __name__ == "__main__":
    sys.exit(main())
