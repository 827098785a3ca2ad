"""References of the merged-gradient sparsifiers (OMGS, AGTF) for the generic distributed test.

The grouping and per-layer counts a run used come from the reducer's own ``describe()``
history (the grouping algorithm is checked separately against a brute-force search); given
them, each group is a plain top-k over its slice and a gather-sum in worker order."""

import torch

from reducer_reference import gather_sum, k_of, reference, segments_of


def _plan(sim, name):
    history = sim.options["describe"]["history"]
    entry = [h for h in history if h["from_step"] <= sim.t][-1]
    L = len(sim.shapes)
    segments = segments_of(sim.shapes)
    plan, i = [], 0
    for count in entry["groups"]:  # backward order: layer b is tensor L-1-b
        tensors = range(L - (i + count), L - i)
        a, b = segments[tensors.start][0], segments[tensors.stop - 1][1]
        if name == "agtf":
            k = sum(entry["k_per_layer"][i:i + count])
        else:
            k = k_of(sim.c, b - a)
        plan.append((a, b, k))
        i += count
    return plan


def _merged(sim, xs, name):
    sel = []
    for x in xs:
        parts = [torch.topk(x[a:b].abs(), k).indices + a for a, b, k in _plan(sim, name) if k]
        sel.append(torch.cat(parts) if parts else torch.empty(0, dtype=torch.long))
    return gather_sum(xs, sel)


@reference("omgs")
def omgs(sim, xs):
    return _merged(sim, xs, "omgs")


@reference("agtf")
def agtf(sim, xs):
    return _merged(sim, xs, "agtf")
