"""Gloo's collectives that move the same bytes, on hosts joined by rate-limited links, with the
calling thread idle or busy.

Each worker holds a row of ``--values`` float16 values (the MNIST CNN's gradient, 1,181,066 of
them, by default: 2.36 MB) and, after a barrier, starts one collective asynchronously, keeps its
own thread busy for ``--busy`` milliseconds (matrix products standing for the backward pass that
DDP's communication runs beside), then waits. Each of these puts every row's bytes on each
host's link once at 2 hosts:

  - ``all_reduce``   the row summed (what DDP and PyTorch's ``fp16_compress_hook`` send)
  - ``all_gather``   every row gathered into one table (``all_gather_single``, formerly ``all_gather_into_tensor``; what
                     sparsecomm's casts send with ``exchange="gather"``, a window at a time)
  - ``send_recv``    at 2 hosts: the row sent to the peer while the peer's is received
                     (``isend`` and ``irecv``)
  - ``all_to_all``   each row sent whole to every worker (``all_to_all_single``)

Reported: rank 0's median, fastest and slowest of ``--repeats`` timed collectives (one more
first, untimed), per host count, rate, busy time and collective, as JSON lines and a table.

    .venv/bin/python bench/duplex.py run --hosts 2 --rates 100mbit --busy 0,80 --repeats 8

Needs root and iproute2 (``sparsecomm.tools.netlab``); refuses to start while another netlab is up.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ddp_links  # bench/ddp_links.py: netlab_in_use
import network  # bench/network.py: run_hosts

from sparsecomm.tools import netlab

KINDS = ("all_reduce", "all_gather", "send_recv", "all_to_all")
PORT = 29660


def start(kind: str, row: Any, table: Any) -> list[Any]:
    """Start collective ``kind`` of ``row`` (results into ``table``, P rows); its works."""
    import torch.distributed as dist
    rank, size = dist.get_rank(), dist.get_world_size()
    if kind == "all_reduce":
        return [dist.all_reduce(row.clone(), async_op=True)]
    if kind == "all_gather":
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name where it exists
        return [gather(table, row, async_op=True)]
    if kind == "all_to_all":
        return [dist.all_to_all_single(table, row.repeat(size), async_op=True)]
    if kind == "send_recv":
        if size != 2:
            raise ValueError(f"send_recv is a 2-host collective, not one of {size} hosts")
        peer = 1 - rank
        return [dist.isend(row, peer), dist.irecv(table[:row.numel()], peer)]
    raise ValueError(f"unknown collective {kind!r}; expected one of {KINDS}")


def busy(seconds: float, work: Any) -> None:
    """Matrix products on this thread for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        work @ work


def measure(kinds: list[str], values: int, busy_ms: list[float], repeats: int) -> list[dict]:
    """Rank 0's rows: the times of each collective with each busy time (an initialised group)."""
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    row = torch.randn(values, generator=torch.Generator().manual_seed(dist.get_rank())).half()
    table = torch.empty(dist.get_world_size() * values, dtype=torch.float16)
    work = torch.randn(256, 256)
    rows = []
    for ms in busy_ms:
        for kind in kinds:
            times = []
            for i in range(repeats + 1):
                dist.barrier()
                t0 = time.perf_counter()
                works = start(kind, row, table)
                busy(ms / 1e3, work)
                for w in works:
                    w.wait()
                if i:  # the first is warm-up
                    times.append(time.perf_counter() - t0)
            rows.append({"collective": kind, "busy_ms": ms, "bytes": 2 * values, "median": statistics.median(times),
                         "min": min(times), "max": max(times), "repeats": repeats})
    return rows


def worker(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rows = measure(args.kinds.split(","), args.values, [float(b) for b in args.busy.split(",")], args.repeats)
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps(rows))
    dist.destroy_process_group()
    return 0


def table(cells: list[dict]) -> str:
    lines = ["hosts  rate      busy ms  collective   median ms  fastest  slowest"]
    for c in cells:
        lines.append(f"{c['hosts']:>5}  {c['rate']:<8}  {c['busy_ms']:>7g}  {c['collective']:<11}  "
                     f"{c['median'] * 1e3:>9.1f}  {c['min'] * 1e3:>7.1f}  {c['max'] * 1e3:>7.1f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if ddp_links.netlab_in_use():
        return 2
    kinds = args.kinds.split(",")
    cells: list[dict] = []
    scratch = Path(tempfile.mkdtemp(prefix="duplex-"))
    try:
        for hosts in [int(h) for h in args.hosts.split(",")]:
            for rate in args.rates.split(","):
                netlab.down(force=True)
                netlab.up(hosts, rate)
                result = scratch / f"h{hosts}-{rate}.json"
                wanted = [k for k in kinds if hosts == 2 or k != "send_recv"]
                command = [sys.executable, str(Path(__file__).resolve()), "worker", "--kinds", ",".join(wanted),
                           "--values", str(args.values), "--busy", args.busy, "--repeats", str(args.repeats),
                           "--result", str(result)]
                print(f"== {hosts} hosts at {rate} ({time.strftime('%H:%M:%S')})", flush=True)
                network.run_hosts(hosts, command, {}, args.timeout, port=PORT)
                rows = [{"hosts": hosts, "rate": rate, **r} for r in json.loads(result.read_text())]
                cells += rows
                print(table(rows), flush=True)
    finally:
        netlab.down(force=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join([sys.executable] + sys.argv), "cells": cells},
                                             indent=1))
        print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True)
    r = verbs.add_parser("run")
    r.add_argument("--hosts", default="2")
    r.add_argument("--rates", default="100mbit")
    r.add_argument("--timeout", type=float, default=900)
    r.add_argument("--out", default=None, help="also write the rows here as JSON")
    w = verbs.add_parser("worker")
    w.add_argument("--result", required=True)
    for q in (r, w):
        q.add_argument("--kinds", default=",".join(KINDS), help=f"some of {','.join(KINDS)}")
        q.add_argument("--values", type=int, default=1_181_066, help="float16 values per worker")
        q.add_argument("--busy", default="0,80", help="milliseconds the calling thread stays busy, comma-separated")
        q.add_argument("--repeats", type=int, default=8)
    args = p.parse_args(argv)
    for kind in args.kinds.split(","):
        if kind not in KINDS:
            p.error(f"--kinds: unknown collective {kind!r}; expected some of {', '.join(KINDS)}")
    return {"run": run, "worker": worker}[args.verb](args)


if __name__ == "__main__":
    sys.exit(main())
