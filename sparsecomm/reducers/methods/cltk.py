"""CLT-k: cyclic local top-k, one leader's selection shared by everyone."""
from __future__ import annotations


import torch

from ..base import ReduceCall
from ..comm.exchange import allreduce_at
from ..registry import register
from ..select.primitives import target_count
from .sparse_base import union_stats
from .topk_selecting import TopKSelecting


@register
class CyclicLocalTopK(TopKSelecting):
    """CLT-k (cyclic local top-k): at step t the leader, worker t mod P, selects the
    k = max(1, floor(c d)) largest |x| of its own compensated vector; it broadcasts those k
    int32 positions, every worker all-reduces its own values there, and ``avg`` there is the
    sum / P. Every worker zeroes its residual at the leader's positions, so conservation holds
    exactly as for random-k.

    Only the leader runs top-k (the research code had every rank compute it and throw it away;
    with the fused selection a follower's pass only builds x).
    Bytes per step: the handshake row, the leader's k indices (broadcast; counted as sent by the
    leader only), and k values in one all-reduce.

    Stats: ``density`` = k / d; ``local_density`` = k / d on the leader, 0 on the others (the
    coordinates this worker selected); ``leader`` = the leading rank this step. The step index
    that picks the leader counts completed steps only (a skipped step does not move it), and
    is part of every reducer's saved state, so a resumed run keeps the rotation.

    Routed (:meth:`~..base.Reducer.route_to`): the leader's positions are still broadcast, the
    values go to their owners only (:func:`~..comm.exchange.routed_sum_at`).

    Options: ``selection`` (:class:`~.topk_selecting.TopKSelecting`).
    """

    name = "cltk"
    per_tensor = False  # the leader's top-k over the whole vector
    summary = "cyclic local top-k: leader t mod P selects, its indices are broadcast, values all-reduced"

    def _run(self, call: ReduceCall) -> torch.Tensor:
        P = self.comm.size
        k = target_count(self.density, call.d)
        leader = call.index % P
        leads = self.rank == leader
        chosen, _ = self.topk(call, [(0, call.d)], [k if leads else 0])  # a follower's pass only builds x
        x = call.x
        idx = chosen if leads else torch.empty(k, dtype=call.layout.index_dtype, device=x.device)
        call.handshake(count=k if leads else 0)
        with call.phase("comm"):
            self.comm.broadcast_(idx, leader)
            avg = allreduce_at(self.comm, x, idx, call.output(), self.owners)
        call.commit_sparse(idx)
        call.counted(selected=k if leads else 0, received=k)
        union_stats(call, self.owners, idx)
        call.stats["leader"] = leader
        return avg
