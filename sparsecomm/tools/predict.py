"""Predicted iteration time of methods on clusters we do not have (``python -m sparsecomm predict``).

    python -m sparsecomm predict --preset resnet20-cifar10 --workers 8,64,256 \\
        --bandwidth 10gbit,100gbit --reducers exact,exdyna,topk,powersgd

For each worker count P the preset's model computes P workers' gradients on real batches
(P shards of the data, the preset's per-worker batch; the model at initialisation), and every
method runs on P virtual workers fed them (:func:`sparsecomm.tools.costmodel.profile`): its
collectives, selected counts and selection time. The collectives are priced with the fitted
links (``--links``, from ``bench/network.py fit``) at each ``--bandwidth``; forward and backward
are timed here, or taken with the selection times from ``--device`` (a JSON file of another
device's figures, e.g. ``bench/devices/v100-sage-logs.json``). A method reduces the whole model
after backward or bucket by bucket during it (``--scope``; ``auto``, as the training loop: by
bucket where the method's result on a tensor depends on that tensor alone, so ``exact`` is DDP's
overlapped all-reduce); by bucket, each bucket starts when backward has made its gradients (the
shares of backward measured here with post-accumulate-grad hooks) and what backward hides is
not paid (:func:`sparsecomm.tools.costmodel.overlapped_step_seconds`). PyTorch's own hooks
``torch-fp16``, ``torch-bf16`` and ``torch-powersgd`` can be predicted beside the methods.
Prints iteration time, its parts, the share of the reduce hidden behind backward, speedup over
``exact`` and bytes per worker; ``--out`` writes them as JSON. See docs/benchmarks.md for how well it predicted measured steps.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import reducers
from ..reducers.buckets import DEFAULT_BUCKET_MB, SCOPES
from . import costmodel
from ..commandline import OneLineParser
from ..units import duration, si
from ..config import load_config
from ..launch.job import Job
from .netlab import parse_rate
from ..tasks import build_task
from ..train.presets import available_presets, find_preset
from ..train.workers import available_memory, bound_allocator_if_tight, fits_in_memory, memory_estimate

log = logging.getLogger("sparsecomm.tools.predict")

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_LINKS = ROOT / "bench" / "links.json"


def load_task(cfg: Any) -> Any:
    """The preset's task with its data loaded, once; every worker count uses views of it."""
    return build_task(cfg, Job(rank=0, world=1, local_rank=0, device=torch.device("cpu")))


@dataclass
class Compute:
    """One worker's forward and backward seconds, and ``ready[i]``: the share of backward done
    when parameter i's gradient exists (measured with post-accumulate-grad hooks)."""

    forward: float
    backward: float
    ready: list[float]

    def scaled_to(self, total: float) -> "Compute":
        """The same split and ready shares for a forward and backward of ``total`` seconds."""
        f = self.forward / (self.forward + self.backward)
        return Compute(total * f, total * (1 - f), self.ready)


def worker_gradients(task: Any, seed: int, workers: int,
                     repeats: int = 3) -> tuple[list[torch.Tensor], list[torch.Size], Compute]:
    """P workers' flat gradients of the task's model (initialised from ``seed``) on their first
    batches, the parameter shapes, and worker 0's mean forward and backward seconds and the
    share of backward done when each parameter's gradient exists (after a warm-up)."""
    torch.manual_seed(seed)
    model = task.build_model()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    flat = reducers.bind_flat_gradients(params)
    clock = costmodel.BackwardClock(params)
    grads, forward, backward, ready = [], [], [], []
    try:
        for r in range(workers):
            view = task.worker(r, workers)
            batch = next(iter(view.batches(0, 0)))
            for i in range(1 if r else repeats + 1):  # worker 0's batch also times forward and backward
                flat.zero_()
                t0 = time.perf_counter()
                loss = view.loss(model, batch)
                t1 = time.perf_counter()
                seconds, shares = clock.backward(loss)
                if r == 0 and i:
                    forward.append(t1 - t0)
                    backward.append(seconds)
                    ready.append(shares)
            grads.append(flat.clone())
    finally:
        clock.close()
    share = [sum(col) / len(col) for col in zip(*ready)]
    return grads, [p.shape for p in params], Compute(sum(forward) / len(forward), sum(backward) / len(backward), share)


