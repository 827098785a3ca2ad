"""Single-process references for PowerSGD, Accordion and LEGACY, written from the papers and docs/reducers.md with
plain loops over workers (registered into reducer_reference.METHODS on import).

Only the random stream is shared with the package: PowerSGD's first Q of each matrix is
``randn(m, r)`` from a CPU generator seeded with ``seed``, drawn per matrix in tensor order.
"""
from __future__ import annotations

import math

import torch

from reducer_reference import gather_sum, k_of, reference, segments_of, union_reduce


def _exchange(sim, xs, sel):
    if sim.options.get("exchange", "gather") == "union":
        return union_reduce(xs, sel)
    return gather_sum(xs, sel)


def _layerwise_topk(xs, shapes, densities):
    """Per worker: the k_t largest |x| of every tensor t, k_t = max(1, floor(c_t n_t)); equal
    |x|: the lower position first (a stable sort by decreasing |x|)."""
    sel = []
    for x in xs:
        parts = []
        for (a, b), c in zip(segments_of(shapes), densities):
            k = k_of(c, b - a)
            if k:
                parts.append(torch.sort(x[a:b].abs(), descending=True, stable=True).indices[:k] + a)
        sel.append(torch.cat(parts) if parts else torch.empty(0, dtype=torch.long))
    return sel


# ----------------------------------------------------------------------------- PowerSGD
def _matrix_rank(shape, rank):
    """(n, m, r) when the tensor is compressed, else None."""
    if len(shape) < 2:
        return None
    n, m = shape[0], math.prod(shape[1:])
    r = min(rank, n, m)
    return (n, m, r) if r * (n + m) < n * m else None


def _gram_schmidt(p):
    """Orthonormal columns, one after the other; a zero column stays zero."""
    p = p.clone()
    cols = []
    for i in range(p.shape[1]):
        v = p[:, i].clone()
        for u in cols:
            v = v - (u * v).sum() * u
        scale = v.abs().max()
        if scale > 0:
            v = v / scale
            v = v / torch.linalg.vector_norm(v)
        else:
            v = torch.zeros_like(v)
        cols.append(v)
        p[:, i] = v
    return p


@reference("powersgd", approximate=True)
def powersgd(sim, xs):
    opt = sim.options
    rank, warm = opt.get("rank", 2), opt.get("warm_start", True)
    start, mode = opt.get("start_iter", 0), opt.get("residual", "local")
    P, st = sim.P, sim.state
    dtype = xs[0].dtype
    fdtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    if sim.t < start:  # uncompressed warm-up: exact mean, nothing left behind
        total = torch.zeros_like(xs[0])
        for x in xs:
            total += x
        return total / P, [x.clone() for x in xs]
    mats = {i: mr for i, shape in enumerate(sim.shapes) if (mr := _matrix_rank(tuple(shape), rank))}
    if "q" not in st:
        st["gen"] = torch.Generator().manual_seed(sim.seed)
        st["q"] = {i: torch.randn((m, r), generator=st["gen"]).to(fdtype) for i, (n, m, r) in mats.items()}
        st["q0"] = {i: q.clone() for i, q in st["q"].items()}
    elif not warm:
        st["q"] = {i: torch.randn((m, r), generator=st["gen"]).to(fdtype) for i, (n, m, r) in mats.items()}
    avg = torch.zeros_like(xs[0])
    approx = [torch.zeros(x.numel(), dtype=fdtype) for x in xs]
    for i, (a, b) in enumerate(segments_of(sim.shapes)):
        if i not in mats:  # uncompressed: mean of everyone's values, no residual
            total = torch.zeros(b - a, dtype=fdtype)
            for x in xs:
                total += x[a:b].to(fdtype)
            avg[a:b] = total / P
            for w, x in enumerate(xs):
                approx[w][a:b] = x[a:b].to(fdtype)
            continue
        n, m, r = mats[i]
        q = st["q"][i]
        if warm:  # a column that is exactly zero restarts from its first draw
            for j in range(r):
                if not q[:, j].any():
                    q[:, j] = st["q0"][i][:, j]
        Ms = [x[a:b].to(fdtype).view(n, m) for x in xs]
        p_sum = torch.zeros(n, r, dtype=fdtype)
        for M in Ms:
            p_sum += M @ q
        p_hat = _gram_schmidt(p_sum)
        q_local = [M.t() @ p_hat for M in Ms]
        q_mean = torch.zeros(m, r, dtype=fdtype)
        for qw in q_local:
            q_mean += qw
        q_mean /= P
        mean_approx = p_hat @ q_mean.t()
        avg[a:b] = mean_approx.reshape(-1).to(dtype)
        rounding = avg[a:b].to(fdtype) - mean_approx.reshape(-1)  # 0 unless the gradients are 16-bit
        for w in range(P):
            if mode == "local":
                approx[w][a:b] = (p_hat @ q_local[w].t()).reshape(-1) + rounding
            else:
                approx[w][a:b] = avg[a:b].to(fdtype)
        st["q"][i] = q_mean
    return avg, approx


# ----------------------------------------------------------------------------- Accordion
@reference("accordion")
def accordion(sim, xs):
    opt = sim.options
    k_low, k_high = opt.get("k_low", 0.1), opt.get("k_high", 0.99)
    thr, freq = opt.get("detection_threshold", 0.5), opt.get("switch_freq", 10)
    st = sim.state
    epoch, lr = st.get("epoch", 0), st.get("lr")
    segments = segments_of(sim.shapes)
    if "decided" not in st or (epoch % freq == 0 and epoch != st["decided"]):
        g0 = xs[0] - sim.m[0]  # worker 0's own gradient (the residual it carried in removed)
        low = g0.dtype in (torch.float16, torch.bfloat16)
        norms = [float(torch.linalg.vector_norm(g0[a:b].float() if low else g0[a:b])) for a, b in segments]
        first = "norms" not in st or epoch == 0
        drop = lr is not None and st.get("prev_lr") is not None and lr < st["prev_lr"]
        critical = []
        for i, now in enumerate(norms):
            before = None if first else st["norms"][i]
            critical.append(first or drop or abs(now - before) > thr * before)
        st["critical"], st["norms"], st["prev_lr"], st["decided"] = critical, norms, lr, epoch
        st.setdefault("decisions", []).append((epoch, sim.t, critical))
    densities = [k_high if c else k_low for c in st["critical"]]
    return _exchange(sim, xs, _layerwise_topk(xs, sim.shapes, densities))


# ----------------------------------------------------------------------------- LEGACY
@reference("legacy")
def legacy(sim, xs):
    opt = sim.options
    splits = list(opt.get("group_splits", [10000]))
    comps = opt.get("group_compressions", [0.01, 0.01])
    schedule, percent = opt.get("schedule", "layer"), opt.get("percent", False)
    divisor = 100.0 if percent else 1.0
    st = sim.state
    phases = 1 if schedule == "layer" else len(comps)
    phase = 0
    total = st.get("total_epochs")
    if phases > 1 and total:
        epoch = st.get("epoch", 0)
        phase = phases - 1
        for i in range(phases):
            if epoch < (i + 1) * (total / phases):
                phase = i
                break
    densities = []
    for n in (math.prod(s) for s in sim.shapes):
        group = len(splits)
        for i, s in enumerate(splits):
            if n < s:
                group = i
                break
        if schedule == "layer":
            c = comps[group]
        elif schedule == "epoch":
            c = comps[phase]
        else:
            c = comps[phase][group]
        densities.append(c / divisor)
    st["phase"] = phase
    return _exchange(sim, xs, _layerwise_topk(xs, sim.shapes, densities))
