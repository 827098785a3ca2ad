"""Gradient compression at 8 to 1,024 workers, on virtual workers and real gradients.

For each model (ResNet-20 on CIFAR-10, the MNIST CNN on MNIST) and worker count W:

1. the model is trained briefly, dense, on one worker (``--pretrain`` steps of batch 128), so
   that the gradients come from a real training point, not from initialisation;
2. ``--steps`` data-parallel steps follow: each of W workers takes its own batch of
   ``--batch`` images from its own shard (the trainer's sharding) and computes its gradient; the
   model then moves by the dense average (SGD, the pre-training lr). These W gradients per step
   are kept on disk and fed, unchanged, to every method: each method runs as W reducers on a
   :class:`~sparsecomm.reducers.comm.virtual.VirtualWorld` (the training loop's code, each worker
   with its own residual), so every method sees the same inputs;
3. per method, over the steps after ``--warmup``: the achieved global density (rank 0's
   ``density``; the union of all selections for gather-based methods, compared with W k where
   k = floor(c d)); every worker's ``local_density``; bytes sent and on the wire per worker per
   step (the communicator's counters: ring estimates, no network); ``t_select`` per worker and
   ``busy``, the host time one worker's reduce ran (selection, packing, unpacking, adding up;
   no waiting, no transfer); the load imbalance ``max count x W / sum - 1`` and the padding waste
   of the index all-gather it implies (``imbalance / (1 + imbalance)``); for the threshold
   methods the spread (max / min) of the workers' thresholds; and, from the raw gradients, the
   spread of the threshold each worker would pick alone (its own k-th largest |g|).

A (model, W, method) whose W reducers would not fit in the memory available (measured per
reducer as the trainer's ``--virtual-workers`` check does; the gradients are memory-mapped, not
counted) is skipped and listed as such, as is a (model, W) whose ``--steps`` x W gradients
(float32) would not fit on the disk of ``--out``.

``--convergence`` runs the other study instead (runs already in its results are kept, not redone;
delete convergence.json to start again): whole training runs of the trainer with
``--virtual-workers`` (the MNIST CNN, and logistic regression on MNIST written as a 10-class
LIBSVM file), 64 and 256 workers sharing a fixed global batch, dense against compressed
methods: final accuracy and achieved density.

    .venv/bin/python bench/scaling.py                       # every model at every W that fits
    .venv/bin/python bench/scaling.py --models mnist_cnn --workers 8,32 --methods exdyna,topk

A later call with the same density, batch and steps adds its models, worker counts and methods
to the earlier results (the (model, W, method) cells it runs replace earlier ones).
    .venv/bin/python bench/scaling.py --convergence         # the convergence table

Writes ``--out``/scaling.json (convergence.json), Markdown tables (scaling.md, convergence.md)
and, for the first study, figures in ``--figures``.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sparsecomm import reducers  # noqa: E402
from sparsecomm.units import si  # noqa: E402
from sparsecomm.config import load_config  # noqa: E402
from sparsecomm.launch.job import Job  # noqa: E402
from sparsecomm.reducers.comm.virtual import VirtualWorld  # noqa: E402
from sparsecomm.tasks import build_task  # noqa: E402
from sparsecomm.train.presets import find_preset  # noqa: E402
from sparsecomm.train.workers import (available_memory, bound_allocator_if_tight, fits_in_memory,  # noqa: E402
                                      memory_estimate)

log = logging.getLogger("scaling")

MODELS = {"resnet20": ("resnet20-cifar10", 0.1), "mnist_cnn": ("mnist-cnn", 0.05)}  # preset, lr
METHODS = ("exdyna", "micro", "sage", "thresh", "topk", "global_topk", "gtopk", "cltk", "deft")
PARTITIONED = ("exdyna", "micro", "deft")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=None, help="default: resnet20,mnist_cnn (--convergence: mnist_cnn,logreg)")
    p.add_argument("--workers", default=None, help="default: 8,32,128,512,1024 (--convergence: 64,256)")
    p.add_argument("--methods", default=None, help=f"default: {','.join(METHODS)} "
                                                   f"(--convergence: {','.join(CONVERGENCE_METHODS)})")
    p.add_argument("--density", type=float, default=0.001)
    p.add_argument("--batch", type=int, default=8, help="images per worker per step")
    p.add_argument("--steps", type=int, default=5, help="data-parallel steps per W (the first --warmup not measured)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--pretrain", type=int, default=150, help="dense steps of batch 128 before the study")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="bench/results/scaling")
    p.add_argument("--figures", default="docs/figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--convergence", action="store_true", help="run the convergence study instead (see above)")
    p.add_argument("--global-batch", type=int, default=1024, help="--convergence: the global batch, split over W")
    args = p.parse_args(argv)
    conv = args.convergence
    args.models = args.models or ("mnist_cnn,logreg" if conv else "resnet20,mnist_cnn")
    args.workers = args.workers or ",".join(map(str, CONVERGENCE_WORKERS if conv else (8, 32, 128, 512, 1024)))
    args.methods = args.methods or ",".join(CONVERGENCE_METHODS if conv else METHODS)
    for name in args.models.split(","):
        if name not in MODELS and not (conv and name == "logreg"):
            p.error(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")
    for name in args.methods.split(","):
        if name not in reducers.available():
            p.error(f"unknown method {name!r}; registered: {', '.join(reducers.available())}")
    if not 0 <= args.warmup < args.steps:
        p.error(f"--warmup must be below --steps ({args.steps}), got {args.warmup}")
    return args


# ------------------------------------------------------------------------------- gradients
def _task(model: str, args: argparse.Namespace, batch: int) -> Any:
    preset, _ = MODELS[model]
    cfg = load_config(find_preset(preset), [f"data.dir={args.data_dir}", f"data.batch_size={batch}",
                                            f"seed={args.seed}"], preset_name=preset)
    return build_task(cfg, Job(rank=0, world=1, local_rank=0, device=torch.device("cpu")))


def pretrain(model_name: str, args: argparse.Namespace) -> torch.nn.Module:
    """A dense run of ``--pretrain`` steps on one worker (batch 128, SGD with momentum 0.9)."""
    task = _task(model_name, args, 128)
    torch.manual_seed(args.seed)
    model = task.build_model()
    opt = torch.optim.SGD(model.parameters(), lr=MODELS[model_name][1], momentum=0.9)
    model.train()
    t0, done, losses = time.perf_counter(), 0, []
    for epoch in range(10**6):
        for batch in task.batches(epoch, 0):
            opt.zero_grad()
            loss = task.loss(model, batch)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            done += 1
            if done >= args.pretrain:
                break
        if done >= args.pretrain:
            break
    model.eval()
    with torch.no_grad():
        accuracy = task.evaluate(model)[0]["accuracy"]
    log.info("%s: %d dense steps in %.0f s, last loss %.3f, test accuracy %.3f", model_name, done,
             time.perf_counter() - t0, np.mean(losses[-10:]), accuracy)
    return model


def worker_gradients(model: torch.nn.Module, model_name: str, W: int, args: argparse.Namespace,
                     folder: Path) -> dict[str, Any]:
    """``--steps`` steps of W workers' gradients along the dense data-parallel trajectory from
    ``model`` (a copy moves); one [W, d] float32 file per step. Also each worker's own k-th
    largest |g| (the threshold it would pick alone)."""
    import copy

    task = _task(model_name, args, args.batch)
    views = [task.worker(r, W) for r in range(W)]
    net = copy.deepcopy(model)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    flat = reducers.bind_flat_gradients(params)
    d = flat.numel()
    k = max(1, math.floor(args.density * d))
    lr = MODELS[model_name][1]
    batches = [view.batches(0, 0) for view in views]
    folder.mkdir(parents=True, exist_ok=True)
    own = []
    t0 = time.perf_counter()
    for s in range(args.steps):
        grads = np.lib.format.open_memmap(folder / f"step{s}.npy", mode="w+", dtype=np.float32, shape=(W, d))
        mean = torch.zeros(d, dtype=torch.float64)
        thresholds = []
        for r in range(W):
            torch.manual_seed(args.seed + 7919 * (r + 1) + 104_729 * s)  # worker r's dropout stream
            flat.zero_()
            views[r].loss(net, next(batches[r])).backward()
            grads[r] = flat.numpy()
            mean += flat
            thresholds.append(float(flat.abs().topk(k).values[-1]))
        grads.flush()
        del grads
        own.append(thresholds)
        with torch.no_grad():
            flat.copy_((mean / W).float())
            for p in params:
                p.sub_(p.grad, alpha=lr)
    log.info("%s W=%d: %d steps of gradients in %.0f s", model_name, W, args.steps, time.perf_counter() - t0)
    return {"d": d, "k": k, "shapes": [tuple(p.shape) for p in params], "own_thresholds": own}


# ------------------------------------------------------------------------------ one method
def run_method(name: str, W: int, info: dict[str, Any], folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """W reducers of ``name`` on the stored gradients; per-step, per-worker measurements."""
    shapes = info["shapes"]
    world = VirtualWorld(W)
    rs = [reducers.build(name, density=args.density, seed=args.seed, group=world.communicator(r)) for r in range(W)]
    layout = reducers.Layout.of([torch.empty(s) for s in shapes])
    keys = ("density", "local_density", "bytes_sent", "bytes_wire", "t_select", "threshold", "load_imbalance")
    steps = []
    t0 = time.perf_counter()
    for s in range(args.steps):
        rows = torch.from_numpy(np.load(folder / f"step{s}.npy", mmap_mode="c"))
        grads = [layout.split(rows[r]) for r in range(W)]

        def reduce(r: int) -> None:
            rs[r].reduce(grads[r])  # the average is dropped: every worker's is the same

        world.run(reduce)
        steps.append({key: [rs[r].stat(key) for r in range(W)] for key in keys} | {"busy": list(world.busy)})
    world.close()
    seconds = time.perf_counter() - t0
    log.info("  %-12s W=%-5d %6.1f s (%.1f ms per worker-step)", name, W, seconds, seconds / (W * args.steps) * 1e3)
    return {"steps": steps, "seconds": seconds}


def summarise(name: str, W: int, run: dict[str, Any], info: dict[str, Any], args: argparse.Namespace) -> dict:
    d, k = info["d"], info["k"]
    measured = run["steps"][args.warmup:]

    def mean(values: list[float]) -> float:
        return float(np.mean(values))

    density = mean([s["density"][0] for s in measured])
    local = np.array([s["local_density"] for s in measured])  # [steps, W]
    counts = local * d
    imbalance = mean([c.max() * W / c.sum() - 1.0 if c.sum() else 0.0 for c in counts])
    out = {
        "method": name, "W": W, "d": d, "k": k, "density": density, "union_over_Wk": density * d / (W * k),
        "local_density_mean": float(local.mean()), "local_density_min": float(local.min(axis=1).mean()),
        "local_density_max": float(local.max(axis=1).mean()),
        "bytes_sent": mean([np.mean(s["bytes_sent"]) for s in measured]),
        "bytes_sent_max": mean([np.max(s["bytes_sent"]) for s in measured]),
        "bytes_wire": mean([np.mean(s["bytes_wire"]) for s in measured]),
        "t_select_ms": 1e3 * mean([np.mean(s["t_select"]) for s in measured]),
        "t_select_max_ms": 1e3 * mean([np.max(s["t_select"]) for s in measured]),
        "busy_ms": 1e3 * mean([np.mean(s["busy"]) for s in measured]),
        "imbalance": imbalance, "padding_waste": imbalance / (1.0 + imbalance),
        "seconds": run["seconds"],
        "density_per_step": [s["density"][0] for s in run["steps"]],
        "imbalance_per_step": [float(c.max() * W / c.sum() - 1.0) if c.sum() else 0.0
                               for c in np.array([s["local_density"] for s in run["steps"]]) * d],
    }
    if measured[0]["threshold"][0] is not None:
        spreads = [max(s["threshold"]) / min(s["threshold"]) for s in measured if min(s["threshold"]) > 0]
        out["threshold_spread"] = float(np.max(spreads)) if spreads else None
        out["threshold"] = mean([s["threshold"][0] for s in measured])
    return out


# ---------------------------------------------------------------------------------- report
def tables(results: dict[str, Any]) -> str:
    lines = []
    for model, by in results["models"].items():
        d = by["d"]
        lines.append(f"\n### {model} (d = {d:,}, c = {results['density']:g}, k = {by['k']:,}, batch {results['batch']} "
                     f"per worker)\n")
        lines.append("| method | W | density | union / W k | local density min-max | sent / worker / step | "
                     "wire / worker / step | t_select ms | busy ms | imbalance | padding | threshold spread |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for row in sorted(by["rows"], key=lambda r: (METHODS.index(r["method"]) if r["method"] in METHODS else 99,
                                                     r["W"])):
            if "skipped" in row:
                lines.append(f"| {row['method']} | {row['W']} | skipped: {row['skipped']} |||||||||| |")
                continue
            spread = row.get("threshold_spread")
            lines.append(
                f"| {row['method']} | {row['W']} | {row['density']:.4g} | {row['union_over_Wk']:.3g} | "
                f"{row['local_density_min']:.2g}-{row['local_density_max']:.2g} | {si(row['bytes_sent'], 'B')} | "
                f"{si(row['bytes_wire'], 'B')} | {row['t_select_ms']:.3g} | {row['busy_ms']:.3g} | "
                f"{row['imbalance']:.2f} | {100 * row['padding_waste']:.0f}% | "
                f"{'' if spread is None else f'{spread:.3g}'} |")
        lines.append("\n| W | dense all-reduce: sent / wire per worker per step | workers' own top-k thresholds: "
                     "max / min | coefficient of variation |")
        lines.append("| ---: | ---: | ---: | ---: |")
        for W, own in sorted(by["own_thresholds"].items(), key=lambda e: int(e[0])):
            W = int(W)
            ratio = np.mean([max(t) / min(t) for t in own])
            cv = np.mean([np.std(t) / np.mean(t) for t in own])
            lines.append(f"| {W} | {si(4 * d, 'B')} / {si(2 * (W - 1) / W * 4 * d, 'B')} | {ratio:.3g} | {cv:.3f} |")
    return "\n".join(lines) + "\n"


def figures(results: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    panels = (("density", "global density (selected by anyone / d)", True),
              ("bytes_sent", "bytes sent per worker per step", True),
              ("bytes_wire", "bytes on the wire per worker per step", True),
              ("t_select_ms", "selection time per worker (ms)", True), ("busy_ms", "host time per worker per reduce (ms)", True),
              ("imbalance", "load imbalance (max x W / sum - 1)", False))
    for model, by in results["models"].items():
        rows = [r for r in by["rows"] if "skipped" not in r]
        if not rows:  # every (W, method) skipped: nothing to draw
            continue
        fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
        for ax, (key, title, log_y) in zip(axes.flat, panels):
            shown = PARTITIONED + ("sage", "thresh") if key == "imbalance" else METHODS  # cltk: one selector by design
            for method in [m for m in shown if any(r["method"] == m for r in rows)]:
                pts = sorted((r["W"], r[key]) for r in rows if r["method"] == method)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method,
                        color=f"C{METHODS.index(method)}")  # a method's colour in every panel
            if key == "density":
                Ws = sorted({r["W"] for r in rows})
                ax.plot(Ws, [min(1.0, W * by["k"] / by["d"]) for W in Ws], "k:", label="W k / d")
                ax.axhline(results["density"], color="grey", lw=0.8, ls="--")
            if key == "bytes_wire":
                Ws = sorted({r["W"] for r in rows})
                ax.plot(Ws, [2 * (W - 1) / W * 4 * by["d"] for W in Ws], "k--", label="dense all-reduce")
            ax.set_xscale("log", base=2)
            if log_y:
                ax.set_yscale("log")
            ax.set_xlabel("workers W")
            ax.set_title(title)
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=8)
        axes.flat[2].legend(fontsize=8)
        fig.suptitle(f"{model}: {by['d']:,} parameters, density {results['density']:g}, "
                     f"{results['batch']} images per worker, virtual workers")
        fig.tight_layout()
        path = folder / f"scaling-{model}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------- convergence
CONVERGENCE_METHODS = ("exact", "exdyna", "sage", "topk", "powersgd")
CONVERGENCE_WORKERS = (64, 256)


def write_mnist_libsvm(data_dir: Path) -> Path:
    """MNIST as LIBSVM files (labels 0-9, pixels / 255, zeros left out), written once."""
    from sparsecomm.data.images import load_mnist

    folder = data_dir / "mnist-libsvm"
    if (folder / "test.svm").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        images = load_mnist(data_dir, "mnist", split)
        x = images.images.reshape(len(images.labels), -1)
        tmp = folder / f".{split}.svm.tmp"
        with open(tmp, "w") as f:
            for row, label in zip(x, images.labels):
                nz = np.flatnonzero(row)
                f.write(f"{int(label)} " + " ".join(f"{j + 1}:{row[j] / 255:.4g}" for j in nz) + "\n")
        tmp.rename(folder / f"{split}.svm")
    return folder


def convergence(args: argparse.Namespace) -> int:
    """The trainer with --virtual-workers: one epoch of the MNIST CNN, two of logistic regression."""
    from sparsecomm.launch.job import join
    from sparsecomm.train.loop import Trainer

    data_dir = Path(args.data_dir)
    write_mnist_libsvm(data_dir)
    runs_dir = Path(args.out) / "convergence-runs"
    setups = {
        "mnist_cnn": ("mnist-cnn", ["epochs=1", "reducer.density=0.01"]),
        "logreg": ("logreg", ["epochs=2", "reducer.density=0.01", "task_options.path=mnist-libsvm/train.svm",
                              "task_options.test_path=mnist-libsvm/test.svm", "data.eval_batch_size=10000"]),
    }
    out_file = Path(args.out) / "convergence.json"
    rows = json.loads(out_file.read_text()) if out_file.is_file() else []  # runs of an earlier call are kept
    done = {(r["model"], r["W"], r["method"]) for r in rows}
    for model in [m for m in args.models.split(",") if m in setups] or list(setups):
        preset, extra = setups[model]
        for W in [int(w) for w in args.workers.split(",")]:
            for method in args.methods.split(","):
                if (model, W, method) in done:
                    log.info("%s W=%d %s: measured by an earlier call, kept", model, W, method)
                    continue
                ov = [f"data.dir={data_dir}", f"output_dir={runs_dir}", f"data.global_batch_size={args.global_batch}",
                      f"reducer.name={method}", f"seed={args.seed}", "records.progress=false",
                      "records.checkpoint_every=0", *extra]
                cfg = load_config(find_preset(preset), ov, preset_name=preset)
                t0 = time.perf_counter()
                trainer = Trainer(cfg, join("cpu", virtual=W), fresh=True)
                summary = trainer.run()
                shutil.rmtree(trainer.run_dir / "checkpoints", ignore_errors=True)  # W residuals: not kept
                test = summary["final"].get("test") or summary["final"].get("train")
                rows.append({"model": model, "W": W, "batch_per_worker": args.global_batch // W, "method": method,
                             "target_density": 1.0 if method in ("exact", "powersgd") else 0.01,
                             "accuracy": test["accuracy"], "loss": test.get("loss"),
                             "density": summary["mean_density"], "local_density": summary["mean_local_density"],
                             "bytes_sent_per_step": summary["bytes_sent_per_step"], "steps": summary["steps"],
                             "seconds": time.perf_counter() - t0, "run": summary["run"]})
                log.info("%s W=%d %s: accuracy %.4f, density %.4g, %.0f s", model, W, method, rows[-1]["accuracy"],
                         rows[-1]["density"], rows[-1]["seconds"])
                out_file.write_text(json.dumps(rows, indent=1))
                del trainer, summary  # before the next run builds its W workers
                gc.collect()
    lines = ["| model | W | batch / worker | method | test accuracy | test loss | density | local density | "
             "sent / worker / step | wall |", "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['W']} | {r['batch_per_worker']} | {r['method']} | {r['accuracy']:.4f} | "
                     f"{r['loss']:.4f} | {r['density']:.4g} | {r['local_density']:.4g} | "
                     f"{si(r['bytes_sent_per_step'], 'B')} | {r['seconds'] / 60:.1f} min |")
    text = "\n".join(lines) + "\n"
    (Path(args.out) / "convergence.md").write_text(text)
    print(text)
    return 0


# ------------------------------------------------------------------------------------ main
def _no_memory(method: str, W: int, need: int, have: int) -> dict[str, Any]:
    """The row of a (W, method) skipped because its reducers would not fit in memory."""
    return {"method": method, "W": W, "skipped": f"needs {si(need, 'B')} of memory, {si(have, 'B')} free"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(1)
    if args.convergence:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return convergence(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"density": args.density, "batch": args.batch, "steps": args.steps,
                               "warmup": args.warmup, "pretrain": args.pretrain, "host": platform.node(),
                               "torch": torch.__version__, "models": {}}
    previous = out / "scaling.json"
    if previous.is_file():  # models measured by an earlier call with the same settings are kept
        earlier = json.loads(previous.read_text())
        if all(earlier.get(k) == results[k] for k in ("density", "batch", "steps", "warmup", "pretrain")):
            results["models"] = earlier.get("models", {})
    started = time.perf_counter()
    for model_name in args.models.split(","):
        model = pretrain(model_name, args)
        shapes = [p for p in model.parameters() if p.requires_grad]
        d = sum(p.numel() for p in shapes)
        # d and k up front: the tables need them even when every W is skipped for memory
        by: dict[str, Any] = {"rows": [], "own_thresholds": {}, "d": d, "k": max(1, math.floor(args.density * d))}
        earlier_by = results["models"].get(model_name)
        if earlier_by:  # rows of an earlier call are kept, except the (W, method) pairs run now
            now = {int(w) for w in args.workers.split(",")}
            methods_now = set(args.methods.split(","))
            by["rows"] = [r for r in earlier_by["rows"] if r["W"] not in now or r["method"] not in methods_now]
            by["own_thresholds"] = dict(earlier_by.get("own_thresholds", {}))
            by.update({k: earlier_by[k] for k in ("d", "k") if k in earlier_by})
        results["models"][model_name] = by
        for W in [int(w) for w in args.workers.split(",")]:
            fits = {}
            for name in args.methods.split(","):
                need = memory_estimate([torch.zeros_like(p) for p in shapes],  # gradients: memory-mapped files
                                       lambda c: reducers.build(name, density=args.density, group=c), W,
                                       gradients_held=False)
                have = available_memory(torch.device("cpu")) or 0
                fits[name] = (need, have)
            if not any(fits_in_memory(need, have, 0.8) for need, have in fits.values()):
                by["rows"] += [_no_memory(name, W, need, have) for name, (need, have) in fits.items()]
                log.info("%s W=%d: skipped, no method fits in memory", model_name, W)
                continue
            folder = out / "gradients" / f"{model_name}-W{W}"
            disk, free = args.steps * W * d * 4, shutil.disk_usage(out).free
            if disk > 0.9 * free:
                for name in fits:
                    by["rows"].append({"method": name, "W": W,
                                       "skipped": f"its gradients need {si(disk, 'B')} of disk, {si(free, 'B')} free"})
                log.info("%s W=%d: skipped, its gradients need %s on disk in %s, %s free", model_name, W,
                         si(disk, 'B'), out, si(free, 'B'))
                continue
            info = worker_gradients(model, model_name, W, args, folder)
            by.update(d=info["d"], k=info["k"])
            by["own_thresholds"][W] = info["own_thresholds"]
            for name in args.methods.split(","):
                need, have = fits[name]
                have = available_memory(torch.device("cpu")) or have
                if not fits_in_memory(need, have, 0.8):
                    by["rows"].append(_no_memory(name, W, need, have))
                    log.info("  %-12s W=%-5d skipped: needs %s, %s free", name, W, si(need, 'B'), si(have, 'B'))
                    continue
                bound_allocator_if_tight(need, have, torch.device("cpu"), 0.8)
                run = run_method(name, W, info, folder, args)
                by["rows"].append(summarise(name, W, run, info, args))
                gc.collect()
                (out / "scaling.json").write_text(json.dumps(results, indent=1))
            shutil.rmtree(folder, ignore_errors=True)
    results["seconds"] = results.get("seconds", 0.0) + time.perf_counter() - started
    (out / "scaling.json").write_text(json.dumps(results, indent=1))
    text = tables(results)
    (out / "scaling.md").write_text(text)
    print(text)
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    for path in figures(results, Path(args.figures)):
        log.info("wrote %s", path)
    log.info("done in %.0f min", results["seconds"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
