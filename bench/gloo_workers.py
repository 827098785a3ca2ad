"""The benchmarks' process harness: one function on W processes of this machine, joined in one
process group over 127.0.0.1 (gloo, or NCCL with one GPU per rank), and rank 0's results back."""

from __future__ import annotations

import datetime
import json
import os
import socket
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(fn: Callable[..., None], world: int, *fn_args: Any, threads: int | None = None,
        backend: str = "gloo") -> dict[str, Any]:
    """Call ``fn(rank, results, *fn_args)`` on ``world`` spawned processes, each a rank of one
    process group, and return the ``results`` dict rank 0's call filled (JSON-able). ``fn``
    must be a module-level function (spawn pickles it by name); ``threads`` sets each
    process's torch threads; with ``backend="nccl"`` rank r uses GPU r mod the GPU count.
    A worker's exception stops the others and is raised here (mp.ProcessRaisedException)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank0.json")
        mp.spawn(_rank, args=(fn, world, free_port(), path, threads, backend, fn_args), nprocs=world, join=True)
        with open(path) as f:
            return json.load(f)


def _rank(rank: int, fn: Callable[..., None], world: int, port: int, path: str, threads: int | None,
          backend: str, fn_args: tuple) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=30))
    results: dict[str, Any] = {}
    try:
        fn(rank, results, *fn_args)
        if rank == 0:
            with open(path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()
