"""Straightforward single-process references of each method, fed with all workers' inputs.

Written from the papers and docs/reducers.md, independently of the package's code paths (loops over workers,
plain masks, no padding or packing). Only the random streams are shared with the package
(random-k's draw, SAGE's sample positions), since a reference must draw the same numbers.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from sparsecomm.reducers.select.primitives import sample_distinct, slovin_sample_size

# name -> function(simulation, xs) -> (avg, positions zeroed in each worker's residual). More
# families register theirs from tests/reference_*.py (imported at the end of this module).
METHODS: dict[str, Callable] = {}
# Methods whose residuals come from arithmetic that may round differently in one process than
# across several (matrix products): compared to float tolerance instead of bit for bit.
APPROXIMATE: set[str] = set()


def has_reference(name: str) -> bool:
    """Does ``name`` have a single-process reference (registered, or a Simulation method)?"""
    return name in METHODS or callable(getattr(Simulation, "_" + name, None))


def reference(name: str, approximate: bool = False) -> Callable:
    def register(fn: Callable) -> Callable:
        METHODS[name] = fn
        if approximate:
            APPROXIMATE.add(name)
        return fn
    return register


def k_of(density: float, n: int) -> int:
    if n == 0:
        return 0
    return min(n, max(1, math.floor(density * n * (1 + 1e-12))))


def lam0(k: int) -> float:
    return 1.0 / (2.0 * math.sqrt(max(k, 1)))


def sizes_of(shapes: Sequence[Sequence[int]]) -> list[int]:
    return [math.prod(s) for s in shapes]


def segments_of(shapes) -> list[tuple[int, int]]:
    out, at = [], 0
    for n in sizes_of(shapes):
        out.append((at, at + n))
        at += n
    return out


def above(x: torch.Tensor, lam: float) -> torch.Tensor:
    return torch.nonzero(x.abs() >= lam).view(-1)


def halvings(top: int) -> list[int]:
    """top, ceil(top / 2), ... down to 1, returned smallest first."""
    out = [max(1, top)]
    while out[-1] != 1:
        out.append(-(-out[-1] // 2))
    return list(reversed(out))


def warm_threshold(domains: list[torch.Tensor], top: int, target: float) -> float | None:
    """The warm start from docs/reducers.md: each worker's m-th largest |x| over its domain for
    m in halvings(top) (m capped at the domain's size), a count estimate per worker that is
    straight in log(count) against log(lambda) between those points, 1/lambda below the last
    (up to the domain's size) and 0 above the largest; the answer is the smallest reported
    value where the estimates add up to at most target, interpolated log-log towards the
    reported value just below it."""
    ms = halvings(top)
    curves = []
    for dom in domains:
        n = dom.numel()
        if n == 0:
            continue
        ordered = torch.sort(dom.abs(), descending=True).values
        curves.append((n, [(min(m, n), float(ordered[min(m, n) - 1])) for m in ms]))

    def count(n: int, points, lam: float) -> float:
        if lam > points[0][1]:
            return 0.0
        for (m1, u1), (m2, u2) in zip(points, points[1:]):
            if u1 >= lam > u2:
                if u2 > 0 and m2 > m1:
                    return m1 * math.exp(math.log(m2 / m1) * math.log(u1 / lam) / math.log(u1 / u2))
                return float(m1)
        m_last, u_last = points[-1]
        return float(m_last) if m_last >= n else min(float(n), m_last * (u_last / lam))

    def total(lam: float) -> float:
        s = 0.0
        for n, points in curves:
            s += count(n, points, lam)
        return s

    values = sorted({u for _, points in curves for _, u in points if u > 0})
    if not values:
        return None
    for i, lam in enumerate(values):  # smallest first
        t_a = total(lam)
        if t_a <= target:
            if i == 0 or t_a <= 0 or t_a >= target:
                return lam
            lam_b = values[i - 1]
            t_b = total(lam_b)
            return lam * (lam_b / lam) ** (math.log(target / t_a) / math.log(t_b / t_a))
    return values[-1]


def gather_sum(xs: list[torch.Tensor], sel: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each worker's own pairs, added in worker order, divided by P where anything arrived."""
    P = len(xs)
    avg = torch.zeros_like(xs[0])
    touched = torch.zeros(xs[0].numel(), dtype=torch.bool)
    for x, s in zip(xs, sel):
        avg[s] += x[s]
        touched[s] = True
    avg[touched] = avg[touched] / P if P > 1 else avg[touched]
    return avg, sel


def union_reduce(xs: list[torch.Tensor], sel: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Everyone's values at the union of all selections."""
    P = len(xs)
    mask = torch.zeros(xs[0].numel(), dtype=torch.bool)
    for s in sel:
        mask[s] = True
    union = torch.nonzero(mask).view(-1)
    total = torch.zeros(union.numel(), dtype=xs[0].dtype)
    for x in xs:
        total += x[union]
    avg = torch.zeros_like(xs[0])
    avg[union] = total / P if P > 1 else total
    return avg, [union] * P


class Simulation:
    """Runs one method for P simulated workers, step by step."""

    def __init__(self, name: str, P: int, shapes, density: float, seed: int = 0, error_feedback: bool = True,
                 **options: Any) -> None:
        self.name, self.P, self.shapes, self.c = name, P, shapes, density
        self.seed, self.ef, self.options = seed, error_feedback, options
        self.d = sum(sizes_of(shapes))
        self.m = [torch.zeros(self.d) for _ in range(P)]
        self.t = 0
        self.state: dict[str, Any] = {}
        self.stats: dict[str, Any] = {}

    def step(self, grads: list[list[torch.Tensor]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Feed every worker's gradient list; returns (avg, new residual per worker)."""
        dtype = grads[0][0].dtype if grads[0] else torch.float32
        flat_g = [torch.cat([g.reshape(-1) for g in gs]) if gs else torch.empty(0, dtype=dtype) for gs in grads]
        if self.t == 0:
            self.m = [torch.zeros(self.d, dtype=dtype) for _ in range(self.P)]
        xs = [m + g if self.ef else g.clone() for m, g in zip(self.m, flat_g)]
        method = METHODS.get(self.name) or getattr(self, "_" + self.name)
        avg, sent = method(self, xs) if self.name in METHODS else method(xs)
        if self.ef and self.name != "exact":
            new = []
            for x, s in zip(xs, sent):
                x = x.clone()
                if isinstance(s, torch.Tensor) and s.dtype.is_floating_point:
                    x -= s  # a dense approximation was sent
                else:
                    x[s] = 0
                new.append(x)
            self.m = new
        elif self.name == "exact":
            self.m = [torch.zeros_like(x) for x in xs]
        self.t += 1
        return avg, self.m

    def begin_epoch(self, epoch: int, lr: float, epochs: float) -> None:
        """The training context some methods need (see Reducer.begin_epoch)."""
        self.state.setdefault("epochs", []).append((epoch, lr, epochs))
        self.state["epoch"], self.state["lr"], self.state["total_epochs"] = epoch, lr, epochs

    # ----------------------------------------------------------------- methods
    def _exchange(self, xs, sel):
        if self.options.get("exchange", "gather") == "union":
            return union_reduce(xs, sel)
        return gather_sum(xs, sel)

    def _exact(self, xs):
        total = torch.zeros_like(xs[0])
        for x in xs:
            total += x
        return total / self.P, [None] * self.P

    def _topk(self, xs):
        sel = []
        for x in xs:
            parts = []
            for a, b in segments_of(self.shapes):
                k = k_of(self.c, b - a)
                if k:
                    parts.append(torch.topk(x[a:b].abs(), k).indices + a)
            sel.append(torch.cat(parts) if parts else torch.empty(0, dtype=torch.long))
        return self._exchange(xs, sel)

    def _global_topk(self, xs):
        k = k_of(self.c, self.d)
        return self._exchange(xs, [torch.topk(x.abs(), k).indices for x in xs])

    def _randomk(self, xs):
        if "gen" not in self.state:
            self.state["gen"] = torch.Generator().manual_seed(self.seed)
        pos = sample_distinct(self.d, k_of(self.c, self.d), self.state["gen"])
        total = torch.zeros(pos.numel(), dtype=xs[0].dtype)
        for x in xs:
            total += x[pos]
        avg = torch.zeros_like(xs[0])
        avg[pos] = total / self.P if self.P > 1 else total
        return avg, [pos] * self.P

    def _thresh(self, xs):
        if self.options.get("threshold") is not None:
            lams = [(0, self.d, self.options["threshold"])]
        elif self.options.get("scope") == "layer":
            lams = [(a, b, lam0(k_of(self.c, b - a))) for a, b in segments_of(self.shapes)]
        else:
            lams = [(0, self.d, lam0(k_of(self.c, self.d)))]
        sel = [torch.cat([above(x[a:b], lam) + a for a, b, lam in lams]) if lams else torch.empty(0, dtype=torch.long)
               for x in xs]
        return self._exchange(xs, sel)

    def _sage(self, xs):
        st = self.state
        k = k_of(self.c, self.d)
        fast = self.options.get("controller", "fast") == "fast"
        if "gen" not in st:
            st["gen"] = torch.Generator().manual_seed(self.seed)
            st["lam"] = lam0(k)
        n_s = slovin_sample_size(self.d, self.options.get("sample_error", 0.05))
        pos = torch.randint(0, max(self.d, 1), (n_s,), generator=st["gen"])
        means = [float(x[pos].abs().float().mean()) if n_s else 0.0 for x in xs]
        s = 0.0
        for v in means:  # rank order
            s += v
        s /= self.P
        if "s_prev" not in st and self.options.get("warm_start", True):
            lam = warm_threshold(xs, min(self.d, 2 * k), self.P * k)
            if lam is not None:
                st["lam"] = lam
        if "s_prev" in st:
            prev = st["s_prev"]
            alpha = s / prev if prev and s else 1.0
            exam = sum(int((x.abs() >= st["lam"] * alpha).sum()) for x in xs) / (self.P * self.d)
            beta = 2.0 / (1.0 + math.exp(self.c - exam))
            ratio = exam / self.c
            if fast and (ratio < 0.5 or ratio > 2):  # fast: ratio ** 0.1 outside 0.5-2, within [0.5, 2]
                gamma = min(2.0, max(0.5, ratio ** 0.1))
            elif ratio < 0.1:
                gamma = 0.95
            elif ratio > 10:
                gamma = 1.05
            else:
                gamma = 1.0
            st["lam"] = st["lam"] * alpha * beta * gamma
        st["s_prev"] = s
        return self._exchange(xs, [above(x, st["lam"]) for x in xs])

    def _partitioned(self, xs, bounds: list[tuple[int, int]]):
        st = self.state
        k = k_of(self.c, self.d)
        fast = self.options.get("controller", "fast") == "fast"
        if "lam" not in st:
            st["lam"] = lam0(k)
            st["descent"] = 0.0
            if self.options.get("warm_start", True):  # worker r owns partition r at step 0
                lam = warm_threshold([x[a:b] for x, (a, b) in zip(xs, bounds)], k, k)
                if lam is not None:
                    st["lam"] = lam
        sel, counts = [], []
        for r, x in enumerate(xs):
            a, b = bounds[(self.t + r) % self.P]
            s = above(x[a:b], st["lam"]) + a
            if s.numel() == 0 and b > a:
                s = torch.tensor([a + self.t % (b - a)])
            sel.append(s)
            counts.append(s.numel())
        union = torch.cat(sel)
        total = torch.zeros(union.numel(), dtype=xs[0].dtype)
        for x in xs:
            total += x[union]
        avg = torch.zeros_like(xs[0])
        avg[union] = total / self.P if self.P > 1 else total
        # threshold control for the next step
        r_ = sum(counts) / max(k, 1)
        if fast and r_ <= 0.909:
            # downward steps start at 0.995 and grow (in log) by min(1.5, r^-0.25) per step
            # below the band, never past halving
            if st["descent"] == 0.0:
                st["descent"] = -math.log(0.995)
            else:
                grow = 1.5 if r_ == 0 else min(1.5, r_ ** -0.25)
                st["descent"] = min(math.log(2.0), max(-math.log(0.995), st["descent"] * grow))
            f = math.exp(-st["descent"])
        else:
            st["descent"] = 0.0
            if r_ > 1.1:
                f = max(1.005, min(2.0, r_ ** 0.1)) if fast else 1.005
            elif r_ <= 0.909:
                f = 0.995
            else:
                f = 1.00125 if r_ > 1 else (0.9987 if r_ < 1 else 1.0)
        st["lam"] = st["lam"] * f
        st["last_counts"] = counts
        return avg, [union] * self.P

    def _micro(self, xs):
        q, rem = divmod(self.d, self.P)
        bounds, at = [], 0
        for p in range(self.P):
            n = q + (1 if p < rem else 0)
            bounds.append((at, at + n))
            at += n
        return self._partitioned(xs, bounds)

    def _exdyna(self, xs):
        st = self.state
        B = self.options.get("num_blocks", 1024)
        align = self.options.get("block_align", 32)
        if "blocks" not in st:
            size = (self.d // B) // align * align
            if size == 0:
                size, B = align, self.d // align
            st["size"], st["B"] = size, B
            st["blocks"] = [B // self.P + (1 if p < B % self.P else 0) for p in range(self.P)]
        else:  # rebalance with last step's counts, by partition
            counts = [0] * self.P
            for r, c in enumerate(st["last_counts"]):
                counts[(self.t - 1 + r) % self.P] = c
            total = sum(counts)
            if total > 0 and self.P > 1:
                avg = total / self.P
                shift = int(st["size"] * total / self.d)
                est = [float(c) for c in counts]
                low, high, floor_ = 0.95238, 1.05, st["B"] / (4 * self.P)
                for p in range(self.P - 1):
                    l, r = est[p] / avg, est[p + 1] / avg
                    if l > high and r < low and st["blocks"][p] - 1 >= floor_:
                        st["blocks"][p] -= 1
                        st["blocks"][p + 1] += 1
                        est[p] -= shift
                        est[p + 1] += shift
                    elif l < low and r > high and st["blocks"][p + 1] - 1 >= floor_:
                        st["blocks"][p] += 1
                        st["blocks"][p + 1] -= 1
                        est[p] += shift
                        est[p + 1] -= shift
        bounds, at = [], 0
        for p, n in enumerate(st["blocks"]):
            start = at * st["size"]
            at += n
            bounds.append((start, at * st["size"] if p < self.P - 1 else self.d))
        return self._partitioned(xs, bounds)


def _load_families() -> None:
    import importlib
    from pathlib import Path

    for path in sorted(Path(__file__).parent.glob("reference_*.py")):
        importlib.import_module(path.stem)


_load_families()
