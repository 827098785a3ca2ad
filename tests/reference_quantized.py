"""Single-process references of the quantizers (QSGD, TernGrad, EF-SignSGD, signSGD with
majority vote, fp16/bf16 casting) and of DGC, written from the papers and docs/reducers.md with
plain loops over the simulated workers and their tensors (registered into
reducer_reference.METHODS on import).

Only the random streams are shared with the package, since a reference must draw the same
numbers: QSGD and TernGrad draw ``torch.rand(d)`` per worker and step from a generator seeded
with ``seed * 65537 + rank`` (float32, float64 for float64 gradients); DGC draws the uniform
numbers behind its sample positions, ``torch.rand(S, dtype=float64)`` for the S samples of all
sampled tensors in tensor order, from one generator seeded with ``seed`` for all workers.
"""
from __future__ import annotations

import math

import torch

from reducer_reference import gather_sum, k_of, reference, segments_of


def _cdtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _streams(sim) -> list[torch.Generator]:
    """Each worker's rounding stream."""
    if "gens" not in sim.state:
        sim.state["gens"] = [torch.Generator().manual_seed(sim.seed * 65_537 + w) for w in range(sim.P)]
    return sim.state["gens"]


def _mean(qs: list[torch.Tensor]) -> torch.Tensor:
    """Sum in worker order, divided by P."""
    total = torch.zeros_like(qs[0])
    for q in qs:
        total += q
    return total / len(qs) if len(qs) > 1 else total


# ----------------------------------------------------------------------------------- QSGD
@reference("qsgd")
def qsgd(sim, xs):
    s = sim.options.get("levels", 7)
    size = sim.options.get("bucket_size", 512)
    cdtype = _cdtype(xs[0])
    qs = []
    for x, gen in zip(xs, _streams(sim)):
        u = torch.rand(x.numel(), generator=gen, dtype=cdtype)
        q = torch.zeros(x.numel(), dtype=cdtype)
        for a, b in segments_of(sim.shapes):
            for start in range(a, b, size or max(b - a, 1)):
                end = min(start + size, b) if size else b
                v = x[start:end].to(cdtype)
                norm = torch.linalg.vector_norm(v)
                if norm == 0:
                    continue
                r = v.abs() * (s / norm)
                level = torch.floor(r)
                level = torch.clamp(level + (u[start:end] < r - level), max=s)
                value = level * (norm / s)
                q[start:end] = torch.where(v < 0, -value, value)
        qs.append(q.to(x.dtype))
    return _mean(qs), [x.clone() for x in xs]  # unbiased, no residual


# -------------------------------------------------------------------------------- TernGrad
@reference("terngrad")
def terngrad(sim, xs):
    clip = sim.options.get("clip", 2.5)
    cdtype = _cdtype(xs[0])
    segments = segments_of(sim.shapes)
    gs = []
    for x in xs:
        g = x.to(cdtype).clone()
        for a, b in segments:
            if clip is not None and b > a:
                bound = clip * torch.std(g[a:b], correction=0)
                g[a:b] = torch.clamp(g[a:b], -bound, bound)
        gs.append(g)
    scalers = [max(float(g[a:b].abs().max()) for g in gs) if b > a else 0.0 for a, b in segments]
    qs = []
    for g, gen in zip(gs, _streams(sim)):
        u = torch.rand(g.numel(), generator=gen, dtype=cdtype)
        q = torch.zeros_like(g)
        for (a, b), scaler in zip(segments, scalers):
            keep = u[a:b] * scaler < g[a:b].abs()
            q[a:b] = torch.where(keep, torch.sign(g[a:b]) * scaler, torch.zeros_like(g[a:b]))
        qs.append(q.to(xs[0].dtype))
    sim.stats["scalers"] = scalers
    return _mean(qs), [x.clone() for x in xs]  # unbiased (up to clipping), no residual


# ---------------------------------------------------------------------- EF-SignSGD, signSGD
def _scaled_signs(x: torch.Tensor, shapes) -> tuple[torch.Tensor, list[float]]:
    """Per tensor (||x||_1 / n) * sign(x), a zero counting as +; and the scales."""
    cdtype = _cdtype(x)
    q = torch.zeros(x.numel(), dtype=cdtype)
    scales = []
    for a, b in segments_of(shapes):
        scale = torch.linalg.vector_norm(x[a:b], 1, dtype=cdtype) / (b - a) if b > a else torch.zeros((), dtype=cdtype)
        q[a:b] = scale * torch.where(x[a:b] < 0, -1.0, 1.0).to(cdtype)
        scales.append(scale)
    return q, scales


@reference("efsignsgd")
def efsignsgd(sim, xs):
    qs = [_scaled_signs(x, sim.shapes)[0].to(x.dtype) for x in xs]
    return _mean(qs), qs  # residual x - q


