"""Gloo's collectives that move the same bytes, on hosts joined by rate-limited links, with the
calling thread idle or busy.

Each of 2 hosts holds a row of ``--values`` float16 values (by default 1,181,066 of them, 2.36
MB: the MNIST CNN's first DDP bucket, 98% of its gradient) and, after a barrier, starts one
collective asynchronously, keeps its own thread busy for ``--busy`` milliseconds (matrix products
standing for the backward pass that DDP's communication runs beside), then waits. Each of these
puts the row's bytes on each host's link once (at 2 hosts; with more, they would not move the
same bytes, so the benchmark runs 2):

  - ``all_reduce``   the row summed (what DDP and PyTorch's ``fp16_compress_hook`` send)
  - ``all_gather``   every row gathered into one table (``all_gather_single``, formerly ``all_gather_into_tensor``; what
                     sparsecomm's casts send with ``exchange="gather"``, a window at a time)
  - ``send_recv``    the row sent to the peer while the peer's is received (``isend`` and
                     ``irecv``)
  - ``all_to_all``   each row sent whole to every worker (``all_to_all_single``)

Reported: rank 0's median, fastest and slowest of ``--repeats`` timed collectives, per rate,
busy time and collective. One more collective runs first, untimed, and its result is checked
against the rows every worker holds (each is drawn from a generator seeded with its rank).

    .venv/bin/python bench/duplex.py run --rates 100mbit,1gbit --busy 0,80 --repeats 8

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
HOSTS = 2


def row_of(rank: int, values: int) -> Any:
    """Worker ``rank``'s row: ``values`` float16 values drawn from a generator seeded with it."""
    import torch
    return torch.randn(values, generator=torch.Generator().manual_seed(rank)).half()


def start(kind: str, row: Any, table: Any) -> tuple[list[Any], Any]:
    """Start collective ``kind`` of ``row`` between the 2 workers: its works, and the tensor that
    holds its result once they are done (``table``, 2 rows, for all but the all-reduce)."""
    import torch.distributed as dist
    if kind == "all_reduce":
        total = row.clone()
        return [dist.all_reduce(total, async_op=True)], total
    if kind == "all_gather":
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the newer name where it exists
        return [gather(table, row, async_op=True)], table
    if kind == "all_to_all":
        return [dist.all_to_all_single(table, row.repeat(HOSTS), async_op=True)], table
    if kind == "send_recv":
        peer = 1 - dist.get_rank()
        return [dist.isend(row, peer), dist.irecv(table[:row.numel()], peer)], table[:row.numel()]
    raise ValueError(f"unknown collective {kind!r}; expected one of {KINDS}")


def check(kind: str, result: Any, values: int) -> None:
    """Raise unless ``result`` holds what collective ``kind`` should have given this worker."""
    import torch
    import torch.distributed as dist
    rows = [row_of(r, values) for r in range(HOSTS)]
    if kind == "all_reduce":
        expected = rows[0] + rows[1]  # two float16 rows: one rounding, whichever order
    elif kind == "send_recv":
        expected = rows[1 - dist.get_rank()]
    else:
        expected = torch.cat(rows)
    if not torch.equal(result, expected):
        raise RuntimeError(f"{kind}: rank {dist.get_rank()} did not receive what the other worker sent")


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
    if dist.get_world_size() != HOSTS:
        raise ValueError(f"bench/duplex.py runs on {HOSTS} workers, not {dist.get_world_size()}")
    row = row_of(dist.get_rank(), values)
    table = torch.empty(HOSTS * values, dtype=torch.float16)
    work = torch.randn(256, 256)
    rows = []
    for ms in busy_ms:
        for kind in kinds:
            times = []
            for i in range(repeats + 1):
                dist.barrier()
                t0 = time.perf_counter()
                works, result = start(kind, row, table)
                busy(ms / 1e3, work)
                for w in works:
                    w.wait()
                if i:  # the first is warm-up, and checked
                    times.append(time.perf_counter() - t0)
                else:
                    check(kind, result, values)
                    table.zero_()
            rows.append({"collective": kind, "busy_ms": ms, "bytes": 2 * values, "median": statistics.median(times),
                         "min": min(times), "max": max(times), "repeats": repeats})
    return rows


def worker(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rows = measure(args.kinds, args.values, args.busy, args.repeats)
    if dist.get_rank() == 0:
        Path(args.result).write_text(json.dumps(rows))
    dist.destroy_process_group()
    return 0


def table(cells: list[dict]) -> str:
    lines = ["rate      busy ms  collective   median ms  fastest  slowest"]
    for c in cells:
        lines.append(f"{c['rate']:<8}  {c['busy_ms']:>7g}  {c['collective']:<11}  "
                     f"{c['median'] * 1e3:>9.1f}  {c['min'] * 1e3:>7.1f}  {c['max'] * 1e3:>7.1f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if ddp_links.netlab_in_use():
        return 2
    cells: list[dict] = []
    scratch = Path(tempfile.mkdtemp(prefix="duplex-"))
    try:
        for rate in args.rates.split(","):
            netlab.down(force=True)
            netlab.up(HOSTS, rate)
            result = scratch / f"{rate}.json"
            command = [sys.executable, str(Path(__file__).resolve()), "worker", "--kinds", ",".join(args.kinds),
                       "--values", str(args.values), "--busy", ",".join(map(str, args.busy)),
                       "--repeats", str(args.repeats), "--result", str(result)]
            print(f"== {HOSTS} hosts at {rate} ({time.strftime('%H:%M:%S')})", flush=True)
            network.run_hosts(HOSTS, command, {}, args.timeout, port=PORT)
            rows = [{"hosts": HOSTS, "rate": rate, **r} for r in json.loads(result.read_text())]
            cells += rows
            print(table(rows), flush=True)
    finally:
        netlab.down(force=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join([sys.executable] + sys.argv), "cells": cells},
                                             indent=1))
        print(f"wrote {args.out}")
    return 0


def collectives(text: str) -> list[str]:
    """``--kinds``: some of :data:`KINDS`, comma-separated."""
    kinds = text.split(",")
    for kind in kinds:
        if kind not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown collective {kind!r}; expected some of {', '.join(KINDS)}")
    return kinds


def milliseconds(text: str) -> list[float]:
    """``--busy``: milliseconds >= 0, comma-separated."""
    try:
        values = [float(b) for b in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not v >= 0 for v in values):
        raise argparse.ArgumentTypeError(f"milliseconds >= 0, comma-separated, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    verbs = p.add_subparsers(dest="verb", required=True)
    r = verbs.add_parser("run")
    r.add_argument("--rates", default="100mbit")
    r.add_argument("--timeout", type=float, default=900)
    r.add_argument("--out", default=None, help="also write the rows here as JSON")
    w = verbs.add_parser("worker")
    w.add_argument("--result", required=True)
    for q in (r, w):
        q.add_argument("--kinds", type=collectives, default=list(KINDS), help=f"some of {','.join(KINDS)}")
        q.add_argument("--values", type=int, default=1_181_066, help="float16 values per worker")
        q.add_argument("--busy", type=milliseconds, default=[0.0, 80.0],
                       help="milliseconds the calling thread stays busy, comma-separated (default 0,80)")
        q.add_argument("--repeats", type=int, default=8)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    return {"run": run, "worker": worker}[args.verb](args)


if __name__ == "__main__":
    sys.exit(main())
