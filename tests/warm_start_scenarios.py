"""Worker functions for tests/test_warm_start.py and tests/test_tracking.py: the threshold
methods (ExDyna, MiCRO, SAGE) on gradients whose scale jumps, with options.

Gradients are a pure function of (rank, step), so the test process can rebuild every worker's
inputs and feed them to the single-process references.
"""
from __future__ import annotations

import io
from typing import Any

import torch

from reducer_scenarios import SHAPES, drifting_grads, flat, make_grads, rank
from sparsecomm import reducers

JUMP_D = 100_000
PHASE = 60  # steps at scale 1, then 10x, then 1 again


def jump_scale(step: int, phase: int = PHASE) -> float:
    return 10.0 if phase <= step < 2 * phase else 1.0


def jumping_grads(rank: int, step: int, phase: int = PHASE) -> list[torch.Tensor]:
    """``0.01 * scale * spread * N(0, 1)`` over 100,000 coordinates: a fixed log-normal spread
    per coordinate (heavier tails than a Gaussian), a fresh draw per rank and step, the scale
    jumping 10x at ``phase`` and back at ``2 * phase`` (the recipe of bench/warm_start.py)."""
    spread = torch.exp(0.5 * torch.randn(JUMP_D, generator=torch.Generator().manual_seed(1)))
    noise = torch.randn(JUMP_D, generator=torch.Generator().manual_seed(1_000 * step + rank + 7))
    g = noise * spread * (0.01 * jump_scale(step, phase))
    return [g[:60_000].view(600, 100), g[60_000:]]


def small_jumping_grads(rank: int, step: int) -> list[torch.Tensor]:
    """The distributed tests' gradients (SHAPES), 10x larger from step 8 to 19: enough to
    drive the controllers outside their bands in both directions within 30 steps."""
    scale = 10.0 if 8 <= step < 20 else 1.0
    return [g * scale for g in make_grads(SHAPES, rank, step)]


def skewed_grads(rank: int, step: int) -> list[torch.Tensor]:
    """Partitions that differ as NeuMF's do: the last fifth of the vector (the MLP) holds
    values 20x larger than the rest (the embeddings)."""
    g = torch.randn(50_000, generator=torch.Generator().manual_seed(100 * rank + step)) * 0.001
    g[40_000:] *= 20.0
    return [g[:40_000].view(400, 100), g[40_000:]]


def track(name: str, recipe: str, steps: int, density: float = 0.01, options: dict | None = None,
          error_feedback: bool = True) -> list[dict[str, Any]]:
    """Per-step stats of ``name`` on the gradients of ``recipe`` (a function of this module or
    of reducer_scenarios)."""
    grads = globals()[recipe]
    me = rank()
    r = reducers.build(name, density=density, error_feedback=error_feedback, **(options or {}))
    out = []
    for t in range(steps):
        r.reduce(grads(me, t))
        s = r.stats
        out.append({k: s[k] for k in ("density", "local_density", "threshold", "gamma") if k in s})
    return out


def run_small(name: str, steps: int, options: dict | None = None, density: float = 0.05) -> dict[str, Any]:
    """Averages, residuals and stats of ``steps`` steps on :func:`small_jumping_grads`."""
    me = rank()
    r = reducers.build(name, density=density, **(options or {}))
    out: dict[str, Any] = {"avg": [], "memory": [], "stats": []}
    for t in range(steps):
        avg = r.reduce(small_jumping_grads(me, t))
        out["avg"].append(flat(avg))
        out["memory"].append(flat(r.residual))
        out["stats"].append(r.stats)
    return out


def resume_mid_run(name: str, options: dict | None = None, total: int = 30, cut: int = 22,
                   density: float = 0.05) -> dict[str, Any]:
    """``total`` steps straight, against ``cut`` steps, save (through torch.save and
    torch.load(weights_only=True)), a new reducer, the rest. Reports whether averages,
    residuals and states agree bit for bit, and the controller state at the cut."""
    me = rank()
    opts = options or {}
    straight = reducers.build(name, density=density, **opts)
    expected = [flat(straight.reduce(small_jumping_grads(me, t))) for t in range(total)]
    first = reducers.build(name, density=density, **opts)
    for t in range(cut):
        first.reduce(small_jumping_grads(me, t))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    second = reducers.build(name, density=density, **opts)
    second.load_state_dict(state)
    got = [flat(second.reduce(small_jumping_grads(me, t))) for t in range(cut, total)]
    same = all(torch.equal(a, b) for a, b in zip(expected[cut:], got))
    same = same and torch.equal(flat(straight.residual), flat(second.residual))
    same = same and straight.state_dict()["method_state"]["control"] == second.state_dict()["method_state"]["control"]
    return {"same": same, "control": state["method_state"]["control"]}


__all__ = ["drifting_grads", "jumping_grads", "small_jumping_grads", "skewed_grads", "track", "run_small",
           "resume_mid_run"]
