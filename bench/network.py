"""What the links do to each method: training steps on hosts joined by rate-limited links.

For each host count and link rate, ``sparsecomm.tools.netlab`` makes the hosts (network namespaces
on a bridge, ``tc tbf`` egress limits; root and iproute2 needed); one worker runs on each host
(``bench/network.py worker``, started with ``ip netns exec``), joins one gloo group over the
links and, for each model and method, trains ``--steps`` real steps with the project's trainer
(real data, the model's preset; the first ``--log-every`` steps are warm-up) and reports rank
0's means per step: forward, backward, select, communicate, optimizer step, bytes sent and on
the wire, achieved density, and the wall time per step (``t_iter``). ``--scopes`` runs each
method in each of the loop's reducer scopes (``bucket``: reduced group by group beside backward,
where the split's parts overlap and only ``t_iter`` is the step; ``model``: after backward).
For ``exact`` the dense all-reduce's achieved bandwidth is ``bytes_wire * 8 / t_comm`` against
the configured rate. Before training, each host count and
rate times the bare all-reduce and all-gather at ``--collectives`` sizes: the points
:func:`sparsecomm.tools.costmodel.fit` fits the links' alpha and beta to.

    .venv/bin/python bench/network.py run --hosts 2,4 --rates 100mbit,1gbit,10gbit,unlimited \
        --models mnist_cnn,resnet20 --methods exact,exdyna,sage,topk,gtopk,powersgd,randomk \
        --densities 0.01,0.001 --data-dir DATA --out bench/results/network.json
    .venv/bin/python bench/network.py run --hosts 2 --rates 100mbit --models mnist_cnn,lstm \
        --methods exact,fp16,topk,powersgd --densities 0.01 --scopes bucket,model --data-dir DATA
    .venv/bin/python bench/network.py tta --rate 100mbit --hosts 2 --methods exact,exdyna,powersgd \
        --data-dir DATA --out bench/results/network_tta.json

    .venv/bin/python bench/network.py fit           # the links' alpha and beta -> bench/links.json
    .venv/bin/python bench/network.py validate --data-dir DATA   # the cost model against the steps

``tta`` trains the MNIST CNN to the end of its preset and records test accuracy against wall
time (evaluation every ``--eval-every`` steps). Data: ``./prepare_dataset.sh --data-dir DATA
--base-url ../shared/data mnist cifar10``. All hosts share this machine's 2 cores, so forward and
backward times include contention; the communicate times are those of the links.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsecomm.tools import netlab  # noqa: E402
from sparsecomm.train.meter import TIME_PARTS as PARTS  # noqa: E402

import results_files  # noqa: E402  (bench/results_files.py: earlier results are set aside)

MODELS = {"mnist_cnn": ("mnist-cnn", []), "resnet20": ("resnet20-cifar10", []),
          "lstm": ("lstm-ptb-small", [])}
PORT = 29640


def _configs(methods: list[str], densities: list[float], scopes: list[str]) -> list[tuple[str, float, str]]:
    """(method, density, scope) to train: a method that does not use the density once per scope."""
    from sparsecomm import reducers

    out = []
    for m in methods:
        for c in (densities if reducers.lookup(m).uses_density else [1.0]):
            out.extend((m, c, scope) for scope in scopes)
    return out


def step_seconds(lines: list[dict]) -> float | None:
    """Wall seconds per step between the first and the last of ``lines`` (training lines, each
    with the run's ``time`` and ``step`` at its end): the step as a user waits for it, which the
    time split's sum overstates where the reduce runs beside backward (bucket scope)."""
    if len(lines) < 2 or lines[-1]["step"] == lines[0]["step"]:
        return None
    return (lines[-1]["time"] - lines[0]["time"]) / (lines[-1]["step"] - lines[0]["step"])


# ------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> int:
    """One host's worker: every (model, method, density) of the list, one after another."""
    import logging

    from sparsecomm.config import ConfigError, load_config
    from sparsecomm.launch.job import join
    from sparsecomm.train.loop import Trainer
    from sparsecomm.train.presets import find_preset

    logging.basicConfig(level=logging.WARNING)
    job = join("cpu")
    results = collectives(job, [int(float(b)) for b in args.collectives.split(",") if b])
    for model in args.models.split(","):
        preset, extra = MODELS[model]
        for method, density, scope in _configs(args.methods.split(","), [float(c) for c in args.densities.split(",")],
                                               args.scopes.split(",")):
            with tempfile.TemporaryDirectory(dir=args.scratch) as out:
                overrides = [f"reducer.name={method}", f"reducer.density={density}", f"data.dir={args.data_dir}",
                             f"output_dir={out}", "records.progress=false", f"records.log_every={args.log_every}",
                             "records.checkpoint_every=0", "epochs=100", f"max_steps={args.steps}",
                             f"reducer.scope={scope}", *extra]
                if method == "powersgd":
                    overrides.append("reducer.options={rank: 2}")
                try:
                    cfg = load_config(find_preset(preset), overrides, preset_name=preset)
                    # the trainer's metrics are rank 0's; every rank runs the same steps
                    trainer = Trainer(cfg, job, fresh=True)
                except ConfigError as exc:  # e.g. bucket scope for OMGS, which overlaps by its own hooks
                    if job.is_main:
                        print(f"skipped {model} {method} {scope}: {exc}", flush=True)
                    continue
                try:
                    trainer.run()
                except Exception as exc:  # Stopped at max_steps
                    if type(exc).__name__ != "Stopped":
                        raise
                if job.is_main:
                    lines = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
                    training = [line for line in lines if "split" not in line]
                    timed = training[1:]  # the first window is warm-up
                    row = {"model": model, "method": method, "density": density, "scope": trainer.scope,
                           "steps": args.steps, "t_iter": step_seconds(training)}
                    for key in (*PARTS, "bytes_sent", "bytes_wire", "density"):
                        values = [line[key] for line in timed if key in line]
                        row["achieved_density" if key == "density" else key] = sum(values) / len(values) \
                            if values else None
                    results.append(row)
                    print(json.dumps(row), flush=True)
            job.barrier()
    if job.is_main:
        Path(args.result).write_text(json.dumps(results))
    return 0


def collectives(job: Any, sizes: list[int], repeats: int = 5) -> list[dict]:
    """Rank 0's median time of the project's all-reduce and all-gather of ``sizes`` bytes
    (float32) over the links: what :mod:`sparsecomm.tools.costmodel` fits its alpha and beta to."""
    import torch

    from sparsecomm.reducers.comm.communicator import make_communicator

    comm = make_communicator()
    rows = []
    for nbytes in sizes:
        x = torch.ones(max(1, nbytes // 4))
        for kind in ("all_reduce", "all_gather"):
            times = []
            for i in range(repeats + 1):
                job.barrier()
                t0 = time.perf_counter()
                if kind == "all_reduce":
                    comm.all_reduce_(x)
                else:
                    comm.all_gather(x)
                if i:  # the first is warm-up
                    times.append(time.perf_counter() - t0)
            row = {"collective": kind, "bytes": 4 * x.numel(), "seconds": sorted(times)[len(times) // 2]}
            rows.append(row)
            if job.is_main:
                print(json.dumps(row), flush=True)
    return rows


# ------------------------------------------------------------------------------ driver
def run_hosts(hosts: int, command: list[str], env_extra: dict[str, str], timeout: float, port: int = PORT) -> None:
    """``command`` on each of the netlab's first ``hosts`` hosts, one process each (rank = host,
    rank 0's host the rendezvous at ``port``); raises when one exits non-zero or ``timeout``
    seconds pass (the others are killed). Also used by bench/ddp_links.py."""
    procs = []
    for r in range(hosts):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(hosts), "LOCAL_RANK": "0",
               "MASTER_ADDR": netlab.host_address(0), "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "eth0",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env_extra}
        procs.append(subprocess.Popen(netlab.host_command(r, command), cwd=ROOT, env=env))
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
            if p.returncode != 0:
                raise RuntimeError(f"a worker exited with {p.returncode}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def run(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {"settings": vars(args), "cells": [], "collectives": []}
    scratch = Path(tempfile.mkdtemp(prefix="network-bench-"))
    results_files.keep_earlier(args.out)  # written after every cell from here on
    try:
        for hosts in [int(h) for h in args.hosts.split(",")]:
            for rate in args.rates.split(","):
                netlab.down(force=True)
                netlab.up(hosts, rate)
                result = scratch / f"h{hosts}-{rate}.json"
                command = [sys.executable, str(Path(__file__).resolve()), "worker", "--models", args.models,
                           "--methods", args.methods, "--densities", args.densities, "--scopes", args.scopes,
                           "--steps", str(args.steps),
                           "--log-every", str(args.log_every), "--collectives", args.collectives, "--data-dir", str(Path(args.data_dir).resolve()),
                           "--scratch", str(scratch), "--result", str(result)]
                print(f"== {hosts} hosts at {rate}", flush=True)
                run_hosts(hosts, command, {}, args.timeout)
                for row in json.loads(result.read_text()):
                    where = "collectives" if "collective" in row else "cells"
                    results.setdefault(where, []).append({"hosts": hosts, "rate": rate, **row})
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=1))
    finally:
        netlab.down(force=True)
    print(table(results["cells"]))
    print(f"wrote {args.out}")
    return 0


def table(cells: list[dict]) -> str:
    """One line per cell: ``step ms`` is the wall time per step (``t_iter``; cells of runs that
    predate it: the time split's sum), ``sum ms`` the split's sum, larger in bucket scope by the
    reduce time that ran beside backward."""
    head = (f"{'hosts':>5} {'rate':>9} {'model':<10} {'method':<9} {'c':>6} {'scope':<6} {'step ms':>8} "
            f"{'sum ms':>8} {'fwd':>6} {'bwd':>6} {'select':>7} {'comm':>8} {'MB sent':>8} {'density':>8} {'Gbit/s':>7}")
    lines = [head]
    for c in cells:
        parts = sum(c[k] or 0.0 for k in PARTS)
        step = c.get("t_iter") or parts
        gbits = c["bytes_wire"] * 8 / c["t_comm"] / 1e9 if c["method"] == "exact" and c["t_comm"] else None
        lines.append(f"{c['hosts']:>5} {c['rate']:>9} {c['model']:<10} {c['method']:<9} {c['density']:>6g} "
                     f"{c.get('scope', 'model'):<6} {step * 1e3:8.1f} {parts * 1e3:8.1f} "
                     f"{c['t_forward'] * 1e3:6.1f} {c['t_backward'] * 1e3:6.1f} "
                     f"{c['t_select'] * 1e3:7.2f} {c['t_comm'] * 1e3:8.1f} {c['bytes_sent'] / 1e6:8.3f} "
                     f"{c['achieved_density'] or 0:8.4f} {'' if gbits is None else f'{gbits:7.3f}'}")
    return "\n".join(lines)


def tta(args: argparse.Namespace) -> int:
    """Test accuracy against wall time, MNIST CNN to the end of its preset."""
    netlab.down(force=True)
    netlab.up(args.hosts, args.rate)
    curves = {}
    try:
        out = Path(tempfile.mkdtemp(prefix="network-tta-"))
        for method in args.methods.split(","):
            density = 1.0 if method in ("exact", "powersgd") else args.density
            command = ["./run.sh"]
            extra = {"PRESET": "mnist-cnn", "REDUCER": method, "DENSITY": str(density), "DATA_DIR": args.data_dir,
                     "OUTPUT_DIR": str(out), "EXTRA_ARGS": f"--set records.progress=false --set "
                     f"records.eval_every_steps={args.eval_every}"}
            print(f"== {method}", flush=True)
            run_hosts(args.hosts, command, extra, args.timeout)
            run_dir = next(p for p in out.iterdir() if f"-{method}-" in p.name)
            evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                     if '"split"' in line]
            curves[method] = [(e["time"], e["accuracy"]) for e in evals]
            print(curves[method], flush=True)
    finally:
        netlab.down(force=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results_files.keep_earlier(args.out)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "curves": curves}, indent=1))
    return plot_tta(argparse.Namespace(results=args.out, figure=args.figure))


def plot_tta(args: argparse.Namespace) -> int:
    """Test accuracy against wall time from ``tta``'s results: a figure and a table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(args.results).read_text())
    settings = data["settings"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, curve in data["curves"].items():
        ax.plot([t / 60 for t, _ in curve], [a for _, a in curve], marker="o", markersize=3, label=method)
    ax.set_xlabel("wall time (min)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"MNIST CNN, {settings['hosts']} hosts at {settings['rate']}")
    ax.grid(alpha=0.3)
    ax.legend()
    Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.figure, dpi=120, bbox_inches="tight")
    print(f"wrote {args.figure}")
    for method, curve in data["curves"].items():
        t, a = curve[-1]
        first = next((t for t, acc in curve if acc >= 0.98), None)
        print(f"{method:<10} final accuracy {a:.4f} after {t / 60:.1f} min; 98% reached after "
              f"{'never' if first is None else f'{first / 60:.1f} min'}")
    return 0


def _results(files: str, part: str) -> list[dict]:
    """The ``part`` rows of one or more result files of ``run`` (comma-separated)."""
    return [row for f in files.split(",") for row in json.loads(Path(f).read_text()).get(part, [])]


def fit(args: argparse.Namespace) -> int:
    """Fit the links' parameters to the timed collectives of ``run`` and write them where
    ``python -m sparsecomm predict`` reads them."""
    from sparsecomm.tools import costmodel

    points = [{**p, "rate_bps": netlab.parse_rate(p["rate"])} for p in _results(args.results, "collectives")]
    links = costmodel.fit(points)
    links.save(args.out)
    for kind in ("all_reduce", "all_gather"):
        c = links.cost(kind)
        print(f"{kind}: alpha {c.alpha * 1e3:.3f} ms per round, {100 * c.efficiency:.1f}% of the rate, "
              f"{c.gamma * 1e9:.3f} ns per byte on the hosts")
    print(f"wrote {args.out}")
    for p in points:
        t = costmodel.collective_seconds(p["collective"], p["bytes"], p["hosts"], links, p["rate_bps"] or math.inf)
        print(f"  {p['hosts']} hosts {p['rate']:>8} {p['collective']:<10} {p['bytes']:>9} B: measured "
              f"{p['seconds'] * 1e3:8.2f} ms, fitted {t * 1e3:8.2f} ms ({100 * (t / p['seconds'] - 1):+.0f}%)")
    return 0


def validate(args: argparse.Namespace) -> int:
    """The cost model against the training steps of ``run`` (which the fit never saw): each
    method profiled on as many virtual workers as there were hosts, fed the model's gradients,
    its collectives priced with the fitted links; the step predicted from the measured compute
    and selection plus the predicted communication, against the measured step."""
    from sparsecomm.tools import costmodel
    from sparsecomm.config import load_config
    from sparsecomm.tools.predict import load_task, worker_gradients
    from sparsecomm.train.presets import find_preset

    links = costmodel.Links.load(args.links)
    # the loop's bucket scope reduces beside backward, which this sum of parts does not price
    # (bench/ddp_links.py validate does, for DDP's buckets)
    limited = [c for c in _results(args.results, "cells") if c["rate"] != "unlimited"]
    cells = [c for c in limited if c.get("scope", "model") != "bucket"]
    if len(cells) < len(limited):
        print(f"left out: {len(limited) - len(cells)} steps in bucket scope (the loop reduced beside backward; "
              f"bench/ddp_links.py validate prices overlap)")
    rows, tasks, cache = [], {}, {}
    for c in cells:
        key = (c["model"], c["hosts"])
        if key not in cache:
            if c["model"] not in tasks:  # each model's data loaded once
                preset, extra = MODELS[c["model"]]
                cfg = load_config(find_preset(preset), [f"data.dir={args.data_dir}", *extra], preset_name=preset)
                tasks[c["model"]] = (cfg, load_task(cfg))
            cfg, task = tasks[c["model"]]
            cache[key] = worker_gradients(task, cfg.seed, c["hosts"])[:2]
        grads, shapes = cache[key]
        options = {"rank": 2} if c["method"] == "powersgd" else {}
        prof = costmodel.profile(c["method"], grads, shapes, c["density"], **options)
        comm = prof.comm_seconds(links, netlab.parse_rate(c["rate"]))
        measured = sum(c[k] or 0.0 for k in PARTS)
        predicted = measured - c["t_comm"] + comm
        rows.append({**{k: c[k] for k in ("hosts", "rate", "model", "method", "density")},
                     "t_comm": c["t_comm"], "predicted_comm": comm, "step": measured, "predicted_step": predicted})
    results_files.keep_earlier(args.out)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    misses = [r for r in rows if abs(r["predicted_step"] / r["step"] - 1) > 0.2]
    print(f"{'hosts':>5} {'rate':>8} {'model':<10} {'method':<9} {'c':>6} {'comm ms':>8} {'predicted':>9} "
          f"{'step ms':>8} {'predicted':>9} {'error':>6}")
    for r in rows:
        print(f"{r['hosts']:>5} {r['rate']:>8} {r['model']:<10} {r['method']:<9} {r['density']:>6g} "
              f"{r['t_comm'] * 1e3:8.1f} {r['predicted_comm'] * 1e3:9.1f} {r['step'] * 1e3:8.1f} "
              f"{r['predicted_step'] * 1e3:9.1f} {100 * (r['predicted_step'] / r['step'] - 1):+5.0f}%")
    print(f"{len(rows) - len(misses)} of {len(rows)} steps predicted within 20%; wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True)
    r = verbs.add_parser("run")
    r.add_argument("--hosts", default="2,4")
    r.add_argument("--rates", default="100mbit,1gbit,10gbit,unlimited")
    r.add_argument("--models", default="mnist_cnn,resnet20")
    r.add_argument("--methods", default="exact,exdyna,sage,topk,gtopk,powersgd,randomk")
    r.add_argument("--densities", default="0.01,0.001")
    r.add_argument("--scopes", default="model", help="the loop's reducer.scope values to run each method in, "
                   "comma-separated (auto, bucket, model); default model, the steps validate prices")
    r.add_argument("--steps", type=int, default=25)
    r.add_argument("--log-every", type=int, default=5)
    r.add_argument("--data-dir", required=True)
    r.add_argument("--collectives", default="16e3,256e3,4e6",
                   help="bytes of the all-reduces and all-gathers timed first (empty: none)")
    r.add_argument("--timeout", type=float, default=3600)
    r.add_argument("--out", default="bench/results/network.json")
    w = verbs.add_parser("worker")
    for name in ("--models", "--methods", "--densities", "--data-dir", "--scratch", "--result"):
        w.add_argument(name, required=True)
    w.add_argument("--collectives", default="")
    w.add_argument("--scopes", default="model")
    w.add_argument("--steps", type=int, required=True)
    w.add_argument("--log-every", type=int, required=True)
    t = verbs.add_parser("tta")
    t.add_argument("--hosts", type=int, default=2)
    t.add_argument("--rate", default="100mbit")
    t.add_argument("--methods", default="exact,exdyna,powersgd")
    t.add_argument("--density", type=float, default=0.01)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--data-dir", required=True)
    t.add_argument("--timeout", type=float, default=7200)
    t.add_argument("--out", default="bench/results/network_tta.json")
    t.add_argument("--figure", default="docs/figures/network-tta.png")
    pt = verbs.add_parser("plot-tta")
    pt.add_argument("--results", default="bench/results/network_tta.json")
    pt.add_argument("--figure", default="docs/figures/network-tta.png")
    f = verbs.add_parser("fit")
    f.add_argument("--results", default="bench/results/network.json", help="result files of run, comma-separated")
    f.add_argument("--out", default="bench/links.json")
    v = verbs.add_parser("validate")
    v.add_argument("--results", default="bench/results/network.json", help="result files of run, comma-separated")
    v.add_argument("--links", default="bench/links.json")
    v.add_argument("--data-dir", required=True)
    v.add_argument("--out", default="bench/results/costmodel_validation.json")
    args = p.parse_args(argv)
    return {"run": run, "worker": worker, "tta": tta, "fit": fit, "validate": validate,
            "plot-tta": plot_tta}[args.verb](args)


if __name__ == "__main__":
    sys.exit(main())
