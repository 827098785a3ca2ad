"""How much of the gradient exchange OMGS, and the training loop's bucket scope, hide behind backward.

Trains a real model on synthetic data with ``--workers`` gloo processes (default 2) and, for
each configuration, times whole iterations (forward, backward, reduce, optimizer step):

  - ``topk``            layer-wise top-k, exchanged after backward
  - ``global_topk``     top-k over the whole vector, exchanged after backward
  - ``omgs``            merged groups, each sparsified and sent while backward goes on
  - ``omgs-plain``      the same groups (``overlap=False``), everything after backward

Models: ``mnist_cnn`` (the small MNIST CNN, batch 64 per worker), ``lstm`` (the 2x200 PTB
LSTM on random tokens, batch 20, BPTT 20) or ``mlp`` (bench/ddp_overlap.py's MLP, batch 32).
Reported per configuration (rank 0, medians over the timed steps): iteration time, backward
time (OMGS's inline selection included), the time inside ``reduce``, the reducer's
select/communicate split and bytes sent. The hidden fraction is
``(T(omgs-plain) - T(omgs)) / t_comm(omgs-plain)``: the share of the plain exchange time that
overlapping removed from the iteration.

``--scopes METHOD,...`` compares instead, for each method, the training loop's two scopes with
the loop's own calls (``attach``, backward, ``reduce``): ``METHOD`` (model scope, everything
after backward) and ``METHOD-bucket`` (a ``BucketReducer``: groups of ``--bucket-mb`` reduced
on a worker thread as backward produces them); hidden fraction
``(T(METHOD) - T(METHOD-bucket)) / (t_select + t_comm)(METHOD)``. Configurations alternate
round by round (``--rounds``) so that a shared machine's load drifts over all alike.

    .venv/bin/python bench/overlap.py [--model mnist_cnn|lstm] [--density 0.01] [--steps 30]
    .venv/bin/python bench/overlap.py --scopes exact,topk,fp16 [--bucket-mb 1] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sparsecomm import reducers
from sparsecomm.models import build_model
from sparsecomm.reducers.buckets import BucketReducer

import gloo_workers  # bench/gloo_workers.py: the process harness
import results_files  # bench/results_files.py: earlier results are set aside

CONFIGS = {"topk": ("topk", {}), "global_topk": ("global_topk", {}), "omgs": ("omgs", {"overlap": True}),
           "omgs-plain": ("omgs", {"overlap": False})}


def make_task(model_name: str, rank: int):
    gen = torch.Generator().manual_seed(1000 + rank)
    if model_name == "mlp":  # bench/ddp_overlap.py's model: 784-1024x4-10, 3.96M parameters, batch 32
        layers = [torch.nn.Flatten(), torch.nn.Linear(784, 1024), torch.nn.ReLU()]
        for _ in range(3):
            layers += [torch.nn.Linear(1024, 1024), torch.nn.ReLU()]
        model = torch.nn.Sequential(*layers, torch.nn.Linear(1024, 10))
        data = [(torch.randn(32, 1, 28, 28, generator=gen), torch.randint(0, 10, (32,), generator=gen))
                for _ in range(4)]

        def loss(batch, state):
            x, y = batch
            return F.cross_entropy(model(x), y), state
    elif model_name == "mnist_cnn":
        model = build_model("mnist_cnn")
        data = [(torch.randn(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen))
                for _ in range(4)]

        def loss(batch, state):
            x, y = batch
            return F.cross_entropy(model(x), y), state
    else:
        model = build_model("lstm_lm", vocab_size=10000, emsize=200, nhid=200, nlayers=2, dropout=0.0,
                            tie_weights=False)
        data = [(torch.randint(0, 10000, (21, 20), generator=gen),) for _ in range(4)]

        def loss(batch, state):
            tokens = batch[0]
            hidden = model.init_hidden(20) if state is None else model.detach_hidden(state)
            logits, hidden = model(tokens[:-1], hidden)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[1:].reshape(-1)), hidden
    return model, data, loss


def run_config(label: str, args, rank: int, groups=None) -> dict:
    torch.manual_seed(0)
    name, options = CONFIGS[label]
    if name == "omgs" and groups is not None:
        options = {**options, "groups": groups}
    model, data, loss_fn = make_task(args.model, rank)
    r = reducers.build(name, density=args.density, **options)
    return Timed(r, model, data, loss_fn).run(args.warmup + args.steps, args.warmup)


class Timed:
    """One configuration: a model, its reducer (attached), its optimizer, and its step times."""

    def __init__(self, r, model, data, loss_fn) -> None:
        self.r, self.model, self.data, self.loss_fn = r, model, data, loss_fn
        r.attach(model)
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01)
        self.rows = {k: [] for k in ("t_iter", "t_forward", "t_backward", "t_reduce", "t_select", "t_comm",
                                     "bytes_sent")}
        self.state = None
        self.done = 0

    def run(self, steps: int, warmup: int = 0) -> dict:
        r, opt, loss_fn, data, rows = self.r, self.opt, self.loss_fn, self.data, self.rows
        params = [p for p in self.model.parameters()]
        for _ in range(steps):
            step, self.done = self.done, self.done + 1
            self._step(r, opt, loss_fn, data, rows, params, step, step >= warmup)
        return self.result()

    def result(self) -> dict:
        result = {k: statistics.median(v) for k, v in self.rows.items()}
        result["density"] = self.r.stats["density"]
        result["describe"] = self.r.describe()
        return result

    def _step(self, r, opt, loss_fn, data, rows, params, step, timed) -> None:
        batch = data[step % len(data)]
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss, self.state = loss_fn(batch, self.state)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        grads = [p.grad for p in params]
        r.reduce(grads, out=grads)
        t3 = time.perf_counter()
        opt.step()
        t4 = time.perf_counter()
        if timed:
            s = r.stats
            for key, value in (("t_iter", t4 - t0), ("t_forward", t1 - t0), ("t_backward", t2 - t1),
                               ("t_reduce", t3 - t2), ("t_select", s["t_select"]), ("t_comm", s["t_comm"]),
                               ("bytes_sent", s["bytes_sent"])):
                rows[key].append(value)


def scope_worker(rank: int, results: dict, args) -> None:
    """Each method of ``--scopes`` in model scope and in bucket scope, interleaved by rounds."""
    runs = {}
    for method in args.scopes.split(","):
        for label in (method, f"{method}-bucket"):
            torch.manual_seed(0)
            model, data, loss_fn = make_task(args.model, rank)
            # zeroed, not freed, between steps (as the loop keeps them): a BucketReducer reads p.grad in hooks
            for q in model.parameters():
                q.grad = torch.zeros_like(q)
            r = (BucketReducer(method, density=args.density, bucket_mb=args.bucket_mb) if label.endswith("-bucket")
                 else reducers.build(method, density=args.density))
            runs[label] = Timed(r, model, data, loss_fn)
            runs[label].run(args.warmup)
    for _ in range(args.rounds):
        for timed in runs.values():
            timed.run(args.steps, 0)
    for label, timed in runs.items():
        results[label] = timed.result()
        results[label]["describe"] = {"buckets": len(timed.r.describe().get("buckets", [])) or 1}


def worker(rank: int, results: dict, args) -> None:
    results["omgs"] = run_config("omgs", args, rank)
    groups = results["omgs"]["describe"]["groups"]  # the plain run uses the very same groups
    for label in ("omgs-plain", "topk", "global_topk"):
        results[label] = run_config(label, args, rank, groups=groups)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=("mnist_cnn", "lstm", "mlp"), default="mnist_cnn")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--scopes", default="", help="compare the loop's model and bucket scopes for these methods")
    p.add_argument("--bucket-mb", type=float, default=1.0, help="bucket size for --scopes")
    p.add_argument("--rounds", type=int, default=5, help="rounds of --steps steps for --scopes")
    p.add_argument("--out", default="bench/results/overlap.json")
    args = p.parse_args()
    if args.scopes:
        return scopes_main(args)
    results = gloo_workers.run(worker, args.workers, args, threads=args.threads)
    print(f"{args.model}, {args.workers} gloo workers x {args.threads} thread(s), density {args.density}; "
          f"medians of {args.steps} steps (rank 0), ms")
    head = f"{'config':<12} {'iteration':>10} {'forward':>9} {'backward':>9} {'reduce':>8} {'select':>8} {'comm':>8} {'KB sent':>9}"
    print(head)
    print("-" * len(head))
    for label in ("topk", "global_topk", "omgs-plain", "omgs"):
        r = results[label]
        print(f"{label:<12} {r['t_iter'] * 1e3:>10.2f} {r['t_forward'] * 1e3:>9.2f} {r['t_backward'] * 1e3:>9.2f} "
              f"{r['t_reduce'] * 1e3:>8.2f} {r['t_select'] * 1e3:>8.2f} {r['t_comm'] * 1e3:>8.2f} "
              f"{r['bytes_sent'] / 1e3:>9.1f}")
    plain, over = results["omgs-plain"], results["omgs"]
    hidden = (plain["t_iter"] - over["t_iter"]) / plain["t_comm"] if plain["t_comm"] > 0 else float("nan")
    info = over["describe"]
    print(f"\nOMGS groups (layers per group, backward order): {info['groups']}; fitted costs: "
          f"select {info['cost_model']['select']}, all-gather {info['cost_model']['comm']} (a s, b s/element)")
    print(f"hidden fraction of the exchange: (T(omgs-plain) - T(omgs)) / t_comm(omgs-plain) = {hidden:.2f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    results_files.keep_earlier(args.out)
    with open(args.out, "w") as f:
        json.dump({"command": " ".join([sys.executable] + sys.argv), "settings": vars(args), "results": results,
                   "hidden_fraction": hidden, "torch": str(torch.__version__)}, f, indent=1)
    print(f"wrote {args.out}")


def scopes_main(args) -> None:
    results = gloo_workers.run(scope_worker, args.workers, args, threads=args.threads)
    print(f"{args.model}, {args.workers} gloo workers x {args.threads} thread(s), density {args.density}, buckets of "
          f"{args.bucket_mb} MB; medians of {args.steps * args.rounds} steps (rank 0), ms")
    head = (f"{'config':<16} {'iteration':>10} {'backward':>9} {'reduce':>8} {'select':>8} {'comm':>8} "
            f"{'buckets':>8} {'hidden':>7}")
    print(head)
    print("-" * len(head))
    for label, r in results.items():
        hidden = ""
        if label.endswith("-bucket"):
            plain = results[label[:-len("-bucket")]]
            spent = plain["t_select"] + plain["t_comm"]
            r["hidden_fraction"] = (plain["t_iter"] - r["t_iter"]) / spent if spent > 0 else float("nan")
            hidden = f"{r['hidden_fraction']:.2f}"
        print(f"{label:<16} {r['t_iter'] * 1e3:>10.2f} {r['t_backward'] * 1e3:>9.2f} {r['t_reduce'] * 1e3:>8.2f} "
              f"{r['t_select'] * 1e3:>8.2f} {r['t_comm'] * 1e3:>8.2f} {r['describe']['buckets']:>8} {hidden:>7}")
    results_files.write(args.out, vars(args), results)


if __name__ == "__main__":
    main()
