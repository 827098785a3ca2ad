"""Bytes per step of the sparse methods' wire formats against the information floor.

The floor of one worker's step is log2 C(span, k) bits for the set of k positions it selected
(span: the positions it may select from, d or its partition) plus the bits of the values it
hands over (k values for sparse gather-sum, the |union| values for union all-reduce), at the
width they travel in (32 or 16 bits); reducers report it as ``wire_floor_bytes``
(sparsecomm/reducers/comm/wire.py). ``bytes_sent`` (everything handed to collectives, handshake
and padding included) over that floor is the ratio reported here.

bench/reducers.py prints this table under its own for one format (``--wire values=fp16,indices=delta``).
Run alone, this script sweeps formats x densities x methods on the same synthetic gradients
(bench/reducers.py's models and gradient recipe):

    .venv/bin/python bench/wire.py --models resnet18 --densities 0.001,0.01
    .venv/bin/python bench/wire.py --codec          # encode/decode times of the position codes alone

and prints one table per model and density, and writes all figures as JSON to ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any

import torch

from sparsecomm import reducers
from sparsecomm.reducers.comm.wire import INDEX_FORMATS, VALUE_FORMATS, WireFormat

import gloo_workers  # bench/gloo_workers.py: the process harness
import results_files  # bench/results_files.py: earlier results are set aside
from wire_formats import label, table  # bench/wire_formats.py: the wire options and their table

METHODS = ("topk", "global_topk", "exdyna", "sage", "micro")


def formats(values: list[str], indices: list[str]) -> list[dict[str, str]]:
    return [{"values": v, "indices": i} for v in values for i in indices]


def codec_times(d: int = 11_173_962, densities=(0.001, 0.01), reps: int = 7) -> str:
    """Median encode and decode times of one worker's positions (k = c d uniform random
    positions below d), in this process, one thread: the CPU cost of a format, without the
    noise of a whole reduce."""
    import time

    from sparsecomm.reducers.comm.wire import decode_positions, encode_positions
    torch.set_num_threads(1)
    lines = [f"{'c':>6} {'k':>8} {'format':<7} {'encode ms':>10} {'decode ms':>10} {'bytes':>10}"]
    gen = torch.Generator().manual_seed(0)
    for c in densities:
        k = max(1, int(c * d))
        pos = torch.sort(torch.randperm(d, generator=gen)[:k]).values
        for kind in ("delta", "bitmap"):
            enc, dec = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                data = encode_positions(pos, kind, k, d)
                t1 = time.perf_counter()
                back = decode_positions(data, k, kind, k, d)
                dec.append(time.perf_counter() - t1)
                enc.append(t1 - t0)
            assert torch.equal(back, pos)
            lines.append(f"{c:>6g} {k:>8} {kind:<7} {sorted(enc)[reps // 2] * 1e3:>10.2f} "
                         f"{sorted(dec)[reps // 2] * 1e3:>10.2f} {data.numel():>10,}")
    return "\n".join(lines)


def worker(rank: int, results: dict[str, Any], args) -> None:
    """One rank's part (run by gloo_workers.run): every model, density, format and method."""
    import reducers as bench  # bench/reducers.py: models, gradients, bench_method

    for model in args.models:
        shapes = bench.model_shapes(model)
        d = sum(bench.numel(s) for s in shapes)
        for density in args.densities:
            scale = bench.auto_scale(d, density)
            grads = bench.make_grads(shapes, rank, args.grad_sets, scale, args.seed)
            key = f"{model} c={density:g}"
            entry = results[key] = {"numel": d, "density": density, "methods": {}}
            for wire in formats(args.values, args.indices):
                args.density, args.wire = density, wire
                for name in args.methods:
                    row = f"{name} {label(wire)}"
                    if rank == 0:
                        print(f"[{key}] {row} ...", flush=True)
                    res = bench.bench_method(name, grads, args)
                    res.pop("per_step", None)
                    res["wire"], res["method"] = label(wire), name
                    entry["methods"][row] = res
            del grads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--models", default="resnet18")
    p.add_argument("--densities", default="0.001,0.01")
    p.add_argument("--values", default=",".join(VALUE_FORMATS))
    p.add_argument("--indices", default=",".join(INDEX_FORMATS))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--grad-sets", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--codec", action="store_true",
                   help="only time encoding and decoding of positions (delta, bitmap) at d = ResNet-18's, "
                        "in this process, at each of --densities")
    p.add_argument("--out", default="bench/results/wire.json")
    args = p.parse_args()
    if args.codec:
        print(codec_times(densities=[float(c) for c in args.densities.split(",") if c]))
        return
    args.methods = [m for m in args.methods.split(",") if m]
    args.models = [m for m in args.models.split(",") if m]
    args.densities = [float(c) for c in args.densities.split(",") if c]
    args.values = [v for v in args.values.split(",") if v]
    args.indices = [i for i in args.indices.split(",") if i]
    for v in args.values:
        for i in args.indices:
            try:
                WireFormat(v, i)
            except ValueError as e:
                p.error(str(e))
    for m in args.methods:
        if "values" not in reducers.method_options(m):
            p.error(f"{m} has no wire format options")
    args.device, args.fresh_output = "cpu", False
    started = datetime.datetime.now().astimezone()
    results = gloo_workers.run(worker, args.workers, args, threads=args.threads)
    for key, e in results.items():
        print()
        print(table({key: e}, f"{key}: d = {e['numel']:,}, {args.workers} workers"))
    meta = {"command": " ".join([sys.executable] + sys.argv), "date": started.isoformat(timespec="seconds"),
            "torch": torch.__version__, "workers": args.workers,
            "settings": {k: v for k, v in vars(args).items() if k != "out"},
            "units": "bytes per step and worker, medians over timed steps on rank 0"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results_files.keep_earlier(args.out)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
