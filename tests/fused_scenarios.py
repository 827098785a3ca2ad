"""Worker functions for tests/test_fused.py: the same gradients reduced with
``selection="torch"`` and ``selection="fused"``, reported for bit-exact comparison."""
from __future__ import annotations

import io
from typing import Any

import torch

from reducer_scenarios import SHAPES, flat, make_grads, rank
from sparsecomm import reducers


def _feed(r: reducers.Reducer, layout: str, t: int, scale: float, nan_at: tuple[int, int] | None) -> list[torch.Tensor]:
    g = make_grads(SHAPES, rank(), t, seed=5, scale=scale)
    if nan_at == (rank(), t):
        g[0][0, 0] = float("nan")
    if layout == "tensors":
        return r.reduce(g)
    buf = torch.empty(sum(x.numel() for x in g))
    views = reducers.Layout.of(g).split(buf)
    torch._foreach_copy_(views, g)
    return r.reduce(views, out=views)  # one flat buffer reduced in place: the one-pass path


def both_paths(name: str, steps: int = 6, density: float = 0.05, scale: float = 0.02,
               error_feedback: bool = True, options: dict | None = None,
               nan_at: tuple[int, int] | None = None) -> dict[str, Any]:
    """Every step's average, residual and stats under each selection and gradient layout, and
    the resolved selection (the reducer's describe())."""
    out: dict[str, Any] = {}
    for selection in ("torch", "fused"):
        for layout in ("flat", "tensors"):
            r = reducers.build(name, density=density, error_feedback=error_feedback, seed=2, selection=selection,
                               nonfinite="skip", **(options or {}))
            rows = []
            for t in range(steps):
                avg = _feed(r, layout, t, scale, nan_at)
                stats = {k: v for k, v in r.stats.items() if not k.startswith("t_")}
                rows.append((flat(avg).clone(), flat(r.residual).clone(), stats))
            out[selection, layout] = {"rows": rows, "describe": r.describe()}
    return out


def resume_across_paths(name: str, total: int = 6, cut: int = 3) -> bool:
    """``cut`` steps with selection="torch", state saved and restored into a reducer with
    selection="fused", the rest there: bit-identical to ``total`` straight steps with "torch"."""
    def grads(t: int) -> list[torch.Tensor]:
        return make_grads(SHAPES, rank(), t, seed=9)

    straight = reducers.build(name, density=0.05, seed=1, selection="torch")
    expected = [flat(straight.reduce(grads(t))) for t in range(total)]
    first = reducers.build(name, density=0.05, seed=1, selection="torch")
    for t in range(cut):
        first.reduce(grads(t))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = reducers.build(name, density=0.05, seed=1, selection="fused")
    second.load_state_dict(torch.load(buf, weights_only=True))
    got = [flat(second.reduce(grads(t))) for t in range(cut, total)]
    same = all(torch.equal(a, b) for a, b in zip(expected[cut:], got))
    return same and torch.equal(flat(straight.residual), flat(second.residual)) and second.describe()["selection"] == "fused"
