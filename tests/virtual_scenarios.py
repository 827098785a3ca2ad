"""What the virtual-worker tests run, in gloo processes and in one process of virtual workers,
on the same seeds."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from sparsecomm import reducers
from sparsecomm.reducers.comm.virtual import VirtualWorld
from reducer_scenarios import SHAPES, flat, make_grads, run_steps

# Options that make a method's decisions independent of timing (OMGS and AGTF fit their
# grouping to measured times otherwise, which differ between any two runs).
DETERMINISTIC = {"omgs": {"groups": [2, 4]}, "agtf": {"groups": [2, 4]}}
KEYS = ("bytes_sent", "bytes_wire", "density", "local_density", "skipped")


def cases() -> list[tuple[str, dict[str, Any]]]:
    return [(name, DETERMINISTIC.get(name, {})) for name in reducers.available()]


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {"avg": result["avg"], "memory": result["memory"],
            "stats": [{k: s.get(k) for k in KEYS} for s in result["stats"]]}


def methods_in_processes(cases: Sequence[tuple[str, dict]], steps: int, density: float) -> dict[str, Any]:
    """Every case on this gloo rank (a cluster job)."""
    return {name: _summary(run_steps(name, density=density, steps=steps, options=options))
            for name, options in cases}


def methods_virtual(cases: Sequence[tuple[str, dict]], P: int, steps: int, density: float) -> list[dict[str, Any]]:
    """Every case on P virtual workers fed the gradients rank r of a real job gets; by rank."""
    out: list[dict[str, Any]] = [{} for _ in range(P)]
    for name, options in cases:
        world = VirtualWorld(P)
        rs = [reducers.build(name, density=density, seed=0, group=world.communicator(r), **options) for r in range(P)]
        runs = [{"avg": [], "memory": [], "stats": []} for _ in range(P)]
        for t in range(steps):
            grads = [make_grads(SHAPES, r, t, 0) for r in range(P)]
            averages = world.run(lambda r: rs[r].reduce(grads[r]))
            for r in range(P):
                runs[r]["avg"].append(flat(averages[r]))
                runs[r]["memory"].append(flat(rs[r].residual))
                runs[r]["stats"].append(rs[r].stats)
        world.close()
        for r in range(P):
            out[r][name] = _summary(runs[r])
    return out


RING_SIZES = (1, 5, 1001, 2_200_000)  # the last: more than two 1 MiB segments per rank
RING_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def ring_inputs(P: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    """Values of mixed magnitudes, so that the order of additions shows in the bits."""
    gen = torch.Generator().manual_seed(n * 31 + P)
    return [(torch.randn(n, generator=gen) * 10.0 ** torch.randint(-4, 5, (n,), generator=gen)).to(dtype)
            for _ in range(P)]


def gloo_all_reduces() -> list[torch.Tensor]:
    """dist.all_reduce of :func:`ring_inputs` on this rank, for every size and dtype."""
    P, me = dist.get_world_size(), dist.get_rank()
    out = []
    for n in RING_SIZES:
        for dtype in RING_DTYPES:
            t = ring_inputs(P, n, dtype)[me].clone()
            dist.all_reduce(t)
            out.append(t)
    return out


def train_tiny_cifar(overrides: list[str]) -> dict[str, Any]:
    """:func:`train_scenarios.train` accepting the tests' tiny CIFAR batches (their md5 sums
    cannot be the published ones, which torchvision checks)."""
    import torchvision.datasets.cifar as cifar

    import train_scenarios

    cifar.check_integrity = lambda *args, **kwargs: True
    return train_scenarios.train(overrides)


def resident_growth(method: str, workers: int, sizes: Sequence[int], bound: bool, steps: int = 4) -> dict[str, int]:
    """In a fresh process: the growth of the resident set's peak over ``steps`` reduces of
    ``workers`` virtual workers (random gradients of tensors of ``sizes``), against the
    trainer's memory estimate; with ``bound``, after :func:`bound_host_allocator`."""
    from sparsecomm.train.workers import bound_host_allocator, memory_estimate

    def peak() -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM"))

    torch.set_num_threads(1)
    if bound:
        assert bound_host_allocator()
    grads = [torch.zeros(n) for n in sizes]
    build = lambda comm: reducers.build(method, density=0.01, group=comm)  # noqa: E731
    estimate = memory_estimate(grads, build, workers)
    before = peak()
    world = VirtualWorld(workers)
    rs = [build(world.communicator(r)) for r in range(workers)]
    layout = reducers.Layout.of(grads)
    generator = torch.Generator().manual_seed(0)
    flats = [torch.empty(layout.numel) for _ in range(workers)]
    split = [layout.split(f) for f in flats]
    for _ in range(steps):
        for f in flats:
            f.normal_(0, 0.01, generator=generator)
        world.run(lambda r: rs[r].reduce(split[r], out=split[r]))
    return {"estimate": estimate, "growth": peak() - before}
