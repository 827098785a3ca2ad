"""Worker-side scenarios for the reducers' memory options: a narrow residual
(``residual_dtype``) and buffers dropped after each reduce (``keep_buffers=False``)."""
from __future__ import annotations

import torch

from reducer_scenarios import SHAPES, flat, make_grads, rank
from sparsecomm import reducers
from sparsecomm.reducers.layout import Layout

DENSITY = 0.05


def _in_one_buffer(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients as consecutive views of one flat buffer (as the training loop holds them)."""
    layout = Layout.of(grads)
    views = layout.split(torch.empty(layout.numel))
    torch._foreach_copy_(views, grads)
    return views


def narrow_residual_matches(name: str, dtype: str, steps: int = 5, seed: int = 3) -> dict:
    """The method with ``residual_dtype=dtype`` against itself with a float32 residual rounded
    to ``dtype`` in place after every step: averages and residuals bit-identical, for gradients
    given as separate tensors and as views of one buffer reduced in place."""
    me, narrow_dtype = rank(), getattr(torch, dtype)
    out = {}
    for flat_buffer in (False, True):
        narrow = reducers.build(name, density=DENSITY, seed=seed, residual_dtype=dtype)
        wide = reducers.build(name, density=DENSITY, seed=seed)
        same = True
        for t in range(steps):
            g1, g2 = make_grads(SHAPES, me, t, seed), make_grads(SHAPES, me, t, seed)
            if flat_buffer:
                g1, g2 = _in_one_buffer(g1), _in_one_buffer(g2)
                a1, a2 = narrow.reduce(g1, out=g1), wide.reduce(g2, out=g2)
            else:
                a1, a2 = narrow.reduce(g1), wide.reduce(g2)
            for m in wide.residual:
                m.copy_(m.to(narrow_dtype))
            same = same and torch.equal(flat(a1), flat(a2))
            if narrow.residual:
                same = same and all(m.dtype == narrow_dtype for m in narrow.residual)
                same = same and torch.equal(flat(narrow.residual).float(), flat(wide.residual))
        out["flat" if flat_buffer else "tensors"] = same
    return out


def released_buffers_match(name: str, steps: int = 4, seed: int = 5) -> dict:
    """The method with ``keep_buffers=False`` against the default: bit-identical averages,
    residuals and states; after each reduce only the residual is left in its workspace."""
    me = rank()
    lean = reducers.build(name, density=DENSITY, seed=seed, keep_buffers=False)
    kept = reducers.build(name, density=DENSITY, seed=seed)
    same, left = True, []
    for t in range(steps):
        g1, g2 = _in_one_buffer(make_grads(SHAPES, me, t, seed)), _in_one_buffer(make_grads(SHAPES, me, t, seed))
        same = same and torch.equal(flat(lean.reduce(g1, out=g1)), flat(kept.reduce(g2, out=g2)))
        same = same and torch.equal(flat(lean.residual), flat(kept.residual))
        left.append((sorted(lean.workspace.buffers), lean.workspace.feedback._x is None))
    s1, s2 = lean.state_dict(), kept.state_dict()
    same = same and s1["steps"] == s2["steps"] and (s1["residual"] is None) == (s2["residual"] is None)
    same = same and (s1["residual"] is None or torch.equal(s1["residual"], s2["residual"]))
    return {"same": same, "left": left, "kept_buffers": sorted(kept.workspace.buffers)}
