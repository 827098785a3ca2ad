"""The methods whose values travel to the union of everyone's positions (union all-reduce,
all-reduce at agreed positions) routed to the owners (``Reducer.route_to``, issue 22), on real
gloo process groups of 2, 3 and 4 workers, against the same methods unrouted."""
from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

import reducer_scenarios as sc
from sparsecomm import reducers

D = sum(math.prod(s) for s in sc.SHAPES)

# Every method that exchanges through union_allreduce / allreduce_at / union_pairs, and the
# wire formats of the union exchange. 16-bit values are all-gathered and summed in rank order
# unrouted too: those cases are bit for bit at every P.
CASES = [
    ("exdyna", {}), ("micro", {}), ("deft", {}), ("randomk", {}), ("cltk", {}), ("gtopk", {}),
    ("topk", {"exchange": "union"}), ("global_topk", {"exchange": "union"}), ("thresh", {"exchange": "union"}),
    ("sage", {"exchange": "union"}), ("accordion", {"exchange": "union"}),
    ("exdyna", {"indices": "bitmap"}), ("exdyna", {"values": "bf16"}), ("micro", {"values": "fp16", "indices": "delta"}),
    ("topk", {"exchange": "union", "values": "fp16"}),
]
SIXTEEN_BIT = {i for i, (_, options) in enumerate(CASES) if options.get("values", "full") != "full"}


def owners_of(P):
    """Owners of the flat vector of sc.SHAPES in pieces off the tensor boundaries, a worker
    owning several (the last worker none with 4)."""
    from sparsecomm.reducers.comm.exchange import Owners

    cuts = [0, 13, 501, 517, 1207, 1230, 1500, 1733, 1901, 1903, D]
    return Owners([(a, b, (i * 5) % min(P, 3)) for i, (a, b) in enumerate(pairwise(cuts))], P)


def routed_and_unrouted(cases, steps=3):
    """Each case reduced by two reducers on this rank, one routed to :func:`owners_of`. Per
    case and step: both averages, both residuals, both reducers' stats and method states, the
    rank-order mean of every worker's compensated vector x = g + m (all-gathered) and the
    mean of their magnitudes |x|."""
    import torch.distributed as dist

    P = dist.get_world_size()
    owners = owners_of(P)
    out = []
    for name, options in cases:
        pair = [reducers.build(name, density=0.05, seed=3, **options) for _ in range(2)]
        pair[0].route_to(owners)
        got = []
        for s in range(steps):
            grads = sc.make_grads(sc.SHAPES, sc.rank(), s)
            m = sc.flat(pair[1].residual) if pair[1].residual else torch.zeros(D)
            xs = [torch.empty(D) for _ in range(P)]
            dist.all_gather(xs, sc.flat(grads) + m)
            total, size = xs[0].clone(), xs[0].abs()
            for x in xs[1:]:
                total += x
                size += x.abs()
            step = []
            for r in pair:
                avg = sc.flat(r.reduce(sc.make_grads(sc.SHAPES, sc.rank(), s)))
                step.append((avg, sc.flat(r.residual), dict(r.stats), r.state_dict()["method_state"]))
            got.append((*step, total / P, size / P))
        out.append(got)
    return out


@pytest.mark.parametrize("P", [2, 3, 4])
def test_routed_union_gives_the_owned_average_and_the_unrouted_state(clusters, P):
    """Every union method routed against unrouted, 3 steps. At this rank's owned coordinates
    the routed average is the rank-order mean of every worker's x at the union, bit for bit;
    that is the unrouted all-reduce's bit for bit with 2 workers (and with 16-bit values at any
    P), within float rounding with 3 and 4 (gloo's ring sums from other ranks first: at most
    P eps times the mean of |x|, the bound of two summation orders and a division each); 0 at
    the others. The residual and the method's state are the unrouted ones bit for bit; stats
    routed, shard_density exact, the density the unrouted one; over all ranks fewer bytes sent
    and received."""
    results = clusters(P).run(routed_and_unrouted, CASES)
    owners = owners_of(P)
    differs = 0
    for c, ((name, options), *per_rank) in enumerate(zip(CASES, *results)):
        totals = {"routed": [0.0, 0.0], "plain": [0.0, 0.0]}
        union = [torch.stack([per_rank[r][t][0][1] == 0 for r in range(P)]).all(0) for t in range(3)]
        for r in range(P):
            mask = torch.zeros(D, dtype=torch.bool)
            for a, b in owners.owned(r):
                mask[a:b] = True
            for t, (routed, plain, mean, size) in enumerate(per_rank[r]):
                what = f"{name} {options}, rank {r}/{P}, step {t}"
                assert not routed[0][~mask].any(), what
                if c in SIXTEEN_BIT or P == 2:
                    assert torch.equal(routed[0][mask], plain[0][mask]), what
                else:
                    want = torch.where(union[t], mean, torch.zeros(D))
                    assert torch.equal(routed[0][mask], want[mask]), what + ": rank-order sum"
                    bound = P * torch.finfo(torch.float32).eps * size  # two summation orders, one division each
                    assert ((routed[0] - plain[0]).abs() <= bound)[mask].all(), what + ": float rounding"
                    differs += int(not torch.equal(routed[0][mask], plain[0][mask]))
                assert torch.equal(routed[1], plain[1]), what + ": residual"
                assert sc.same_state(routed[3], plain[3]), what + ": method state"
                st, pl = routed[2], plain[2]
                assert st["routed"] is True and "routed" not in pl, what
                assert st["density"] == pl["density"] and st["local_density"] == pl["local_density"], what
                if c not in SIXTEEN_BIT:  # the union: where every residual is 0 (x is nowhere 0 by chance)
                    assert st["shard_density"] == int((union[t] & mask).sum()) / (int(mask.sum()) or 1), what
                for key, entry in (("routed", st), ("plain", pl)):
                    totals[key][0] += entry["bytes_sent"]
                    totals[key][1] += entry["bytes_wire"]
        assert all(a < b for a, b in zip(totals["routed"], totals["plain"])), (name, options, totals)
    if P > 2:
        assert differs, "gloo's all-reduce of 3 or 4 workers should round some sum differently"


def test_routed_union_shard_density_counts_the_union_owned():
    """shard_density: the owned coordinates of the union (every rank knows it whole), divided
    by the owned part's size; one worker: the plain exchange, ``routed`` False."""
    from sparsecomm.reducers.comm.exchange import Owners

    grads = sc.make_grads(sc.SHAPES, 0, 0)
    routed, plain = (reducers.build("exdyna", density=0.05, seed=3, group=reducers.SoloCommunicator())
                     for _ in range(2))
    routed.route_to(Owners([(0, 100, 0), (100, D, 0)], 1))
    for a, b in zip(routed.reduce(grads), plain.reduce(grads)):
        assert torch.equal(a, b)
    assert routed.stats["routed"] is False
    assert routed.stats["shard_density"] == routed.stats["density"]
    assert routed.stats["bytes_sent"] == plain.stats["bytes_sent"]
