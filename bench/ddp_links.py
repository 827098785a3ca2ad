"""PyTorch's DDP hooks against sparsecomm's through the DDP hook, on hosts joined by real links.

For each host count and link rate, ``sparsecomm.tools.netlab`` makes the hosts (as
``bench/network.py`` does, through its :func:`network.run_hosts`); one worker runs on each host
(``bench/ddp_links.py worker``, started with ``ip netns exec``), joins one gloo group over the
links and, for each model, wraps it in DistributedDataParallel once per configuration:

  - ``local``               no exchange (DDP's ``no_sync()``): the floor
  - ``ddp``                 DDP's default: its fp32 all-reduce, overlapped with backward by DDP
  - ``torch-fp16``, ``torch-bf16``  ``default_hooks.fp16_compress_hook`` / ``bf16_compress_hook``
  - ``torch-powersgd``      ``powerSGD_hook.powerSGD_hook``, rank 2, ``start_powerSGD_iter=2``
                            (the warm-up round is past it), torch's other defaults, in one DDP
                            bucket: with more, gloo aborts on a collective mismatch (the hook's
                            continuations start collectives from gloo's threads, in an order
                            that differs between ranks)
  - ``METHOD/SCOPE``        ``sparsecomm.ddp.reducer_hook`` with ``ReducerHookState(METHOD,
                            density=--density, scope=SCOPE)``; ``METHOD+allreduce`` adds
                            ``exchange="allreduce"`` (the 16-bit casts summed by all-reduce, as
                            PyTorch's hooks do, instead of the default all-gather)

and times whole iterations (zero_grad, forward, backward with the hook, SGD step) of every
configuration, interleaved round by round (``--steps`` steps per configuration per round,
``--rounds`` rounds after one warm-up round) so that the shared machine's load drifts over all
of them alike. Batches are synthetic, of the presets' shapes (MNIST CNN: 64 x 1 x 28 x 28;
ResNet-20: 128 x 3 x 32 x 32; the PTB LSTM 2 x 200: 20 x 20 tokens of a 10,000-word
vocabulary): the step's cost does not depend on the values. Reported (rank 0, medians over the
timed steps): iteration, forward, backward (for DDP this includes the hooks' exposed waits),
optimizer step, the sparsecomm hook's own ``t_select + t_comm`` (wall time, beside backward in
bucket scope), and the bytes this host put on its link per step (``eth0``'s tx counter in the
host's namespace over each round's steps of a configuration, closed by a barrier: payload plus
TCP/IP headers and the barriers' few bytes, the same meter for every configuration).

Hidden share: for a configuration X that overlaps (``ddp``, ``METHOD/bucket``) and its
non-overlapped twin M (``exact/model`` for ``ddp``, ``METHOD/model`` for ``METHOD/bucket``),
``hidden = 1 - (T(X) - T(local)) / (T(M) - T(local))``: of the cost M adds to the floor, the
share that X does not show.

    .venv/bin/python bench/ddp_links.py run --hosts 2 --rates 100mbit,1gbit,10gbit \
        --models mnist_cnn,resnet20 --out bench/results/ddp_links.json
    .venv/bin/python bench/ddp_links.py table bench/results/ddp_links.json
    .venv/bin/python bench/ddp_links.py validate bench/results/ddp_links.json   # the cost model against them

Needs root and iproute2 (the netlab); refuses to start while another netlab is up. bench/fsdp_links.py
runs FSDP2 configurations on this driver, worker and timing loop.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsecomm.tools import netlab  # noqa: E402

import network  # noqa: E402  (bench/network.py: the hosts' processes)
import results_files  # noqa: E402

PORT = 29650
CONFIGS = ("local,ddp,exact/model,torch-fp16,torch-bf16,torch-powersgd,fp16/bucket,fp16/model,bf16/bucket,"
           "powersgd/bucket,powersgd/model,topk/bucket,topk/model,exdyna/bucket,exdyna/model")
# model name, its options, and a synthetic batch maker: (batch, generator) -> (input, target)
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "mnist_cnn": ("mnist_cnn", {}),
    "resnet20": ("resnet20", {}),
    "lstm": ("lstm_lm", {"vocab_size": 10000, "emsize": 200, "nhid": 200, "nlayers": 2, "dropout": 0.0,
                         "tie_weights": False}),
}
TWIN = {"ddp": "exact/model"}  # the non-overlapped twin of an overlapped configuration


def twin(label: str) -> str | None:
    if label in TWIN:
        return TWIN[label]
    return label[: -len("/bucket")] + "/model" if label.endswith("/bucket") else None


def hidden(rows: dict[str, dict], label: str) -> float | None:
    """``1 - (T(label) - T(local)) / (T(twin) - T(local))``, None without a twin or a cost."""
    other = twin(label)
    if other not in rows or "local" not in rows:
        return None
    floor = rows["local"]["t_iter"]
    cost = rows[other]["t_iter"] - floor
    return None if cost <= 0 else 1 - (rows[label]["t_iter"] - floor) / cost


# ------------------------------------------------------------------------------ worker
def _batch(model: str, gen: Any) -> tuple[Any, Any]:
    import torch
    if model == "mnist_cnn":
        return torch.randn(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    if model == "resnet20":
        return torch.randn(128, 3, 32, 32, generator=gen), torch.randint(0, 10, (128,), generator=gen)
    tokens = torch.randint(0, 10000, (21, 20), generator=gen)
    return tokens[:-1], tokens[1:]


def _loss(model: str, net: Any, x: Any, y: Any) -> Any:
    import torch.nn.functional as F
    if model == "lstm":
        out, _ = net(x)
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(net(x), y)


def _build(model: str, label: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """The DDP model of a configuration and its sparsecomm state (or None)."""
    import torch

    from sparsecomm.models import build_model

    name, options = SHAPES[model]
    torch.manual_seed(0)
    return wrap(build_model(name, **options), label, args)


def wrap(module: Any, label: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """``module`` in DistributedDataParallel as configuration ``label`` has it (the module
    docstring's list), and the sparsecomm hook's state (None for DDP's and torch's own)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    from sparsecomm.ddp import ReducerHookState, reducer_hook

    caps = {} if args.bucket_mb is None else {"bucket_cap_mb": args.bucket_mb}
    if label == "torch-powersgd":
        # one bucket: with two or more, the hook's continuations start the buckets' collectives
        # from gloo's threads in an order that differs between ranks, and gloo aborts
        # ("Received data size doesn't match expected size ... collective mismatch")
        caps = {"bucket_cap_mb": 1024.0}
    net = DDP(module, **caps)
    state = None
    if "/" in label:
        method, scope = label.split("/")
        extra = {}
        if method.endswith("+allreduce"):
            method, extra = method[: -len("+allreduce")], {"exchange": "allreduce"}
        state = ReducerHookState(method, density=args.density, scope=scope, **extra)
        net.register_comm_hook(state, reducer_hook)
    elif label == "torch-fp16":
        net.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif label == "torch-bf16":
        net.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif label == "torch-powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=2, start_powerSGD_iter=2)
        net.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
        state = None
    elif label not in ("local", "ddp"):
        raise ValueError(f"unknown configuration {label!r}")
    return net, state


def _tx_bytes() -> int:
    """Bytes sent on eth0 (this host's link) so far; 0 where there is none."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "eth0":
            return int(rest.split()[8])
    return 0


def time_model(model: str, labels: list[str], args: argparse.Namespace, build: Any = None,
               summarize: Any = None) -> dict[str, dict]:
    """Every configuration of ``labels`` on ``model``, interleaved round by round (see the module
    docstring): rank 0's medians per configuration. ``build(model, label, args) -> (net, state)``
    makes a configuration (None: DDP's, :func:`_build`; bench/fsdp_links.py passes FSDP's);
    ``summarize(times, state) -> row`` makes its row (None: bench/ddp_overlap.py's ``summary``).
    ``state``: what has the method's ``stats`` (``t_select``, ``t_comm``), or None."""
    import torch
    import torch.distributed as dist
    from ddp_overlap import timed_step  # bench/ddp_overlap.py
    from torch.nn.parallel import DistributedDataParallel as DDP
    if summarize is None:
        from ddp_overlap import summary as summarize
    runs = {label: (build or _build)(model, label, args) for label in labels}
    optims = {label: torch.optim.SGD(net.parameters(), lr=0.01) for label, (net, _) in runs.items()}
    gen = torch.Generator().manual_seed(1000 + dist.get_rank())
    batches = [_batch(model, gen) for _ in range(2)]
    keys = ("t_iter", "t_forward", "t_backward", "t_step", "t_reduce", "tx_bytes")
    times: dict[str, dict[str, list[float]]] = {label: {k: [] for k in keys} for label in labels}
    for round_ in range(args.rounds + 1):  # round 0 warms up (DDP's rebuild, PowerSGD's start)
        for label in labels:
            net, state = runs[label]
            opt = optims[label]
            steps = args.steps if round_ else max(args.steps, 3)
            dist.barrier()
            tx = _tx_bytes()
            sync = not (label == "local" and isinstance(net, DDP))
            for step in range(steps):
                x, y = batches[step % len(batches)]
                t_forward, t_backward, t_step, t_iter = timed_step(net, opt, partial(_loss, model, net, x, y), sync)
                if round_:
                    row = times[label]
                    row["t_iter"].append(t_iter)
                    row["t_forward"].append(t_forward)
                    row["t_backward"].append(t_backward)
                    row["t_step"].append(t_step)
                    if state is not None:
                        s = state.stats
                        row["t_reduce"].append(s.get("t_select", 0.0) + s.get("t_comm", 0.0))
            # after a barrier every byte of these steps has reached the peer, so has left eth0
            dist.barrier()
            if round_:
                times[label]["tx_bytes"].append((_tx_bytes() - tx) / steps)
        if dist.get_rank() == 0:
            print(f"  {model}: round {round_} done", flush=True)
    out = {}
    for label in labels:
        out[label] = {**summarize(times[label], runs[label][1]), "steps": len(times[label]["t_iter"])}
    params = sum(p.numel() for p in runs[labels[0]][0].parameters())
    for label in labels:
        out[label]["params"] = params
    return out


def worker(args: argparse.Namespace, timer: Any = None) -> int:
    """One host's worker: ``timer`` (None: :func:`time_model`) on each model, rank 0 writing the
    results to ``args.result``."""
    import logging

    from sparsecomm.launch.job import join

    logging.basicConfig(level=logging.WARNING)
    job = join("cpu")
    labels = args.configs.split(",")
    results = {}
    for model in args.models.split(","):
        results[model] = (timer or time_model)(model, labels, args)
        job.barrier()
    if job.is_main:
        Path(args.result).write_text(json.dumps(results))
    return 0


# ------------------------------------------------------------------------------ driver
def run(args: argparse.Namespace, script: str | Path = __file__, base: str = "ddp") -> int:
    """Bring up a netlab per host count and rate, run ``script``'s ``worker`` on each host
    (bench/fsdp_links.py passes its own), gather rank 0's rows into ``args.out``; ``base``: the
    configuration the tables divide by."""
    if netlab_in_use():
        return 2
    results: dict[str, Any] = {"settings": vars(args), "command": " ".join([sys.executable] + sys.argv),
                               "cells": []}
    scratch = Path(tempfile.mkdtemp(prefix=f"{Path(script).stem}-"))
    results_files.keep_earlier(args.out)  # written after every cell from here on
    try:
        for hosts in [int(h) for h in args.hosts.split(",")]:
            for rate in args.rates.split(","):
                netlab.down(force=True)
                netlab.up(hosts, rate)
                result = scratch / f"h{hosts}-{rate}.json"
                command = [sys.executable, str(Path(script).resolve()), "worker", "--models", args.models,
                           "--configs", args.configs, "--density", str(args.density), "--steps",
                           str(args.steps), "--rounds", str(args.rounds), "--result", str(result)]
                if getattr(args, "bucket_mb", None) is not None:
                    command += ["--bucket-mb", str(args.bucket_mb)]
                print(f"== {hosts} hosts at {rate} ({time.strftime('%H:%M:%S')})", flush=True)
                network.run_hosts(hosts, command, {}, args.timeout, port=PORT)
                for model, rows in json.loads(result.read_text()).items():
                    results["cells"].append({"hosts": hosts, "rate": rate, "model": model, "rows": rows})
                    print(table([results["cells"][-1]], base), flush=True)
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                Path(args.out).write_text(json.dumps(results, indent=1))
    finally:
        netlab.down(force=True)
    print(f"wrote {args.out}")
    return 0


def netlab_in_use() -> bool:
    """Whether a netlab is up already (perhaps another job's), said on stderr: a run then leaves
    it alone and does not start (also bench/duplex.py's)."""
    current = netlab.status()
    if current is not None:
        print(f"a netlab is up ({current.hosts} hosts at {current.rate}), perhaps another job's; "
              f"not touching it (`python -m sparsecomm netlab down` if it is a leftover)", file=sys.stderr)
    return current is not None


def table(cells: list[dict], base: str = "ddp") -> str:
    """Each cell's rows as text, the iteration divided by that of ``base``."""
    lines = []
    for cell in cells:
        rows = cell["rows"]
        ddp = rows.get(base, {}).get("t_iter")
        params = next(iter(rows.values())).get("params", 0)
        lines.append(f"{cell['model']} ({params / 1e6:.2f}M parameters), {cell['hosts']} hosts at {cell['rate']}; "
                     f"rank 0's medians of {next(iter(rows.values()))['steps']} steps, ms")
        head = (f"{'config':<22} {'iter':>7} {'/' + base:>5} {'fwd':>6} {'bwd':>7} {'step':>5} {'reduce':>7} "
                f"{'MB tx':>7} {'hidden':>6}")
        lines += [head, "-" * len(head)]
        for label, r in rows.items():
            h = hidden(rows, label)
            reduce = "" if r.get("t_reduce") is None else f"{r['t_reduce'] * 1e3:.1f}"
            ratio = "" if not ddp else f"{r['t_iter'] / ddp:.2f}"
            lines.append(f"{label:<22} {r['t_iter'] * 1e3:7.1f} {ratio:>5} {r['t_forward'] * 1e3:6.1f} "
                         f"{r['t_backward'] * 1e3:7.1f} {r['t_step'] * 1e3:5.1f} {reduce:>7} "
                         f"{r['tx_bytes'] / 1e6:7.3f} {'' if h is None else f'{h:.2f}':>6}")
        lines.append("")
    return "\n".join(lines)


PAIRS = [("fp16/bucket", "torch-fp16"), ("fp16+allreduce/bucket", "torch-fp16"), ("bf16/bucket", "torch-bf16"),
         ("powersgd/bucket", "torch-powersgd"), ("powersgd/model", "torch-powersgd")]


def markdown(cells: list[dict]) -> str:
    """Per model and host count: step ms (backward ms) per configuration and rate, MB this host
    sent per step, the hidden share; then ours against torch's hook of the same kind, and the
    fastest configuration at each rate."""
    lines = []
    groups: dict[tuple[str, int], list[dict]] = {}
    for c in cells:
        groups.setdefault((c["model"], c["hosts"]), []).append(c)
    for (model, hosts), group in groups.items():
        rates = [c["rate"] for c in group]
        lines += [f"**{model}, {hosts} hosts** (step ms, of which backward ms; MB sent per host per step; "
                  f"hidden share)", "",
                  "| configuration | " + " | ".join(rates) + " | MB sent | " + " | ".join(f"hidden {r}" for r in rates)
                  + " |", "| --- |" + " ---: |" * (2 * len(rates) + 1)]
        for label in group[0]["rows"]:
            rows = [c["rows"][label] for c in group]
            hid = [hidden(c["rows"], label) for c in group]
            lines.append(f"| {label} | " + " | ".join(f"{r['t_iter'] * 1e3:.0f} ({r['t_backward'] * 1e3:.0f})"
                                                        for r in rows)
                         + f" | {statistics.median(r['tx_bytes'] for r in rows) / 1e6:.3g} | "
                         + " | ".join("" if h is None else f"{h:.2f}" for h in hid) + " |")
        lines.append("")
        for ours, theirs in PAIRS:
            if ours in group[0]["rows"] and theirs in group[0]["rows"]:
                ratios = [c["rows"][ours]["t_iter"] / c["rows"][theirs]["t_iter"] for c in group]
                lines.append(f"- {ours} / {theirs}: " + ", ".join(f"{r} {x:.2f}x" for r, x in zip(rates, ratios)))
        for c in group:
            timed = {k: v["t_iter"] for k, v in c["rows"].items() if k != "local"}
            best = min(timed, key=timed.get)
            best_torch = min((k for k in timed if k == "ddp" or k.startswith("torch-")), key=timed.get)
            best_ours = min((k for k in timed if "/" in k), key=timed.get)
            lines.append(f"- {c['rate']}: fastest {best} ({timed[best] * 1e3:.0f} ms); ours {best_ours} "
                         f"{timed[best_ours] * 1e3:.0f} ms against torch's {best_torch} {timed[best_torch] * 1e3:.0f} ms "
                         f"({timed[best_ours] / timed[best_torch]:.2f}x); no exchange "
                         f"{c['rows']['local']['t_iter'] * 1e3:.0f} ms")
        lines.append("")
    return "\n".join(lines)


def show(args: argparse.Namespace) -> int:
    cells = [c for f in args.results for c in json.loads(Path(f).read_text())["cells"]]
    print(markdown(cells) if args.markdown else table(cells))
    return 0


# ---------------------------------------------------------------------------- validate
def _model_gradients(model: str, workers: int) -> tuple[list[Any], list[Any], list[float]]:
    """Each worker's flat gradient of ``model`` on its own synthetic batch (as the workers made
    them), the parameter shapes, and the share of backward done when each parameter's gradient
    existed (worker 0, mean of three backwards after one)."""
    import torch

    from sparsecomm import reducers
    from sparsecomm.models import build_model
    from sparsecomm.tools.costmodel import BackwardClock

    name, options = SHAPES[model]
    torch.manual_seed(0)
    net = build_model(name, **options)
    params = [q for q in net.parameters() if q.requires_grad]
    flat = reducers.bind_flat_gradients(params)
    clock = BackwardClock(params)
    grads, shares = [], []
    for r in range(workers):
        x, y = _batch(model, torch.Generator().manual_seed(1000 + r))
        for rep in range(4 if r == 0 else 1):
            flat.zero_()
            _, ready = clock.backward(_loss(model, net, x, y))
            if r == 0 and rep:
                shares.append(ready)
        grads.append(flat.clone())
    clock.close()
    return grads, [q.shape for q in params], [sum(c) / len(c) for c in zip(*shares)]


def priced(label: str, grads: list[Any], shapes: list[Any], ready: list[float], density: float) -> Any:
    """Configuration ``label`` as the cost model prices it (a :class:`PricedMethod`), profiled once
    for every rate; None for one it does not model (``METHOD+allreduce``)."""
    from sparsecomm.tools import costmodel

    method, scope = (("exact" if label == "ddp" else label).split("/") + ["bucket"])[:2]
    if "+" in method:
        return None
    bucket_mb = 1024.0 if label == "torch-powersgd" else 25.0  # torch's PowerSGD ran in one bucket
    return costmodel.price_method(method, grads, shapes, ready, density, scope=scope, bucket_mb=bucket_mb)


def predicted(rows: dict[str, dict], method: Any, links: Any, rate_bps: float) -> float:
    """The cost model's step for a configuration priced by :func:`priced`: the measured floor
    (``local``: forward, backward and step without exchange) plus what the model says the
    exchange adds: all of it after backward in model scope, what runs past backward's end by
    bucket."""
    local = rows["local"]
    return local["t_iter"] + method.seconds(local["t_forward"], local["t_backward"], links, rate_bps)["exposed"]


def validate(args: argparse.Namespace) -> int:
    """Predicted against measured steps for every configuration of the results files."""
    from sparsecomm.tools import costmodel

    links = costmodel.Links.load(args.links)
    cells = [c for f in args.results for c in json.loads(Path(f).read_text())["cells"]]
    head = f"{'hosts':>5} {'rate':>8} {'model':<10} {'config':<16} {'measured ms':>11} {'predicted ms':>12} {'error':>7}"
    print(head)
    print("-" * len(head))
    errors = []
    made: dict[tuple[str, int], tuple] = {}
    methods: dict[tuple[str, int, str], Any] = {}
    for cell in cells:
        key = (cell["model"], cell["hosts"])
        if key not in made:
            made[key] = _model_gradients(*key)
        rate = netlab.parse_rate(cell["rate"]) or 0.0
        for label, row in cell["rows"].items():
            if label == "local":
                continue
            if (*key, label) not in methods:  # profiled once, priced at every rate
                methods[(*key, label)] = priced(label, *made[key], args.density)
            method = methods[(*key, label)]
            if method is None:
                continue
            guess = predicted(cell["rows"], method, links, rate)
            error = guess / row["t_iter"] - 1
            errors.append(error)
            print(f"{cell['hosts']:>5} {cell['rate']:>8} {cell['model']:<10} {label:<16} {row['t_iter'] * 1e3:>11.1f} "
                  f"{guess * 1e3:>12.1f} {error:>+7.0%}")
    within = sum(abs(e) <= 0.2 for e in errors)
    print(f"{within} of {len(errors)} within 20%; median |error| {statistics.median(abs(e) for e in errors):.0%}")
    return 0


def run_verbs(verbs: Any, configs: str, models: str, out: str) -> tuple[Any, Any, Any]:
    """The ``run``, ``worker`` and ``table`` verbs with their shared options (also
    bench/fsdp_links.py's)."""
    r = verbs.add_parser("run")
    r.add_argument("--hosts", default="2")
    r.add_argument("--rates", default="100mbit,1gbit,10gbit")
    r.add_argument("--models", default=models)
    r.add_argument("--timeout", type=float, default=3600)
    r.add_argument("--out", default=out)
    w = verbs.add_parser("worker")
    w.add_argument("--models", required=True)
    w.add_argument("--result", required=True)
    for q in (r, w):
        q.add_argument("--configs", default=configs)
        q.add_argument("--density", type=float, default=0.01)
        q.add_argument("--steps", type=int, default=3)
        q.add_argument("--rounds", type=int, default=3)
    t = verbs.add_parser("table")
    t.add_argument("results", nargs="+")
    return r, w, t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True)
    r, w, t = run_verbs(verbs, CONFIGS, "mnist_cnn,resnet20", "bench/results/ddp_links.json")
    for q in (r, w):
        q.add_argument("--bucket-mb", type=float, default=None,
                       help="DDP's bucket_cap_mb (none: DDP's default, a first bucket of 1 MB, then 25 MB; a value "
                            "given, even 25, makes every bucket that size)")
    t.add_argument("--markdown", action="store_true", help="docs/benchmarks.md's tables and ratios")
    v = verbs.add_parser("validate", help="the cost model's predicted steps against the measured ones")
    v.add_argument("results", nargs="+")
    v.add_argument("--links", default=str(ROOT / "bench" / "links.json"))
    v.add_argument("--density", type=float, default=0.01, help="the density the results were measured at")
    args = p.parse_args(argv)
    return {"run": run, "worker": worker, "table": show, "validate": validate}[args.verb](args)


if __name__ == "__main__":
    sys.exit(main())
