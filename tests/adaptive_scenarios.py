"""Worker functions for tests/test_adaptive_lowrank.py: Accordion and LEGACY driven through
epochs with begin_epoch, on gradients whose per-tensor norms follow a known plan.

Gradients are a pure function of (rank, epoch, step), so the test process can rebuild every
worker's inputs and feed them to the single-process references.
"""
from __future__ import annotations

import io
from typing import Any, Sequence

import torch

from reducer_scenarios import flat, rank
from sparsecomm import reducers

# Three tensors; every norm is exact: a fixed pattern per (rank, tensor) times a plan scale,
# with random signs per step (a sign flip leaves the norm unchanged).
ACCORDION_SHAPES = ((40, 25), (200,), (30, 20))


def accordion_scale(rank: int, epoch: int, tensor: int) -> float:
    """Rank 0's plan: tensor 0 drops to 0.4x from epoch 6 (a change of 0.6), tensor 1 jumps
    3x from epoch 2 (a change of 2), tensor 2 grows 1.3x from epoch 6 (0.3, under 0.5). The
    other ranks' tensor 0 jumps 10x at epochs 2-3 (their own norms would call it critical;
    the decision is rank 0's)."""
    if tensor == 0:
        s = 0.4 if epoch >= 6 else 1.0
        if rank != 0 and epoch in (2, 3):
            s *= 10.0
        return s
    if tensor == 1:
        return 3.0 if epoch >= 2 else 1.0
    return 1.3 if epoch >= 6 else 1.0


def accordion_grads(rank: int, epoch: int, step: int, shapes=ACCORDION_SHAPES) -> list[torch.Tensor]:
    out = []
    for i, shape in enumerate(shapes):
        pattern = torch.randn(shape, generator=torch.Generator().manual_seed(1000 * rank + i)) * 0.01
        signs = torch.randint(0, 2, shape, generator=torch.Generator().manual_seed(7919 * rank + 101 * epoch
                                                                                  + 13 * step + i)) * 2 - 1
        out.append(pattern * signs * accordion_scale(rank, epoch, i))
    return out


# Tensors full of equal |x| for the tie rule: random, small integers, all equal (a different
# value per rank), one value, two and three equal values, zeros, -1/0/1.
TIED_SHAPES = ((40, 25), (200,), (40,), (1,), (2,), (3,), (30, 20), (64,))


def tied_grads(rank: int, epoch: int, step: int, shapes=TIED_SHAPES) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5003 * rank + 101 * epoch + step)
    n = [torch.Size(s).numel() for s in shapes]
    flat_grads = [torch.randn(n[0], generator=gen), torch.randint(-3, 4, (n[1],), generator=gen).float(),
                  torch.full((n[2],), 0.25 * (rank + 1)), torch.randn(n[3], generator=gen), torch.full((n[4],), 0.5),
                  torch.full((n[5],), -0.5), torch.zeros(n[6]), torch.randint(-1, 2, (n[7],), generator=gen).float()]
    return [t.view(s) for t, s in zip(flat_grads, shapes)]


def run_epochs(name: str, plan: Sequence[tuple[int | None, float | None, float | None]], steps_per_epoch: int = 2,
               options: dict | None = None, grads=accordion_grads, density: float = 0.05,
               save_after: int | None = None) -> dict[str, Any]:
    """For each (epoch, lr, total) in ``plan``: call begin_epoch (unless epoch is None, which
    runs the steps without any begin_epoch call, as epoch 0) and reduce ``steps_per_epoch``
    steps. Reports per-step averages, residuals, stats and describe(). With ``save_after``,
    the reducer is saved after that many entries of the plan, restored into a new reducer
    (through torch.save / torch.load(weights_only=True)), and the restored one carries on
    (begin_epoch is called on it again for the next entry, as the training loop does)."""
    me = rank()
    r = reducers.build(name, density=density, **(options or {}))
    out: dict[str, Any] = {"avg": [], "memory": [], "stats": [], "describe": []}
    for e, (epoch, lr, total) in enumerate(plan):
        if save_after is not None and e == save_after:
            buf = io.BytesIO()
            torch.save(r.state_dict(), buf)
            buf.seek(0)
            r = reducers.build(name, density=density, **(options or {}))
            r.load_state_dict(torch.load(buf, weights_only=True))
        if epoch is not None:
            r.begin_epoch(epoch, lr, total)
        for t in range(steps_per_epoch):
            avg = r.reduce(grads(me, 0 if epoch is None else epoch, t))
            out["avg"].append(flat(avg))
            out["memory"].append(flat(r.residual))
            out["stats"].append(r.stats)
        out["describe"].append(r.describe())
    return out
