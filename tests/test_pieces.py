"""The reducer pieces alone, on one process: selection, control, placement, packing, layout,
error feedback and timing."""
import math
import time

import pytest
import torch

from sparsecomm.reducers.select.control import MultiplicativeScaling, SageScaling, clamp_threshold
from sparsecomm.reducers.comm.exchange import pack, packed_count, unpack, union_of
from sparsecomm.reducers.layout import Layout
from sparsecomm.reducers.error_feedback import ErrorFeedback
from sparsecomm.reducers.select.placement import BlockPartitions, EqualPartitions
from sparsecomm.reducers.select.primitives import (initial_threshold, sample_distinct, slovin_sample_size, target_count,
                                           threshold_select, threshold_select_segments, topk_per_segment)
from sparsecomm.reducers.timing import PhaseTimer


# ----------------------------------------------------------------------------- selection
@pytest.mark.parametrize("c,n,k", [(0.29, 100, 29), (0.001, 10, 1), (1.0, 5, 5), (0.5, 0, 0), (0.001, 11_173_962, 11_173),
                                   (1e-9, 3, 1), (0.7, 10, 7)])
def test_target_count(c, n, k):
    assert target_count(c, n) == k


def test_initial_threshold_rule_of_thumb():
    assert initial_threshold(100) == pytest.approx(0.05)
    assert initial_threshold(0) == initial_threshold(1) == 0.5


