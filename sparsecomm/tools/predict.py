"""Predicted iteration time of methods on clusters we do not have (``python -m sparsecomm predict``).

    python -m sparsecomm predict --preset resnet20-cifar10 --workers 8,64,256 \\
        --bandwidth 10gbit,100gbit --reducers exact,exdyna,topk,powersgd

For each worker count P the preset's model computes P workers' gradients on real batches
(P shards of the data, the preset's per-worker batch; the model at initialisation), and every
method runs on P virtual workers fed them (:func:`sparsecomm.tools.costmodel.profile`): its
collectives, selected counts and selection time. The collectives are priced with the fitted
links (``--links``, from ``bench/network.py fit``) at each ``--bandwidth``; forward and backward
are timed here, or taken with the selection times from ``--device`` (a JSON file of another
device's figures, e.g. ``bench/devices/v100-sage-logs.json``). Prints iteration time, its
parts, speedup over ``exact`` (the dense all-reduce) and bytes per worker; ``--out`` writes them
as JSON. See docs/benchmarks.md for how well it predicted measured steps.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import reducers
from . import costmodel
from ..commandline import OneLineParser
from ..units import si
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


def worker_gradients(task: Any, seed: int, workers: int,
                     repeats: int = 3) -> tuple[list[torch.Tensor], list[torch.Size], float]:
    """P workers' flat gradients of the task's model (initialised from ``seed``) on their first
    batches, the parameter shapes, and the mean seconds of one worker's forward and backward
    (after a warm-up)."""
    torch.manual_seed(seed)
    model = task.build_model()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    flat = reducers.bind_flat_gradients(params)
    grads, times = [], []
    for r in range(workers):
        view = task.worker(r, workers)
        batch = next(iter(view.batches(0, 0)))
        for i in range(1 if r else repeats + 1):  # worker 0's batch also times forward and backward
            flat.zero_()
            t0 = time.perf_counter()
            view.loss(model, batch).backward()
            if r == 0 and i:
                times.append(time.perf_counter() - t0)
        grads.append(flat.clone())
    return grads, [p.shape for p in params], sum(times) / len(times)


def predict(cfg: Any, task: Any, workers: Sequence[int], rates: Sequence[str], methods: Sequence[str],
            links: costmodel.Links, density: float | None = None, device: dict[str, Any] | None = None,
            steps: int = 3) -> list[dict[str, Any]]:
    """One row per (P, rate, method) for preset ``cfg`` and its loaded ``task``: the predicted
    step and its parts, in seconds."""
    preset = cfg.preset
    c = cfg.reducer.density if density is None else density
    rows = []
    for P in workers:
        grads, shapes, compute = worker_gradients(task, cfg.seed, P)
        given = None if device is None else device["presets"][preset]
        if given is not None:
            compute = given["compute_ms"] / 1e3
        for method in methods:
            prof = costmodel.profile(method, grads, shapes, 1.0 if method == "exact" else c, steps=steps,
                                     seed=cfg.seed)
            select = None if given is None else given["select_ms"].get(method, 0.0) / 1e3
            for rate in rates:
                t = costmodel.step_seconds(compute, prof, links, parse_rate(rate) or 0.0, select=select)
                rows.append({"preset": preset, "workers": P, "rate": rate, "method": method,
                             "density": prof.density, "bytes_sent": prof.bytes_sent, "bytes_wire": prof.bytes_wire,
                             **t})
        del grads
    for row in rows:
        dense = next((r for r in rows if r["method"] == "exact" and r["workers"] == row["workers"]
                      and r["rate"] == row["rate"]), None)
        row["speedup"] = dense["step"] / row["step"] if dense else None
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'P':>5} {'rate':>8} {'method':<12} {'density':>8} {'compute ms':>10} {'select ms':>9} "
             f"{'comm ms':>9} {'step ms':>9} {'speedup':>7} {'sent/worker':>11}"]
    for r in rows:
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"{r['workers']:>5} {r['rate']:>8} {r['method']:<12} {r['density']:>8.4g} "
                     f"{r['compute'] * 1e3:>10.2f} {r['select'] * 1e3:>9.2f} {r['comm'] * 1e3:>9.2f} "
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
    p.add_argument("--reducers", default="exact,exdyna,topk,powersgd")
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
            if m not in reducers.available():
                raise ValueError(f"unknown reducer {m!r}; registered: {', '.join(reducers.available())}")
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
            missing = [m for m in methods if m != "exact" and m not in has]
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
    rows = predict(cfg, task, workers, rates, methods, links, args.density, device, args.steps)
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
    for m in methods:
        need = memory_estimate(grads, lambda g: reducers.build(m, density=c, group=g), max(workers))
        if not fits_in_memory(need, have, 0.8):
            raise ValueError(f"{max(workers)} virtual workers of {m} on {cfg.model} need about {need / 1e9:.1f} GB; "
                             f"{have / 1e9:.1f} GB of memory is available: predict fewer workers")
        bound_allocator_if_tight(need, have, torch.device("cpu"), 0.8)


if __name__ == "__main__":
    sys.exit(main())
