"""Functions the cluster's workers run: build a reducer, feed it known gradients, report back.

Gradients are a pure function of (seed, rank, step), so the test process can rebuild every
worker's inputs and feed them to the single-process reference.
"""
from __future__ import annotations

import io
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from sparsecomm import reducers

SHAPES = ((40, 30), (30,), (7, 3, 3, 3), (0,), (500,), (13,))


def make_grads(shapes: Sequence[Sequence[int]], rank: int, step: int, seed: int = 0, scale: float = 0.02,
               dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + rank * 10_007 + step * 101 + 7)
    return [(torch.randn(tuple(s), generator=gen) * scale).to(dtype) for s in shapes]


def flat(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        return torch.empty(0)
    return torch.cat([t.detach().reshape(-1).cpu() for t in tensors])


def same_state(a: Any, b: Any) -> bool:
    """Two saved states (nested dicts, lists, tensors, numbers) equal, tensors bit for bit and
    of one dtype."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same_state, a, b))
    return a == b


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def run_steps(name: str, density: float = 0.05, steps: int = 5, shapes=SHAPES, seed: int = 0,
              scale: float = 0.02, dtype: torch.dtype = torch.float32, error_feedback: bool = True,
              options: dict | None = None, solo: bool = False, into_grads: bool = False) -> dict[str, Any]:
    """Reduce ``steps`` steps of known gradients; report averages, residuals and stats. With
    ``into_grads`` the average is written over the gradients (``out=grads``)."""
    group = reducers.SoloCommunicator() if solo else None
    r = reducers.build(name, density=density, error_feedback=error_feedback, seed=seed, group=group,
                       **(options or {}))
    out: dict[str, Any] = {"avg": [], "memory": [], "stats": []}
    me = 0 if solo else rank()
    for t in range(steps):
        g = make_grads(shapes, me, t, seed, scale, dtype)
        avg = r.reduce(g, out=g) if into_grads else r.reduce(g)
        if into_grads:
            assert all(a is b for a, b in zip(avg, g)), "out= must return the given tensors"
        assert [a.shape for a in avg] == [x.shape for x in g], "shapes changed"
        assert all(a.dtype == x.dtype and a.device == x.device for a, x in zip(avg, g)), "dtype/device changed"
        out["avg"].append(flat(avg))
        out["memory"].append(flat(r.residual))
        out["stats"].append(r.stats)
    out["describe"] = r.describe()
    return out


def resume_matches(name: str, density: float = 0.05, total: int = 8, cut: int = 4, seed: int = 3,
                   options: dict | None = None) -> bool:
    """Run ``total`` steps; separately run ``cut`` steps, save, restore into a new reducer
    (through torch.save / torch.load(weights_only=True)) and run the rest. True when both
    produce bit-identical averages, residuals and states."""
    me = rank()
    opts = options or {}

    def grads(t: int) -> list[torch.Tensor]:
        return make_grads(SHAPES, me, t, seed)

    straight = reducers.build(name, density=density, seed=seed, **opts)
    expected = [flat(straight.reduce(grads(t))) for t in range(total)]

    first = reducers.build(name, density=density, seed=seed, **opts)
    for t in range(cut):
        first.reduce(grads(t))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    second = reducers.build(name, density=density, seed=seed, **opts)
    second.load_state_dict(state)
    got = [flat(second.reduce(grads(t))) for t in range(cut, total)]
    same = all(torch.equal(a, b) for a, b in zip(expected[cut:], got))
    same = same and torch.equal(flat(straight.residual), flat(second.residual))
    return same and second.steps == straight.steps


def call_reduce(name: str, grads_by_rank: Callable[[int, int], list[torch.Tensor]], steps: int = 1,
                density: float = 0.05, options: dict | None = None) -> list[dict[str, Any]]:
    """Reduce ``grads_by_rank(rank, step)`` for ``steps`` steps; report stats and outputs."""
    me = rank()
    r = reducers.build(name, density=density, **(options or {}))
    out = []
    for t in range(steps):
        g = grads_by_rank(me, t)
        before = flat(r.residual) if r.residual else torch.zeros_like(flat(g))
        avg = r.reduce(g)
        out.append({"avg": flat(avg), "memory": flat(r.residual), "memory_before": before, "stats": r.stats,
                    "x": flat(g), "shapes": [tuple(a.shape) for a in avg], "dtypes": [a.dtype for a in avg]})
    return out


# --------------------------------------------------------------- gradient recipes for edge cases
def zeros_grads(rank: int, step: int) -> list[torch.Tensor]:
    return [torch.zeros(10, 3), torch.zeros(5)]


def empty_grads(rank: int, step: int) -> list[torch.Tensor]:
    return [torch.zeros(0), torch.zeros(0, 4)]


def no_grads(rank: int, step: int) -> list[torch.Tensor]:
    return []


def tiny_grads(rank: int, step: int) -> list[torch.Tensor]:
    """d = 3, smaller than most worker counts."""
    return make_grads(((3,),), rank, step, scale=1.0)


def half_grads(rank: int, step: int) -> list[torch.Tensor]:
    return make_grads(((30, 20), (7,)), rank, step, scale=0.05, dtype=torch.float16)


def bf16_grads(rank: int, step: int) -> list[torch.Tensor]:
    return make_grads(((30, 20), (7,)), rank, step, scale=0.05, dtype=torch.bfloat16)


def nan_on_rank1_step1(rank: int, step: int) -> list[torch.Tensor]:
    g = make_grads(((20, 5), (9,)), rank, step)
    if rank == 1 and step == 1:
        g[1][3] = float("nan")
    return g


def inf_on_rank0_step0(rank: int, step: int) -> list[torch.Tensor]:
    g = make_grads(((20, 5), (9,)), rank, step)
    if rank == 0 and step == 0:
        g[0][2, 2] = float("-inf")
    return g


def shapes_differ_by_rank(rank: int, step: int) -> list[torch.Tensor]:
    return make_grads(((10, 4), (3,)) if rank == 0 else ((10, 4), (4,)), rank, step)


def count_differs_by_rank(rank: int, step: int) -> list[torch.Tensor]:
    return make_grads(((10, 4), (3,)) if rank == 0 else ((10, 4),), rank, step)


def shape_changes_on_rank1(rank: int, step: int) -> list[torch.Tensor]:
    return make_grads(((10, 4), (3,)) if rank != 1 or step == 0 else ((10, 4), (2,)), rank, step)


def shape_changes_everywhere(rank: int, step: int) -> list[torch.Tensor]:
    return make_grads(((10, 4), (3,)) if step == 0 else ((10, 5), (3,)), rank, step)


SETTLE = 300


def drifting_grads(rank: int, step: int, d: int = 20_000, seed: int = 11) -> list[torch.Tensor]:
    """Gaussian gradients with a fixed per-coordinate spread: constant scale for ``SETTLE``
    steps, then the scale drifts up by a factor of 2 and back down over the next 400."""
    import math

    spread = torch.rand(d, generator=torch.Generator().manual_seed(seed)) + 0.5
    gen = torch.Generator().manual_seed(seed * 7919 + rank * 104_729 + step)
    scale = 0.01 * 2 ** math.sin(math.pi * max(0, step - SETTLE) / 400)
    g = torch.randn(d, generator=gen) * spread * scale
    return [g[:8000].view(-1, 4), g[8000:]]


def track_density(name: str, steps: int = SETTLE + 400, density: float = 0.01) -> list[dict[str, float]]:
    """Per-step density stats of ``name`` on :func:`drifting_grads`."""
    me = rank()
    r = reducers.build(name, density=density)
    out = []
    for t in range(steps):
        r.reduce(drifting_grads(me, t))
        s = r.stats
        out.append({k: s[k] for k in ("density", "local_density", "threshold")})
    return out


def exdyna_partitions(steps: int = 60, d: int = 50_000, density: float = 0.01) -> list[dict[str, Any]]:
    """ExDyna's partition bounds and owned partition at every step, on skewed gradients."""
    me = rank()
    r = reducers.build("exdyna", density=density)
    out = []
    for t in range(steps):
        gen = torch.Generator().manual_seed(me * 1000 + t)
        g = torch.randn(d, generator=gen) * 0.01
        g[: d // 5] *= 6.0  # the head of the vector holds most large values
        r.reduce([g])
        parts = r.partitions
        out.append({"bounds": parts.bounds(), "blocks": list(parts.blocks), "block_size": parts.block_size,
                    "num_blocks": parts.num_blocks, "min_blocks": parts.min_blocks,
                    "owned": parts.owned(t + 1, me), "counts_stat": r.stats["density"]})
    return out