@pytest.mark.parametrize("block", [0, 1, 7, 32, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_threshold_select_equals_direct_search(block, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5003, generator=gen).to(dtype)
    x[17], x[900], x[4000] = float("nan"), float("inf"), float("-inf")
    for lam in (0.01, 1.0, 2.5, 3.9, 100.0):
        for a, b in ((0, 5003), (13, 4999), (100, 100), (4990, 5003), (0, 5)):
            want = torch.nonzero(x[a:b].abs() >= lam).view(-1) + a
            got = threshold_select(x, lam, torch.int32, a, b, block=block)
            assert got.dtype == torch.int32
            assert torch.equal(got.long(), want), (lam, a, b)
    assert 17 not in threshold_select(x, 0.0001, torch.int64, block=block).tolist()  # NaN never passes


def test_threshold_select_segments_uses_each_segments_threshold():
    x = torch.tensor([0.5, 2.0, 0.5, 2.0, 3.0])
    got = threshold_select_segments(x, [1.0, 2.5], [(0, 2), (2, 5)], torch.int64)
    assert got.tolist() == [1, 4]
    assert threshold_select_segments(x, [], [], torch.int64).numel() == 0


def test_topk_per_segment_takes_the_largest_of_each_segment():
    x = torch.tensor([1.0, -5.0, 2.0, 0.1, 0.2, -0.3, 9.0])
    got = sorted(topk_per_segment(x, [(0, 3), (3, 6), (6, 6), (6, 7)], [2, 1, 0, 1], torch.int32).tolist())
    assert got == [1, 2, 5, 6]


@pytest.mark.parametrize("n,k", [(10, 0), (10, 10), (10, 6), (1000, 1), (1000, 37), (10**7, 10_000), (3, 2)])
def test_sample_distinct_gives_k_distinct_sorted_positions(n, k):
    gen = torch.Generator().manual_seed(1)
    got = sample_distinct(n, k, gen)
    assert got.numel() == k
    assert torch.unique(got).numel() == k
    assert torch.equal(got, torch.sort(got).values)
    assert k == 0 or (0 <= int(got.min()) and int(got.max()) < n)


def test_sample_distinct_is_uniform():
    gen = torch.Generator().manual_seed(2)
    n, k, draws = 40, 3, 4000
    hits = torch.zeros(n)
    for _ in range(draws):
        hits[sample_distinct(n, k, gen)] += 1
    expected = draws * k / n
    chi2 = float(((hits - expected) ** 2 / expected).sum())
    assert chi2 < 80, chi2  # 39 degrees of freedom: p < 1e-4 beyond ~80


def test_sample_distinct_rejects_impossible_requests():
    with pytest.raises(ValueError):
        sample_distinct(3, 4, torch.Generator())


def test_slovin_sample_size():
    assert slovin_sample_size(10**8) == 399
    assert slovin_sample_size(100) == 80
    assert slovin_sample_size(0) == 0


def test_union_of_both_paths_agree():
    d = 1000
    parts = [torch.tensor([5, 1, 999], dtype=torch.int32), torch.tensor([1, 7], dtype=torch.int32)]
    assert union_of(parts, d).tolist() == [1, 5, 7, 999]      # sort path
    assert union_of(parts, 20 * 5).tolist() == [1, 5, 7, 999]  # mask path
    assert union_of(parts, 20 * 5).dtype == torch.int32


# ------------------------------------------------------------------------------- control
@pytest.mark.parametrize("ratio,factor", [(2.0, 1.005), (1.11, 1.005), (1.1, 1.00125), (1.05, 1.00125),
                                          (1.0, 1.0), (0.95, 0.9987), (0.91, 0.9987), (0.909, 0.995), (0.0, 0.995)])
def test_multiplicative_scaling_rule(ratio, factor):
    c = MultiplicativeScaling(k=1000, threshold=0.5)
    assert c.factor(round(ratio * 1000)) == factor
    assert c.update(round(ratio * 1000)) == pytest.approx(0.5 * factor)


def test_thresholds_stay_positive_and_finite():
    c = MultiplicativeScaling(k=10, threshold=1e-29)
    for _ in range(2000):
        c.update(0)
    assert c.threshold > 0
    assert clamp_threshold(float("inf")) < float("inf") and clamp_threshold(float("nan")) > 0
    assert clamp_threshold(0.0) > 0


def test_sage_scaling_formula():
    s = SageScaling(density=0.01, threshold=0.2)
    assert not s.started and s.alpha(1.0) == 1.0
    s.start(0.5)
    alpha = s.alpha(0.6)
    assert alpha == pytest.approx(1.2)
    lam = s.update(0.6, alpha, exam_density=0.2)  # ratio 20 > 10 -> gamma 1.05
    beta = 2 / (1 + math.exp(0.01 - 0.2))
    assert lam == pytest.approx(0.2 * 1.2 * beta * 1.05)
    assert s.last["gamma"] == 1.05
    lam2 = s.update(0.6, 1.0, exam_density=0.0005)  # ratio 0.05 < 0.1 -> gamma 0.95
    assert s.last["gamma"] == 0.95 and lam2 < lam
    assert s.alpha(0.0) == 1.0  # a zero sample never collapses lambda


# ----------------------------------------------------------------------------- placement
def covers(bounds, d):
    at = 0
    for a, b in bounds:
        assert a == at and b >= a
        at = b
    assert at == d


@pytest.mark.parametrize("d", [0, 1, 3, 10, 1001])
@pytest.mark.parametrize("P", [1, 2, 3, 4, 5])
def test_equal_partitions_cover_disjointly(d, P):
    bounds = EqualPartitions(d, P).bounds()
    covers(bounds, d)
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("d,P", [(11_173_962, 2), (11_173_962, 3), (40_000, 4), (1932, 4), (100, 3), (31, 2), (0, 2)])
def test_block_partitions_initial_layout(d, P):
    parts = BlockPartitions(d, P)
    assert parts.block_size % 32 == 0 and parts.block_size > 0
    assert sum(parts.blocks) == parts.num_blocks
    assert parts.block_size * parts.num_blocks + parts.remainder == d
    covers(parts.bounds(), d)
    q, r = divmod(parts.num_blocks, P)
    assert parts.blocks == [q + (1 if p < r else 0) for p in range(P)]
    if d >= 32 * 1024:
        assert parts.num_blocks == 1024 and parts.block_size == (d // 1024) // 32 * 32


def test_block_partitions_move_one_block_towards_the_light_side():
    parts = BlockPartitions(1024 * 64, 4)
    assert parts.blocks == [256] * 4
    parts.update([200, 50, 100, 100])  # p0 heavy, p1 light: p0 gives a block to p1
    assert parts.blocks == [255, 257, 256, 256]
    # Mirror case at 0|1 (p1 gives a block back to p0); the sweep goes on and, p1 still looking
    # heavy next to a light p2 (the estimated shift int(64 * 450 / 65536) is 0), p1 gives one to p2.
    parts.update([50, 200, 100, 100])
    assert parts.blocks == [256, 255, 257, 256]
    parts.update([100, 100, 100, 100])  # balanced: nothing moves
    assert parts.blocks == [256, 255, 257, 256]
    parts.update([0, 0, 0, 0])
    assert parts.blocks == [256, 255, 257, 256]
    covers(parts.bounds(), 1024 * 64)


def test_block_partitions_sweep_uses_estimated_counts():
    # 64-element blocks, total 40960 -> each move shifts int(64 * 40960 / 65536) = 40 estimated
    # coordinates. p0 gives a block to p1, whose estimate 9740 + 40 = 9780 is then no longer
    # below 0.95238 x 10240, so the mirror move p2 -> p1 does not happen; p2 gives one to p3.
    parts = BlockPartitions(1024 * 64, 4)
    parts.update([11000, 9740, 11000, 9220])
    assert parts.blocks == [255, 257, 255, 257]


def test_block_partitions_never_shrink_below_the_minimum():
    parts = BlockPartitions(1024 * 32, 2)
    assert parts.min_blocks == 1024 / 8
    for _ in range(1000):
        parts.update([1000, 1])
    assert parts.blocks[0] == 128 and parts.blocks[1] == 1024 - 128
    covers(parts.bounds(), 1024 * 32)


def test_rotation_and_reordering():
    parts = EqualPartitions(100, 3)
    assert [parts.owned(0, r) for r in range(3)] == [0, 1, 2]
    assert [parts.owned(1, r) for r in range(3)] == [1, 2, 0]
    assert [parts.owned(5, r) for r in range(3)] == [2, 0, 1]
    assert parts.by_partition([10, 20, 30], step=1) == [30, 10, 20]


def test_block_partitions_state_round_trip():
    a = BlockPartitions(50_000, 3)
    a.update([300, 10, 90])
    b = BlockPartitions(50_000, 3)
    b.load_state_dict(a.state_dict())
    assert b.bounds() == a.bounds()
    with pytest.raises(ValueError):
        BlockPartitions(50_000, 2).load_state_dict(a.state_dict())


# ------------------------------------------------------------------------------- packing
@pytest.mark.parametrize("vdtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("idtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("count,n", [(0, 5), (3, 3), (3, 9), (1, 1)])
def test_pack_round_trip_keeps_pairs_and_zero_pads(vdtype, idtype, count, n):
    idx = torch.arange(count, dtype=idtype) * 3 + 1
    val = torch.randn(count).to(vdtype)
    rows = torch.stack([pack([idx[:0], val[:0]], n), pack([idx, val], n)])  # a first worker sent nothing
    got_i, got_v = unpack(rows[1], n, count, (idtype, vdtype))  # the second row's parts stay aligned
    assert torch.equal(got_i, idx) and torch.equal(got_v, val)
    assert int(rows[0].count_nonzero()) == 0  # padding is zeros, never stale memory
    widest = max(idtype.itemsize, vdtype.itemsize)
    assert rows.stride(0) % widest == 0 and rows.shape[1] == packed_count((idtype, vdtype), n) * (
        idtype.itemsize + vdtype.itemsize)
    assert packed_count((idtype, vdtype), n) - n < widest  # only as much padding as alignment needs
    if idtype.itemsize == vdtype.itemsize:
        assert packed_count((idtype, vdtype), n) == n  # int32 with float32: none at all


# -------------------------------------------------------------------------------- layout
def test_layout_offsets_fingerprint_and_differences():
    ts = [torch.zeros(2, 3), torch.zeros(0), torch.zeros(4)]
    lay = Layout.of(ts)
    assert lay.offsets == (0, 6, 6, 10) and lay.numel == 10 and lay.index_dtype == torch.int32
    assert lay.fingerprint < 2**52
    assert Layout.of([torch.zeros(3, 2), torch.zeros(0), torch.zeros(4)]).fingerprint != lay.fingerprint
    assert Layout.of([t.double() for t in ts]).fingerprint != lay.fingerprint
    assert lay.difference(ts) is None
    assert "expected 3 gradients" in lay.difference(ts[:2])
    assert "gradient 2 has shape (5,)" in lay.difference([ts[0], ts[1], torch.zeros(5)])
    assert "dtype" in lay.difference([t.half() for t in ts])
    views = lay.split(torch.arange(10.0))
    assert [tuple(v.shape) for v in views] == [(2, 3), (0,), (4,)] and views[2].tolist() == [6, 7, 8, 9]


def test_layout_rejects_mixed_or_integer_tensors():
    with pytest.raises(ValueError, match="one dtype"):
        Layout.of([torch.zeros(2), torch.zeros(2).double()])
    with pytest.raises(ValueError, match="floating point"):
        Layout.of([torch.zeros(2, dtype=torch.int64)])
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        Layout.of([[1.0, 2.0]])


# ------------------------------------------------------------------------ error feedback
def test_error_feedback_compensate_and_commit():
    lay = Layout.of([torch.zeros(2), torch.zeros(3)])
    ef = ErrorFeedback(True)
    ef.allocate(lay)
    x = ef.compensate([torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])], lay)
    ef.commit_sparse(x, torch.tensor([1, 3]))
    assert ef.residual.tolist() == [1.0, 0.0, 3.0, 0.0, 5.0]
    x = ef.compensate([torch.ones(2), torch.ones(3)], lay)
    assert x.tolist() == [2.0, 1.0, 4.0, 1.0, 6.0]
    assert ef.residual.tolist() == [1.0, 0.0, 3.0, 0.0, 5.0]  # untouched until commit
    ef.commit_dense(x, torch.ones(5))
    assert ef.residual.tolist() == [1.0, 0.0, 3.0, 0.0, 5.0]
    x = ef.compensate([torch.ones(2), torch.ones(3)], lay)
    ef.commit_all(x)
    assert ef.residual.abs().sum() == 0


def test_error_feedback_off_keeps_zero_residual():
    lay = Layout.of([torch.zeros(3)])
    ef = ErrorFeedback(False)
    ef.allocate(lay)
    x = ef.compensate([torch.tensor([1.0, 2.0, 3.0])], lay)
    assert x.tolist() == [1.0, 2.0, 3.0]
    ef.commit_sparse(x, torch.tensor([0]))
    assert ef.residual.tolist() == [0.0, 0.0, 0.0]


# -------------------------------------------------------------------------------- timing
def test_phase_timer_pauses_the_enclosing_phase():
    t = PhaseTimer()
    t.reset(torch.device("cpu"))
    with t("select"):
        time.sleep(0.02)
        with t("comm"):
            time.sleep(0.05)
        time.sleep(0.02)
    assert 0.035 < t.totals["select"] < 0.1
    assert 0.045 < t.totals["comm"] < 0.15
