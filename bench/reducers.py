"""Benchmark every registered gradient reducer on synthetic gradients shaped like real models.

What it measures, per model x method (rank 0's figures; medians over the timed steps):
  - t_select, t_comm: the reducer's own phase split (r.stats), in ms
  - reduce: wall time of the whole ``r.reduce(grads)`` call, in ms
  - bytes_sent per step (MB), achieved density and local_density, and lambda for threshold methods
and three references measured in the same run, on the same processes, per model:
  - floor: one read pass over the flat gradient (``flat.sum()`` on d contiguous float32 values)
  - ef: the error-feedback compensation ``x = g + m`` alone (reads g and m, writes x: three
    passes), which every error-feedback method pays inside its select time
  - exact: the reduce time of the ``exact`` method (dense all-reduce)
which give the ratios ``t_select / floor`` and ``reduce / exact``.

``--layouts`` says how the gradients are held: ``flat`` (the default, as the training loop holds
them: views of one flat buffer, reduced in place with ``reduce(grads, out=grads)``, so the
reducer reads them where backward wrote them and builds the average there) and/or ``tensors``
(separate tensors, the average written into other preallocated tensors: a flatten copy in, a
copy out; rows named ``method/tensors``). ``--fresh-output`` lets the ``tensors`` form allocate
its result instead. With both layouts each method is measured in both, one after the other, in
the same processes. ``--device cuda`` runs one
process per GPU with NCCL and ``sync_timing=True`` (true device times for the phase split).

Models (shapes only; gradients are ``randn(shape) * grad_scale`` with fixed seeds, generated
before any timing; a few distinct sets per rank are cycled through):
  - resnet18: torchvision ResNet-18, CIFAR variant (3x3 stride-1 stem, no max-pool), 10 classes
  - lstm: 3-layer LSTM LM, 650 hidden, vocabulary 28,869, decoder tied to the embedding

The script spawns ``--workers`` gloo processes on 127.0.0.1 itself. Run from the repository root:

    .venv/bin/python bench/reducers.py                        # all methods, both models
    .venv/bin/python bench/reducers.py --steps 3 --warmup 1 --models resnet18 --methods exact,thresh

It prints a table and writes all figures as JSON to ``--out`` (default bench/results/reducers.json).

``--compare-with PATH`` (PATH: a research repository's folder holding its ``gradient_reducers.py``,
e.g. the ExDyna authors' ``cnn-lstm/``) times their reducers instead, each beside our method of
the same algorithm, alternating step by step on the same gradients in the same processes, and
prints theirs / ours per method with the phase split (see bench/research_code.py):

    .venv/bin/python bench/reducers.py --compare-with /tmp/research/exdyna --models resnet18
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sparsecomm import reducers

import gloo_workers  # bench/gloo_workers.py: the process harness
import results_files  # bench/results_files.py: earlier results are set aside
import wire_formats as wire  # bench/wire_formats.py: the sparse methods' wire formats

MODELS = ("resnet18", "lstm", "tiny")  # tiny: 3 tensors, 1,300 values, for tests of the harness
LSTM_VOCAB, LSTM_HIDDEN, LSTM_LAYERS = 28_869, 650, 3


def model_shapes(name: str) -> list[tuple[int, ...]]:
    """Parameter shapes of the model, in ``parameters()`` order."""
    if name == "resnet18":
        import torchvision
        from torch import nn
        m = torchvision.models.resnet18(num_classes=10)
        m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        m.maxpool = nn.Identity()
        return [tuple(p.shape) for p in m.parameters()]
    if name == "lstm":
        shapes = [(LSTM_VOCAB, LSTM_HIDDEN)]  # embedding (the decoder weight is tied to it)
        for _ in range(LSTM_LAYERS):  # nn.LSTM(650, 650, num_layers=3): weight_ih, weight_hh, bias_ih, bias_hh
            shapes += [(4 * LSTM_HIDDEN, LSTM_HIDDEN), (4 * LSTM_HIDDEN, LSTM_HIDDEN), (4 * LSTM_HIDDEN,), (4 * LSTM_HIDDEN,)]
        return shapes + [(LSTM_VOCAB,)]  # decoder bias
    if name == "tiny":
        return [(20, 50), (100,), (10, 20)]
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def grad_scale_arg(text: str) -> float | str:
    return "auto" if text == "auto" else float(text)


def auto_scale(d: int, density: float) -> float:
    """sigma such that a N(0, sigma^2) coordinate passes the default hard threshold
    1/(2 sqrt(k)) with probability ``density`` (so thresh's first step sends about k)."""
    from sparsecomm.reducers.select.primitives import initial_threshold, target_count
    z = statistics.NormalDist().inv_cdf(1 - density / 2)
    return initial_threshold(target_count(density, d)) / z


def make_grads(shapes, rank: int, sets: int, scale: float, seed: int) -> list[list[torch.Tensor]]:
    out = []
    for s in range(sets):
        g = torch.Generator().manual_seed(seed + 1000 * rank + s)
        out.append([torch.randn(shape, generator=g) * scale for shape in shapes])
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_median(fn, reps: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_floor(grads: list[torch.Tensor], reps: int) -> float:
    """Median seconds of one read pass (a sum) over the flat, contiguous gradient vector."""
    flat = torch.cat([g.reshape(-1) for g in grads]).contiguous()
    return time_median(flat.sum, reps, flat.device)


def time_ef(grads: list[torch.Tensor], reps: int) -> float:
    """Median seconds of the error-feedback compensation x = g + m, tensor by tensor into one
    flat buffer, as the reducers do it."""
    d = sum(g.numel() for g in grads)
    m = torch.zeros(d, device=grads[0].device)
    x = torch.empty_like(m)
    bounds, at = [], 0
    for g in grads:
        bounds.append((at, at + g.numel()))
        at += g.numel()

    def compensate():
        for (a, b), g in zip(bounds, grads):
            torch.add(m[a:b], g.reshape(-1), out=x[a:b])
    return time_median(compensate, reps, m.device)


def bench_method(name: str, grad_sets, args, layout: str = "flat", selection: str | None = None) -> dict:
    wire_options = wire.options_for(name, getattr(args, "wire", None) or {})
    r = reducers.build(name, density=args.density, error_feedback=args.error_feedback, seed=args.seed,
                       sync_timing=args.device == "cuda", **wire_options,
                       **({} if selection is None else {"selection": selection}))
    if layout == "flat":  # views of one buffer, refilled (untimed) as backward would, reduced in place
        flat = torch.empty(sum(g.numel() for g in grad_sets[0]), device=grad_sets[0][0].device)
        views = reducers.Layout.of(grad_sets[0]).split(flat)
    else:
        out = None if args.fresh_output else [torch.empty_like(g) for g in grad_sets[0]]
    rows = {"t_select": [], "t_comm": [], "t_reduce": [], "bytes_sent": [], "bytes_wire": [],
            "density": [], "local_density": [], "threshold": [], "wire_floor_bytes": []}
    for step in range(args.warmup + args.steps):
        grads = grad_sets[step % len(grad_sets)]
        if layout == "flat":
            torch._foreach_copy_(views, grads)
            grads = out = views
        sync(grads[0].device)
        dist.barrier()  # untimed: every rank starts the step together
        t0 = time.perf_counter()
        r.reduce(grads, out=out)
        sync(grads[0].device)
        elapsed = time.perf_counter() - t0
        if step < args.warmup:
            continue
        st = r.stats
        rows["t_reduce"].append(elapsed)
        for key in ("t_select", "t_comm", "bytes_sent", "bytes_wire", "density", "local_density", "wire_floor_bytes"):
            rows[key].append(st.get(key))
        rows["threshold"].append(st.get("threshold"))
    res = {key: median(vals) for key, vals in rows.items()}
    res["wire"] = wire.label(wire_options)
    res["per_step"] = rows
    return res


def worker(rank: int, results: dict, args) -> None:
    """One rank's part of the benchmark (run by gloo_workers.run); fills ``results`` per model."""
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    research = None
    if args.compare_with:
        import research_code
        research = research_code.load(args.compare_with)
    for model in args.models:
        shapes = model_shapes(model)
        d = sum(numel(s) for s in shapes)
        scale = auto_scale(d, args.density) if args.grad_scale == "auto" else args.grad_scale
        grad_sets = [[g.to(device) for g in gs] for gs in make_grads(shapes, rank, args.grad_sets, scale, args.seed)]
        entry = {"tensors": len(shapes), "numel": d, "grad_scale": scale, "methods": {}}
        dist.barrier()
        if research is not None:
            if rank == 0:
                print(f"[{model}] research code beside ours:", flush=True)
            entry["compare"] = research_code.compare_model(research, grad_sets, args, device,
                                                           log=lambda s: print(s, flush=True))
            results[model] = entry
            del grad_sets
            continue
        entry["floor_s"] = time_floor(grad_sets[0], args.floor_reps)
        entry["ef_s"] = time_ef(grad_sets[0], args.floor_reps)
        # `exact` is the reference: always measured, first.
        for name in ["exact"] + [m for m in args.methods if m != "exact"]:
            for layout, selection in [(lay, s) for lay in args.layouts for s in selections_of(name, args)]:
                row = (name if layout == "flat" else f"{name}/{layout}") + (f":{selection}" if selection else "")
                if rank == 0:
                    print(f"[{model}] {row} ...", flush=True)
                try:
                    entry["methods"][row] = bench_method(name, grad_sets, args, layout, selection)
                except Exception:  # reducers raise on every rank alike; record and go on
                    entry["methods"][row] = {"error": traceback.format_exc()}
                    if rank == 0:
                        print(entry["methods"][row]["error"], file=sys.stderr, flush=True)
        reference = "exact" if "flat" in args.layouts else "exact/tensors"
        entry["exact_s"] = entry["methods"][reference].get("t_reduce")
        if "exact" not in args.methods:
            entry["exact_reference"] = entry["methods"][reference]
            for layout in args.layouts:
                entry["methods"].pop("exact" if layout == "flat" else f"exact/{layout}")
        results[model] = entry
        del grad_sets


def fmt(x, spec: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def table(results: dict, methods: list[str]) -> str:
    head = (f"{'model':<9} {'method':<16} {'select ms':>10} {'comm ms':>9} {'reduce ms':>10} {'MB sent':>9} "
            f"{'density':>9} {'local':>9} {'lambda':>9} {'sel/floor':>10} {'red/exact':>10}")
    lines = [head, "-" * len(head)]
    for model, e in results.items():
        lines.append(f"{model}: {e['tensors']} tensors, d = {e['numel']:,}; floor (one read pass) "
                     f"{e['floor_s'] * 1e3:.3f} ms; ef x = g + m {e['ef_s'] * 1e3:.3f} ms; "
                     f"exact reduce {fmt(e['exact_s'], '.2f', 1e3)} ms; "
                     f"grads randn * {e['grad_scale']:.3g}")
        for name in [row for m in methods for row in e["methods"] if row.split("/")[0].split(":")[0] == m]:
            m = e["methods"].get(name)
            if m is None:
                continue
            if "error" in m:
                lines.append(f"{model:<9} {name:<16} ERROR: {m['error'].strip().splitlines()[-1]}")
                continue
            lines.append(
                f"{model:<9} {name:<16} {fmt(m['t_select'], '10.2f', 1e3)} {fmt(m['t_comm'], '9.2f', 1e3)} "
                f"{fmt(m['t_reduce'], '10.2f', 1e3)} {fmt(m['bytes_sent'], '9.3f', 1e-6)} "
                f"{fmt(m['density'], '9.5f')} {fmt(m['local_density'], '9.5f')} {fmt(m['threshold'], '9.2e')} "
                f"{fmt(m.get('select_over_floor'), '10.1f')} {fmt(m.get('reduce_over_exact'), '10.3f')}")
    return "\n".join(lines)


def selections_of(name: str, args) -> list[str | None]:
    """The ``selection`` values to measure ``name`` with (``[None]``: it has no such option)."""
    return args.selections if "selection" in reducers.method_options(name) else [None]


def selection_summary(results: dict) -> str:
    """Per model and method measured with both selections: select time (error
    feedback, finiteness check, selection, residual commit) in read passes, torch against
    fused, and the reduce against the dense all-reduce (``exact``)."""
    lines = []
    for model, e in results.items():
        if "floor_s" not in e:
            continue
        for row, m in e["methods"].items():
            name, _, selection = row.partition(":")
            fused = e["methods"].get(f"{name}:fused", {})
            if selection != "torch" or "error" in m or "error" in fused or not fused:
                continue
            lines.append(f"{model:<9} {name:<12} select+EF read passes: torch {m['select_over_floor']:5.2f}, "
                         f"fused {fused['select_over_floor']:5.2f} ({m['t_select'] / fused['t_select']:.2f}x); "
                         f"reduce / exact: torch {m['reduce_over_exact']:.3f}, fused {fused['reduce_over_exact']:.3f}")
    if not lines:
        return ""
    return "selection paths (one read pass = the floor above; goals: fused select+EF <= 1.5 for the threshold " \
           "methods, <= 2.5 for topk and global_topk; exdyna reduce <= 0.4 x exact)\n" + "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=None,
                   help="comma-separated method names (default: all; with --compare-with: all of theirs that "
                        "have a counterpart here, named by our method or their class)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: resnet18,lstm")
    p.add_argument("--workers", type=int, default=None, help="processes on this machine (default 2 on CPU)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--density", type=float, default=0.001)
    p.add_argument("--error-feedback", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--warmup", type=int, default=2, help="untimed reduces per method and model")
    p.add_argument("--steps", type=int, default=10, help="timed reduces per method and model")
    p.add_argument("--grad-sets", type=int, default=3, help="distinct pre-generated gradient sets per rank")
    p.add_argument("--grad-scale", type=grad_scale_arg, default="auto",
                   help="gradients are randn * this; 'auto': per model, so that P(|g| >= 1/(2 sqrt(k))) = density")
    p.add_argument("--floor-reps", type=int, default=20, help="repetitions of the floor measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: one process per GPU (--workers defaults to the GPU count), NCCL, synchronised timing")
    p.add_argument("--layouts", default="flat",
                   help="comma-separated: flat (views of one buffer, reduced in place; the training loop's form), "
                        "tensors (separate tensors copied in and out)")
    p.add_argument("--fresh-output", action="store_true",
                   help="with --layouts tensors: let reduce() allocate its result instead of writing into "
                        "preallocated tensors")
    p.add_argument("--compare-with", default=None, metavar="PATH",
                   help="a research repository's folder holding its gradient_reducers.py: time its reducers "
                        "beside ours (interleaved, same gradients) and print theirs/ours per method")
    p.add_argument("--wire", type=wire.parse_wire, default={}, metavar="values=V,indices=I",
                   help="wire format of the sparse methods that take one (values: full, fp16, bf16; indices: "
                        "int32, bitmap, delta, auto); a second table gives bytes sent against the information floor")
    p.add_argument("--selections", default="auto",
                   help="comma-separated selection paths (auto, torch, fused) to measure each method that has a "
                        "selection option with (exdyna, micro, thresh, sage, topk, global_topk); rows name:path, and "
                        "a summary of select+EF read passes per path")
    p.add_argument("--out", default="bench/results/reducers.json")
    args = p.parse_args()
    if args.workers is None:
        args.workers = torch.cuda.device_count() if args.device == "cuda" else 2
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    research_commit = None
    args.compare_methods = None
    if args.compare_with:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import research_code
        try:
            module = research_code.load(args.compare_with)
        except research_code.ResearchCodeError as e:
            p.exit(2, f"{p.prog}: error: {e}\n")
        args.compare_methods = [m for m in args.methods.split(",") if m] if args.methods else None
        chosen, skipped = research_code.pairs(module, args.compare_methods)
        if not chosen:
            p.exit(2, f"{p.prog}: error: --compare-with {args.compare_with}: no reducer class there that has a "
                      f"counterpart here{' among --methods' if args.methods else ''} "
                      f"(known: {', '.join(research_code.MAPPING)})\n")
        del module
        research_commit = research_code.commit_of(args.compare_with)
        args.methods = None
    args.methods = [m for m in (args.methods or ",".join(reducers.available())).split(",") if m]
    args.selections = [s for s in args.selections.split(",") if s]
    if not args.selections or any(s not in ("auto", "torch", "fused") for s in args.selections):
        p.error(f"--selections must name auto, torch and/or fused, got {','.join(args.selections)!r}")
    if args.selections == ["auto"]:
        args.selections = [None]  # the methods' default, rows named as before
    args.models = [m for m in args.models.split(",") if m]
    args.layouts = [m for m in args.layouts.split(",") if m]
    if not args.layouts or any(m not in ("flat", "tensors") for m in args.layouts):
        p.error(f"--layouts must name flat and/or tensors, got {','.join(args.layouts)!r}")
    for m in args.methods:
        reducers.lookup(m)  # fail early on a typo
    for m in args.models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")

    started = datetime.datetime.now().astimezone()
    try:
        results = gloo_workers.run(worker, args.workers, args, threads=args.threads,
                                   backend="nccl" if args.device == "cuda" else "gloo")
    except mp.ProcessExitedException as e:
        p.exit(1, f"{p.prog}: error: a worker stopped ({e}); see its message above\n")

    for e in results.values():
        if "floor_s" not in e:
            continue
        for m in list(e["methods"].values()) + [e.get("exact_reference", {})]:
            if "error" in m or not m:
                continue
            sel, red = m.get("t_select"), m.get("t_reduce")
            m["select_over_floor"] = sel / e["floor_s"] if sel is not None and e["floor_s"] else None
            m["reduce_over_exact"] = red / e["exact_s"] if red is not None and e["exact_s"] else None

    if args.compare_with:
        import research_code
        report = research_code.table(results, os.path.abspath(args.compare_with), research_commit)
    else:
        report = table(results, args.methods)
    if any(m.get("wire_floor_bytes") is not None for e in results.values() for m in e.get("methods", {}).values()):
        report += "\n\n" + wire.table(results, "bytes per step against the information floor (bench/wire.py):")
    print()
    print(report)
    summary = selection_summary(results)
    if summary:
        print("\n" + summary)
    meta = {
        "command": " ".join([sys.executable] + sys.argv),
        "date": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.datetime.now().astimezone() - started).total_seconds(), 1),
        "torch": torch.__version__,
        "workers": args.workers,
        "threads": args.threads,
        "machine": {"processor": platform.processor(), "machine": platform.machine(),
                    "platform": platform.platform(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "units": "seconds and bytes; medians over timed steps on rank 0 (per_step holds every step)",
    }
    if args.compare_with:
        meta["research_code"] = {"path": os.path.abspath(args.compare_with), "commit": research_commit}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results_files.keep_earlier(args.out)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