def predict(cfg: Any, task: Any, workers: Sequence[int], rates: Sequence[str], methods: Sequence[str],
            links: costmodel.Links, density: float | None = None, device: dict[str, Any] | None = None,
            steps: int = 3, scope: str = "auto", bucket_mb: float = DEFAULT_BUCKET_MB) -> list[dict[str, Any]]:
    """One row per (P, rate, method) for preset ``cfg`` and its loaded ``task``: the predicted
    step and its parts, in seconds. A method runs in ``scope`` (``auto``: bucket by bucket where
    its result on a tensor depends on that tensor alone); PyTorch's hooks
    (:data:`~sparsecomm.tools.costmodel.TORCH_HOOKS`) always by bucket."""
    preset = cfg.preset
    c = cfg.reducer.density if density is None else density
    rows = []
    first: Compute | None = None
    for n, P in enumerate(workers, 1):
        started = time.perf_counter()
        grads, shapes, compute = worker_gradients(task, cfg.seed, P)
        # one worker's forward and backward do not depend on P: the first timing serves every
        # worker count (timed again, a loaded machine made P = 8, 64, 256 differ by 2.5x)
        compute = first = first or compute
        # Each worker count takes a while (P forward and backward passes, then every method on P
        # virtual workers): say where it is, so that a long silence is not taken for a hang.
        log.info("P=%d (%d of %d): %d workers' gradients in %s", P, n, len(workers), P,
                 duration(time.perf_counter() - started))
        given = None if device is None else device["presets"][preset]
        if given is not None:
            compute = compute.scaled_to(given["compute_ms"] / 1e3)
        for method in methods:
            started = time.perf_counter()
            priced = costmodel.price_method(method, grads, shapes, compute.ready, c, scope, bucket_mb, steps=steps,
                                            seed=cfg.seed)
            ran = costmodel.TORCH_HOOKS.get(method, method)
            select = None if given is None else given["select_ms"].get(ran, 0.0) / 1e3
            log.info("P=%d: %s on %d virtual workers, %d steps in %s", P, method, P, steps,
                     duration(time.perf_counter() - started))
            prof = priced.profile
            for rate in rates:
                t = priced.seconds(compute.forward, compute.backward, links, parse_rate(rate) or 0.0, select=select)
                rows.append({"preset": preset, "workers": P, "rate": rate, "method": method, "scope": priced.scope,
                             "density": prof.density, "bytes_sent": prof.bytes_sent, "bytes_wire": prof.bytes_wire,
                             **t})
        del grads
    for row in rows:
        dense = next((r for r in rows if r["method"] == "exact" and r["workers"] == row["workers"]
                      and r["rate"] == row["rate"]), None)
        row["speedup"] = dense["step"] / row["step"] if dense else None
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'P':>5} {'rate':>8} {'method':<14} {'scope':<6} {'density':>8} {'compute ms':>10} {'select ms':>9} "
             f"{'comm ms':>9} {'hidden':>6} {'step ms':>9} {'speedup':>7} {'sent/worker':>11}"]
    for r in rows:
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"{r['workers']:>5} {r['rate']:>8} {r['method']:<14} {r['scope']:<6} {r['density']:>8.4g} "
                     f"{r['compute'] * 1e3:>10.2f} {r['select'] * 1e3:>9.2f} {r['comm'] * 1e3:>9.2f} "
                     f"{r['hidden']:>6.0%} "
                     f"{r['step'] * 1e3:>9.2f} {speedup:>7} {si(r['bytes_sent'], 'B'):>11}")
    return "\n".join(lines)


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ValueError(f"--workers takes positive integers separated by commas (8,64,256), got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m sparsecomm predict", description=__doc__)
    p.add_argument("--preset", required=True)
    p.add_argument("--workers", default="8,64,256")
    p.add_argument("--bandwidth", default="10gbit,100gbit", help="link rates: 100mbit, 10gbit, 1.5gbit, ...")
    p.add_argument("--reducers", default="exact,exdyna,topk,powersgd",
                   help=f"methods, and PyTorch's hooks: {', '.join(costmodel.TORCH_HOOKS)}")
    p.add_argument("--scope", default="auto", help=f"{'|'.join(SCOPES)}: the methods' scope (auto: bucket by bucket "
                   "where the method allows, as the training loop does; PyTorch's hooks always by bucket)")
    p.add_argument("--bucket-mb", type=float, default=DEFAULT_BUCKET_MB, help="bucket size, as DDP's bucket_cap_mb")
    p.add_argument("--density", type=float, default=None, help="default: the preset's")
    p.add_argument("--links", default=str(DEFAULT_LINKS), help="fitted link parameters (bench/network.py fit)")
    p.add_argument("--alpha", type=float, default=None, help="seconds per round instead of the fitted one")
    p.add_argument("--gamma", type=float, default=None,
                   help="seconds per byte the hosts spend whatever the rate, instead of the fitted one (0: none)")
    p.add_argument("--device", default=None, help="JSON of another device's compute and selection times")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--steps", type=int, default=3, help="reduce steps profiled per method (the first not counted)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a preset setting to change")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.preset not in available_presets():
            raise ValueError(f"unknown preset {args.preset!r}; known: {', '.join(available_presets())}")
        workers = _positive_ints(args.workers)
        rates = [r for r in args.bandwidth.split(",")]
        for rate in rates:
            if parse_rate(rate) is None:
                raise ValueError("--bandwidth needs finite rates (100mbit, 10gbit), not 'unlimited'")
        methods = args.reducers.split(",")
        for m in methods:
            if m not in reducers.available() and m not in costmodel.TORCH_HOOKS:
                raise ValueError(f"unknown reducer {m!r}; registered: {', '.join(reducers.available())}; "
                                 f"PyTorch's hooks: {', '.join(costmodel.TORCH_HOOKS)}")
        if args.scope not in SCOPES:
            raise ValueError(f"--scope must be one of {', '.join(SCOPES)}, got {args.scope!r}")
        if not args.bucket_mb > 0:
            raise ValueError(f"--bucket-mb must be a positive number of MB, got {args.bucket_mb}")
        if args.density is not None and not 0 < args.density <= 1:
            raise ValueError(f"--density must be in (0, 1], got {args.density}")
        if args.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}")
        if not Path(args.links).is_file():
            raise ValueError(f"no fitted links at {args.links}: run bench/network.py run and fit, or pass --links")
        links = costmodel.Links.load(args.links)  # ValueError names a file that is not one
        for name in ("alpha", "gamma"):
            value = getattr(args, name)
            if value is not None and not value >= 0:
                raise ValueError(f"--{name} must be a number of seconds >= 0, got {value}")
        if args.alpha is not None or args.gamma is not None:
            links = links.replaced(alpha=args.alpha, gamma=args.gamma)
        device = None
        if args.device is not None:
            device = json.loads(Path(args.device).read_text())
            if args.preset not in device.get("presets", {}):
                raise ValueError(f"{args.device} has no compute time for preset {args.preset!r}; it has: "
                                 f"{', '.join(device.get('presets', {})) or 'none'}")
            has = device["presets"][args.preset].get("select_ms", {})
            ran = [costmodel.TORCH_HOOKS.get(m, m) for m in methods]
            missing = [m for m, r in zip(methods, ran) if r != "exact" and r not in has]
            if missing:
                raise ValueError(f"{args.device} has no selection time for {', '.join(missing)} on "
                                 f"{args.preset}; it has: {', '.join(has) or 'none'}")
        cfg = load_config(find_preset(args.preset), [f"data.dir={args.data_dir}", *args.set],
                          preset_name=args.preset)
        task = load_task(cfg)
        _check_memory(cfg, task, workers, methods, args.density)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for kind, c in (("all-reduce", links.all_reduce), ("all-gather", links.all_gather)):
        log.info("%s: alpha %.3g ms per round, %.0f%% of the rate, %.3g ns per byte on the hosts", kind,
                 c.alpha * 1e3, 100 * c.efficiency, c.gamma * 1e9)
    log.info("(fitted on %s)", links.fitted_on or "?")
    rows = predict(cfg, task, workers, rates, methods, links, args.density, device, args.steps, args.scope,
                   args.bucket_mb)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


def _check_memory(cfg: Any, task: Any, workers: list[int], methods: list[str], density: float | None) -> None:
    """P workers' gradients and reducers must fit; one line otherwise."""
    model = task.build_model()
    grads = [torch.zeros_like(q) for q in model.parameters() if q.requires_grad]
    c = cfg.reducer.density if density is None else density
    have = available_memory(torch.device("cpu"))
    for m in dict.fromkeys(costmodel.TORCH_HOOKS.get(m, m) for m in methods):
        need = memory_estimate(grads, lambda g: reducers.build(m, density=c, group=g), max(workers))
        if not fits_in_memory(need, have, 0.8):
            raise ValueError(f"{max(workers)} virtual workers of {m} on {cfg.model} need about {need / 1e9:.1f} GB; "
                             f"{have / 1e9:.1f} GB of memory is available: predict fewer workers")
        bound_allocator_if_tight(need, have, torch.device("cpu"), 0.8)


if __name__ == "__main__":
    sys.exit(main())
