"""Worker functions for the merged-sparsification tests."""
from __future__ import annotations

import torch
from torch import nn

from reducer_scenarios import flat, rank
from sparsecomm import reducers


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 32), nn.ReLU(),
                         nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def backward_steps(name: str, overlap: bool, steps: int = 4, groups=None, density: float = 0.1) -> dict:
    """Attach the reducer to a small model and reduce ``steps`` backward passes of known data
    (no optimizer step, so both modes see the same gradients)."""
    model = small_model()
    options = {"overlap": overlap} if groups is None else {"overlap": overlap, "groups": groups}
    r = reducers.build(name, density=density, **options)
    r.attach(model)
    out = {"avg": [], "memory": [], "overlapped": [], "bytes": []}
    for t in range(steps):
        gen = torch.Generator().manual_seed(rank() * 100 + t)
        x, y = torch.randn(8, 1, 8, 8, generator=gen), torch.randn(8, 5, generator=gen)
        model.zero_grad(set_to_none=False)
        ((model(x) - y) ** 2).mean().backward()
        grads = [p.grad for p in model.parameters()]
        r.reduce(grads, out=grads)
        out["avg"].append(flat(grads))
        out["memory"].append(flat(r.residual))
        out["overlapped"].append(r.stats["overlapped"])
        out["bytes"].append(r.stats["bytes_sent"])
    out["describe"] = r.describe()
    return out