@reference("signsgd")
def signsgd(sim, xs):
    cdtype = _cdtype(xs[0])
    votes = torch.zeros(xs[0].numel(), dtype=torch.int64)
    for x in xs:
        votes += torch.where(x < 0, -1, 1)
    result = torch.sign(votes).to(cdtype)
    if sim.options.get("scale", "l1") == "l1":
        scale = [torch.zeros((), dtype=cdtype) for _ in sim.shapes]
        for x in xs:  # worker order
            for i, s in enumerate(_scaled_signs(x, sim.shapes)[1]):
                scale[i] = scale[i] + s
        for (a, b), s in zip(segments_of(sim.shapes), scale):
            result[a:b] *= s / sim.P
    sim.stats["ties"] = int((votes == 0).sum())
    return result.to(xs[0].dtype), [x.clone() for x in xs]  # a vote: no residual


# ------------------------------------------------------------------------------ fp16, bf16
def _cast(sim, xs, wire):
    top = torch.finfo(wire).max  # saturated, not sent as Inf
    sent = [(x.clamp(-top, top) if top < torch.finfo(x.dtype).max else x).to(wire).to(x.dtype) for x in xs]
    return _mean(sent), sent  # residual: the rounding error


@reference("fp16")
def fp16(sim, xs):
    return _cast(sim, xs, torch.float16)


@reference("bf16")
def bf16(sim, xs):
    return _cast(sim, xs, torch.bfloat16)


# ------------------------------------------------------------------------------------- DGC
@reference("dgc")
def dgc(sim, xs):
    """Deep Gradient Compression. The momentum-corrected velocity v = x + mu u replaces x in
    place in ``xs``, so that the simulation's residual (v where nothing was sent) is DGC's."""
    opt = sim.options
    mu, masking = opt.get("momentum", 0.9), opt.get("momentum_masking", True)
    ratio, warmup, coeff = opt.get("sample_ratio", 0.01), opt.get("warmup_epochs", 4), opt.get("warmup_coeff", 0.25)
    clip = opt.get("clip_norm")
    st, P = sim.state, sim.P
    epoch = st.get("epoch")
    c = sim.c if epoch is None or epoch >= warmup else max(sim.c, coeff ** (epoch + 1))
    if "u" not in st:
        st["u"] = [torch.zeros_like(x) for x in xs]
        st["gen"] = torch.Generator().manual_seed(sim.seed)
    compressed = [(a, b) for shape, (a, b) in zip(sim.shapes, segments_of(sim.shapes)) if len(shape) > 1 and b > a]
    dense = [(a, b) for shape, (a, b) in zip(sim.shapes, segments_of(sim.shapes)) if len(shape) <= 1 and b > a]
    previous = sim.m  # v before this step (the residuals)
    for w, x in enumerate(xs):
        if clip is not None:  # local clipping of the gradient g = x - v, at clip / sqrt(P)
            g = x - previous[w]
            norm = torch.linalg.vector_norm(g)
            coef = torch.clamp(clip / math.sqrt(P) / (norm + 1e-6), max=1.0)
            x.copy_(previous[w] + g * coef)
        if mu:
            for a, b in compressed:  # v = v + u, u = mu u + g
                x[a:b] += st["u"][w][a:b] * mu
    # sampled thresholds: one draw, the same positions for every worker
    full = math.ceil(2.0 / c)
    sampled = [(a, b, max(math.ceil((b - a) * ratio), full)) for a, b in compressed if b - a > full]
    draws = torch.rand(sum(s for _, _, s in sampled), generator=st["gen"], dtype=torch.float64)
    positions, at = [], 0
    for a, b, s in sampled:
        positions.append((draws[at:at + s] * (b - a)).floor().long() + a)
        at += s
    sel = []
    for x in xs:
        chosen = []
        for a, b in compressed:
            k = k_of(c, b - a)
            if b - a <= full:
                chosen.append(torch.topk(x[a:b].abs(), k).indices + a)
                continue
            j = [s[:2] for s in sampled].index((a, b))
            s = sampled[j][2]
            threshold = torch.topk(x[positions[j]].abs(), max(1, math.ceil(s * c))).values.min()
            passed = torch.nonzero(x[a:b].abs() >= threshold).view(-1)
            tries = 0
            while passed.numel() < 0.8 * k and tries < 10:
                threshold = threshold * 0.8
                passed = torch.nonzero(x[a:b].abs() >= threshold).view(-1)
                tries += 1
            if passed.numel() > k:  # the k largest of those that passed
                passed = passed[torch.topk(x[a:b][passed].abs(), k).indices]
            chosen.append(passed + a)
        sel.append(torch.sort(torch.cat(chosen)).values if chosen else torch.empty(0, dtype=torch.long))
    avg, _ = gather_sum(xs, sel)
    dense_idx = torch.cat([torch.arange(a, b) for a, b in dense]) if dense else torch.empty(0, dtype=torch.long)
    if dense:
        total = torch.zeros(dense_idx.numel(), dtype=xs[0].dtype)
        for x in xs:
            total += x[dense_idx]
        avg[dense_idx] = total / P if P > 1 else total
    for w, x in enumerate(xs):
        u = st["u"][w]
        if mu:
            for a, b in compressed:
                u[a:b] = x[a:b] - previous[w][a:b]  # u = v_new - v_old
            if masking:
                u[sel[w]] = 0
            if dense:
                u[dense_idx] = u[dense_idx] * mu + avg[dense_idx]
    if mu and dense:
        avg[dense_idx] = st["u"][0][dense_idx]
    st["density"] = c
    return avg, [torch.cat([s, dense_idx]) for s in sel]
