"""Functions the cluster's workers run for tests/test_wire.py: one reducer per wire format, fed
the same known gradients, with every collective's payload size logged."""
from __future__ import annotations

from typing import Any, Sequence

from sparsecomm import reducers
from reducer_scenarios import SHAPES, flat, make_grads, rank


def run_formats(name: str, formats: Sequence[tuple[str, str]], density: float = 0.05, steps: int = 3,
                options: dict | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """For each (values, indices) format: the averages, residuals, stats and the collectives
    (kind, bytes) of every step."""
    me = rank()
    out = {}
    for values, indices in formats:
        r = reducers.build(name, density=density, values=values, indices=indices, **(options or {}))
        log: list[tuple[str, int]] = []
        gather, reduce_ = r.comm.all_gather_async, r.comm.all_reduce_async_

        def logged_gather(t, _orig=gather, _log=log):
            _log.append(("gather", t.numel() * t.element_size()))
            return _orig(t)

        def logged_reduce(t, _orig=reduce_, _log=log):
            _log.append(("reduce", t.numel() * t.element_size()))
            return _orig(t)

        r.comm.all_gather_async, r.comm.all_reduce_async_ = logged_gather, logged_reduce
        res: dict[str, Any] = {"avg": [], "memory": [], "stats": [], "collectives": []}
        for t in range(steps):
            log.clear()
            res["avg"].append(flat(r.reduce(make_grads(SHAPES, me, t))))
            res["memory"].append(flat(r.residual))
            res["stats"].append(r.stats)
            res["collectives"].append(list(log))
        res["options"] = r.options()
        out[(values, indices)] = res
    return out


def edge_formats(recipe: str, names: Sequence[str], formats: Sequence[tuple[str, str]], steps: int = 2) -> dict:
    """Averages and residuals of each method and format on one of reducer_scenarios' edge-case
    gradient recipes (tiny, zero, empty, 16-bit gradients)."""
    import reducer_scenarios

    grads_of = getattr(reducer_scenarios, recipe)
    me = rank()
    out = {}
    for name in names:
        for values, indices in formats:
            r = reducers.build(name, density=0.05, values=values, indices=indices)
            rows = []
            for t in range(steps):
                g = grads_of(me, t)
                before = flat(r.residual) if r.residual else flat(g).float() * 0
                avg = r.reduce(g)
                rows.append((flat(avg), flat(r.residual), flat(g), before))
            out[(name, values, indices)] = rows
    return out
