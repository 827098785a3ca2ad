"""Single-process references of CLT-k, gTop-k and DEFT, written from the papers and docs/reducers.md with plain
loops over the simulated workers (nothing from the package's code paths)."""
from __future__ import annotations

import math

import torch

from reducer_reference import k_of, reference, sizes_of


def mean_at(xs: list[torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """Everyone's values at ``positions`` summed in worker order, divided by P, elsewhere 0."""
    P = len(xs)
    total = torch.zeros(positions.numel(), dtype=xs[0].dtype)
    for x in xs:
        total += x[positions]
    avg = torch.zeros_like(xs[0])
    avg[positions] = total / P if P > 1 else total
    return avg


@reference("cltk")
def cltk(sim, xs):
    k = k_of(sim.c, sim.d)
    leader = sim.t % sim.P
    chosen = torch.topk(xs[leader].abs(), k).indices if k else torch.empty(0, dtype=torch.long)
    sim.stats["leader"] = leader
    return mean_at(xs, chosen), [chosen] * sim.P


# ------------------------------------------------------------------------------------ gTop-k
def _merge(a: dict, b: dict, k: int) -> dict:
    """Two sparse vectors {position: 0-d tensor}: summed where both hold a value, cut back to
    the k largest |value|, ties to the lower position."""
    merged = dict(a)
    for i, v in b.items():
        merged[i] = merged[i] + v if i in merged else v
    ranked = sorted(merged.items(), key=lambda item: (-abs(float(item[1])), item[0]))
    return dict(ranked[:k])


@reference("gtopk")
def gtopk(sim, xs):
    P, k = sim.P, k_of(sim.c, sim.d)
    if k == 0:
        empty = torch.empty(0, dtype=torch.long)
        return torch.zeros_like(xs[0]), [empty] * P
    held = []
    for x in xs:  # every worker's own top-k pairs
        top = torch.topk(x.abs(), k).indices.tolist()
        held.append({i: x[i].clone() for i in top})
    q = 1
    while 2 * q <= P:
        q *= 2
    for r in range(q, P):  # extra workers hand their pairs down
        held[r - q] = _merge(held[r - q], held[r], k)
    step = 1
    while step < q:  # recursive doubling among the first q workers
        held = [_merge(held[r], held[r ^ step], k) if r < q else held[r] for r in range(P)]
        step *= 2
    sets = [sorted(held[r]) for r in range(q)]
    assert all(s == sets[0] for s in sets), "partners disagree on the global set"
    chosen = torch.tensor(sets[0], dtype=torch.long)
    sim.stats["global_set"] = chosen
    return mean_at(xs, chosen), [chosen] * P


# -------------------------------------------------------------------------------------- DEFT
def deft_units(shapes, P: int) -> list[tuple[int, int]]:
    sizes = sizes_of(shapes)
    d = sum(sizes)
    units, start = [], 0
    for n in sizes:
        if n > d / P:
            lengths = [n // P + (1 if i < n % P else 0) for i in range(P)]
        else:
            lengths = [n]
        for length in lengths:
            if length:
                units.append((start, start + length))
            start += length
    return units


def deft_k(norms: list[float], sizes: list[int], k: int) -> list[int]:
    ranked = sorted(range(len(norms)), key=lambda u: (-norms[u], u))
    out = [0] * len(norms)
    left_k, left_norm = k, sum(norms)
    for u in ranked:
        temp = int(left_k * (norms[u] / left_norm)) if left_norm > 0 and left_k > 0 else 0
        out[u] = sizes[u] if sizes[u] < temp else max(1, temp)
        left_k -= out[u]
        left_norm -= norms[u]
    for u in ranked:  # hand out what is left, same order
        if left_k <= 0:
            break
        extra = min(sizes[u] - out[u], left_k)
        out[u] += extra
        left_k -= extra
    return out


def deft_bins(sizes: list[int], ks: list[int], P: int) -> list[int]:
    cost = [sizes[u] * math.log2(ks[u]) if ks[u] > 1 else sizes[u] for u in range(len(sizes))]
    ranked = sorted(range(len(sizes)), key=lambda u: (-cost[u], u))
    load = [0.0] * P
    bins = [-1] * len(sizes)
    for u in ranked:
        if ks[u] == sizes[u]:
            continue
        target = min(range(P), key=lambda b: (load[b], b))
        bins[u] = target
        load[target] += cost[u]
    return bins


@reference("deft")
def deft(sim, xs):
    P, t = sim.P, sim.t
    units = deft_units(sim.shapes, P)
    sizes = [b - a for a, b in units]
    k = k_of(sim.c, sim.d)
    ks = []
    for x in xs:  # every worker shares k by its own norms
        norms = [float(torch.linalg.vector_norm(x[a:b].float())) for a, b in units]
        ks.append(deft_k(norms, sizes, k))
    leader = t % P
    bins = deft_bins(sizes, ks[leader], P)
    selected = []
    for r, x in enumerate(xs):
        mine = (t + r) % P
        for u, (a, b) in enumerate(units):
            if bins[u] == mine:
                selected.append(torch.topk(x[a:b].abs(), ks[r][u]).indices + a)
    for u, (a, b) in enumerate(units):
        if bins[u] == -1:
            selected.append(torch.arange(a, b))
    union = torch.cat(selected) if selected else torch.empty(0, dtype=torch.long)
    assert union.numel() == torch.unique(union).numel(), "DEFT's selections overlap"
    sim.stats.update(units=units, ks=ks, bins=bins)
    return mean_at(xs, union), [union] * P
