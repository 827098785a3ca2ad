"""Merging consecutive layers into groups for merged-gradient sparsification (OMGS-SGD,
Shi et al., INFOCOM 2020) and its accuracy-guided variant (AGTF).

Layers are listed in the order backward produces their gradients (the last layer first).
Each group of consecutive layers is sparsified (top-k) as soon as its last gradient exists,
inline with backward, and its selection is then all-gathered on the network while backward
goes on. With linear cost models for sparsification ``S(n) = a_s + b_s n`` (n elements) and
communication ``C(k) = a_c + b_c k`` (k selected elements), and measured per-layer backward
times ``tau``, the predicted iteration time of a grouping is the finish time of this pipeline:

    t = 0; c = 0
    for each group g:  t += sum(tau over g) + S(n_g)      # backward and inline selection
                       c  = max(t, c) + C(k_g)            # one communication at a time
    T = max(t, c)

:func:`best_grouping` finds a grouping of minimal T exactly, by dynamic programming over the
group boundaries that keeps, for every prefix of layers, every (t, c) pair not dominated by
another; an optional ``allowed(i, j)`` restricts which groups may be formed (AGTF's rule that a
fusion must not raise the sparsification noise, :func:`fusion_allowed`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

__all__ = ["LinearCost", "predicted_time", "best_grouping", "fit_linear", "sparsification_noise",
           "fusion_allowed", "groups_from_sizes"]


@dataclass(frozen=True)
class LinearCost:
    """``a + b * n`` seconds."""

    a: float
    b: float

    def __call__(self, n: float) -> float:
        return self.a + self.b * n

    def as_list(self) -> list[float]:
        return [self.a, self.b]


def fit_linear(sizes: Sequence[float], seconds: Sequence[float]) -> LinearCost:
    """Least-squares ``a + b n`` through measurements, with a and b kept >= 0."""
    n = len(sizes)
    if n == 0:
        return LinearCost(0.0, 0.0)
    mx = sum(sizes) / n
    my = sum(seconds) / n
    var = sum((x - mx) ** 2 for x in sizes)
    b = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / var if var > 0 else 0.0
    b = max(b, 0.0)
    a = max(my - b * mx, 0.0)
    return LinearCost(a, b)


def predicted_time(groups: Sequence[tuple[int, int]], backward: Sequence[float], sizes: Sequence[int],
                   selected: Sequence[float], select_cost: LinearCost, comm_cost: LinearCost) -> float:
    """The pipeline's finish time for ``groups`` given as ``[start, end)`` layer ranges in backward order."""
    t = c = 0.0
    for i, j in groups:
        t += sum(backward[i:j]) + select_cost(sum(sizes[i:j]))
        c = max(t, c) + comm_cost(sum(selected[i:j]))
    return max(t, c)


def best_grouping(backward: Sequence[float], sizes: Sequence[int], selected: Sequence[float],
                  select_cost: LinearCost, comm_cost: LinearCost,
                  allowed: Callable[[int, int], bool] | None = None) -> tuple[list[tuple[int, int]], float]:
    """A grouping of layers ``0..L-1`` (backward order) into consecutive ``[i, j)`` ranges of
    minimal :func:`predicted_time`, among the groups ``allowed(i, j)`` permits (every
    single-layer group is always permitted). Returns ``(groups, predicted time)``."""
    L = len(sizes)
    if L == 0:
        return [], 0.0
    pre_b, pre_n, pre_k = [0.0], [0], [0.0]
    for b, n, k in zip(backward, sizes, selected):
        pre_b.append(pre_b[-1] + b)
        pre_n.append(pre_n[-1] + n)
        pre_k.append(pre_k[-1] + k)
    # fronts[j]: non-dominated (t, c, previous boundary, index into fronts[previous boundary])
    fronts: list[list[tuple[float, float, int, int]]] = [[(0.0, 0.0, -1, -1)]] + [[] for _ in range(L)]
    for j in range(1, L + 1):
        candidates = []
        for i in range(j):
            if j - i > 1 and allowed is not None and not allowed(i, j):
                continue
            step_t = pre_b[j] - pre_b[i] + select_cost(pre_n[j] - pre_n[i])
            send = comm_cost(pre_k[j] - pre_k[i])
            for idx, (t, c, _, _) in enumerate(fronts[i]):
                t2 = t + step_t
                candidates.append((t2, max(t2, c) + send, i, idx))
        candidates.sort(key=lambda e: (e[0], e[1]))
        front, best_c = [], float("inf")
        for entry in candidates:  # increasing t: keep an entry only if its c beats every smaller t
            if entry[1] < best_c:
                front.append(entry)
                best_c = entry[1]
        fronts[j] = front
    end = min(range(len(fronts[L])), key=lambda e: max(fronts[L][e][0], fronts[L][e][1]))
    total = max(fronts[L][end][0], fronts[L][end][1])
    groups, j, idx = [], L, end
    while j > 0:
        _, _, i, prev = fronts[j][idx]
        groups.append((i, j))
        j, idx = i, prev
    return groups[::-1], total


def sparsification_noise(sizes: Sequence[int], densities: Sequence[float], sq_norms: Sequence[float],
                         fused: bool) -> float:
    """AGTF's noise model for a set of layers: layer-wise ``sum (1/rho_i - 1) g_i``, fused
    ``(sum p_i / sum k_i - 1) * sum g_i`` with ``k_i = rho_i p_i``."""
    if fused:
        k = sum(r * p for r, p in zip(densities, sizes))
        return (sum(sizes) / k - 1.0) * sum(sq_norms) if k > 0 else float("inf")
    return sum((1.0 / r - 1.0) * g for r, g in zip(densities, sq_norms) if r > 0)


def fusion_allowed(sizes: Sequence[int], densities: Sequence[float], sq_norms: Sequence[float],
                   slack: float = 1e-12) -> Callable[[int, int], bool]:
    """``allowed(i, j)``: fusing layers ``i..j-1`` does not raise the sparsification noise."""
    def allowed(i: int, j: int) -> bool:
        p, r, g = sizes[i:j], densities[i:j], sq_norms[i:j]
        layerwise = sparsification_noise(p, r, g, fused=False)
        return sparsification_noise(p, r, g, fused=True) <= layerwise * (1 + slack) + slack
    return allowed


def groups_from_sizes(counts: Sequence[int], layers: int) -> list[tuple[int, int]]:
    """``[i, j)`` ranges from a list of group lengths (in layers) that must add up to ``layers``."""
    if any(c < 1 for c in counts) or sum(counts) != layers:
        raise ValueError(f"groups {list(counts)} must be positive layer counts adding up to {layers}")
    out, at = [], 0
    for c in counts:
        out.append((at, at + c))
        at += c
    return out
