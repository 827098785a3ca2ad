"""gTop-k: a global top-k index set found by a tree merge of the workers' local top-k."""
from __future__ import annotations


import torch

from ..base import ReduceCall
from ..comm.communicator import Communicator
from ..comm.exchange import allreduce_at, pack, unpack
from ..registry import register
from ..select.primitives import target_count
from .sparse_base import union_stats
from .topk_selecting import TopKSelecting

__all__ = ["GlobalTreeTopK", "merge_top", "tree_rounds"]


def merge_top(ia: torch.Tensor, va: torch.Tensor, ib: torch.Tensor, vb: torch.Tensor,
              k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two sparse vectors (distinct positions each; values summed where both have one)
    and keep the k largest |value|. Ties are broken by position (sort by position, then a
    stable sort by descending |value|), and a sum of two values does not depend on their order,
    so ``merge_top(a, b)`` and ``merge_top(b, a)`` return the same pairs in the same order:
    the two partners of a round keep exactly the same set."""
    idx = torch.cat([ia, ib])
    val = torch.cat([va, vb])
    positions, where = torch.unique(idx, sorted=True, return_inverse=True)
    summed = torch.zeros(positions.numel(), dtype=val.dtype, device=val.device).index_add_(0, where, val)
    order = torch.sort(summed.abs(), descending=True, stable=True).indices[:k]
    return positions[order], summed[order]


def tree_rounds(rank: int, size: int) -> int:
    """How many merges worker ``rank`` runs: log2(q) doubling rounds for the q ranks below
    q (the largest power of two <= size), plus one for a rank that takes in an extra rank's
    pairs; none for the extra ranks themselves."""
    q = 1 << (size.bit_length() - 1)
    if rank >= q:
        return 0
    return (q.bit_length() - 1) + (1 if rank + q < size else 0)


@register
class GlobalTreeTopK(TopKSelecting):
    """gTop-k (Shi et al., ICDCS 2019): each worker starts from its own top-k (index, value)
    pairs, k = max(1, floor(c d)); in log2(P) rounds of pairwise exchange (recursive doubling:
    in round j worker r swaps with r XOR 2^j) the two partners merge their sparse vectors (sum
    at equal indices) and keep the k largest |value|, with a deterministic tie-break (by index)
    so both keep exactly the same set. After the last round every worker holds the same global
    index set G of size k. P need not be a power of two: with q the largest power of two <= P,
    ranks r >= q first send their pairs to r - q (which merges them in), the q ranks do the
    doubling, and each r - q sends G back to r.

    The merged values only steer the selection (a coordinate dropped by one subtree misses that
    subtree's contribution); ``avg`` at G is then the exact mean: every worker all-reduces its
    own x at G (sorted), and zeroes its residual at G, so conservation holds. Shi et al. finish
    with a broadcast of the approximate merged values instead; this project needs exact sums.

    Pairs travel in the one packed format of :func:`~sparsecomm.reducers.comm.exchange.pack` (for
    int32 positions with float32 or float64 values, exactly k (4 + e) bytes; 16-bit values are
    padded to an even k). Byte accounting per step (k positions of 4 bytes, values of e bytes),
    on top of the 48-byte handshake row:

    * a rank r < q: ``rounds * k (4 + e)`` sent in the doubling rounds (one ``exchange`` each;
      the same received), plus, when it serves an extra rank r + q, ``4k`` for G sent back (and
      ``k (4 + e)`` received from it);
    * an extra rank r >= q: ``k (4 + e)`` sent to r - q (and ``4k`` received for G);
    * everyone: ``k e`` into the final all-reduce (``2 (P-1)/P k e`` on the wire).

    So the traffic of a worker grows with k log2(P), not k P as for an all-gather of everyone's
    pairs. ``stats``: ``density`` = ``local_density`` = k / d, ``rounds`` = merges this worker
    ran (:func:`tree_rounds`).

    Routed (:meth:`~..base.Reducer.route_to`): the tree merge is as before, the final
    all-reduce's values go to their owners only (:func:`~..comm.exchange.routed_sum_at`).

    Options: ``selection`` (:class:`~.topk_selecting.TopKSelecting`).
    """

    name = "gtopk"
    per_tensor = False  # a global top-k merged over the workers
    summary = "global top-k by a log2(P)-round tree merge of local top-k, exact all-reduce at the result"

    def _run(self, call: ReduceCall) -> torch.Tensor:
        d = call.d
        k = target_count(self.density, d)
        idx, val = self.topk(call, [(0, d)], [k])
        x = call.x
        if val is None:
            with call.phase("select"):
                val = x[idx]
        call.handshake(count=k)
        with call.phase("comm"):
            chosen = _tree(self.comm, idx, val, k) if k else idx
            avg = allreduce_at(self.comm, x, chosen, call.output(), self.owners)
        call.commit_sparse(chosen)
        call.counted(selected=k, received=k)
        union_stats(call, self.owners, chosen)
        call.stats["rounds"] = tree_rounds(self.rank, self.comm.size) if k else 0
        return avg


def _tree(comm: Communicator, idx: torch.Tensor, val: torch.Tensor, k: int) -> torch.Tensor:
    """The global index set G (sorted), the same on every worker."""
    rank, size = comm.rank, comm.size
    q = 1 << (size.bit_length() - 1)
    dtypes = (idx.dtype, val.dtype)
    if rank >= q:  # an extra rank: hand its pairs to rank - q, get G back
        comm.send(pack([idx, val], k), rank - q)
        return comm.recv_(torch.empty(k, dtype=idx.dtype, device=idx.device), rank - q)
    row = pack([idx, val], k)
    if rank + q < size:
        other = comm.recv_(torch.empty_like(row), rank + q)
        idx, val = merge_top(idx, val, *unpack(other, k, k, dtypes), k)
    mask = 1
    while mask < q:
        other = comm.exchange(pack([idx, val], k), rank ^ mask)
        idx, val = merge_top(idx, val, *unpack(other, k, k, dtypes), k)
        mask <<= 1
    chosen = torch.sort(idx).values
    if rank + q < size:
        comm.send(chosen, rank + q)
    return chosen
