"""The quantizers (QSGD, TernGrad, EF-SignSGD, signSGD with majority vote, fp16/bf16) and DGC
beyond the generic tests: bit packing, bytes as they travel, unbiasedness within a confidence
bound, the vote, saturation, DGC's momentum identity, warm-up, clipping and skipped steps."""
import math
from itertools import pairwise

import pytest
import torch

import reducer_scenarios as sc
from reducer_reference import Simulation
from sparsecomm import reducers
from sparsecomm.reducers.comm.bitpack import code_width, pack_bits, packed_bytes, unpack_bits
from sparsecomm.reducers.methods.quantized import stream_seed

HANDSHAKE = 48  # bytes of the step's handshake row (6 float64 fields)
D = sum(math.prod(s) for s in sc.SHAPES)
L = len(sc.SHAPES)


# ------------------------------------------------------------------------------ bit packing
@pytest.mark.parametrize("width", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 61, 1000])
def test_pack_round_trip_and_size(width, n):
    codes = torch.randint(0, 2 ** width, (n,), generator=torch.Generator().manual_seed(width * 100 + n))
    packed = pack_bits(codes, width)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_bytes(n, width) == math.ceil(n * width / 8)
    unpacked = unpack_bits(packed, n, width)
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked.long(), codes)


def test_pack_format_is_little_endian_and_zero_padded():
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [0b00001101, 0b00000001]
    assert pack_bits(torch.tensor([2, 1, 0, 1, 3]), 2).tolist() == [2 | 1 << 2 | 1 << 6, 3]
    assert pack_bits(torch.tensor([5, 3, 7]), 3).tolist() == [5 | 3 << 3 | (7 & 3) << 6, 7 >> 2]
    assert code_width(1) == 1 and code_width(2) == 2 and code_width(15) == 4 and code_width(255) == 8
    with pytest.raises(ValueError, match="1 to 8 bits"):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(1, dtype=torch.uint8), 9, 1)


# ------------------------------------------------------------------------------ options
@pytest.mark.parametrize("name,options,message", [
    ("qsgd", {"levels": 0}, "levels must be a positive integer"),
    ("qsgd", {"levels": 128}, "levels must be at most 127"),
    ("qsgd", {"bucket_size": 0}, "bucket_size must be a positive integer"),
    ("terngrad", {"clip": -1.0}, "clip must be a finite number > 0"),
    ("signsgd", {"scale": "max"}, r"scale must be one of \['l1', 'none'\]"),
    ("fp16", {"exchange": "ring"}, r"exchange must be one of \['gather', 'allreduce'\]"),
    ("dgc", {"momentum": 1.0}, r"momentum must be a number in \[0, 1\)"),
    ("dgc", {"sample_ratio": 0.0}, r"sample_ratio must be a number in \(0, 1\]"),
    ("dgc", {"warmup_coeff": 0.0}, r"warmup_coeff must be a number in \(0, 1\]"),
    ("dgc", {"clip_norm": 0.0}, "clip_norm must be a finite number > 0"),
])
def test_bad_options_are_named(name, options, message):
    with pytest.raises(ValueError, match=message):
        reducers.build(name, **options)


# ------------------------------------------------------------------- bytes as they travel
def qsgd_buckets(size=512):
    return sum(math.ceil(math.prod(s) / size) for s in sc.SHAPES)


def expected_bytes(name, options):
    """(handshake bytes, payload bytes) one worker hands over per step on SHAPES (float32)."""
    if name == "qsgd":
        width = code_width(2 * options.get("levels", 7) + 1)  # a sign bit and the level
        return HANDSHAKE, 4 * qsgd_buckets(options.get("bucket_size", 512)) + math.ceil(D * width / 8)
    if name == "terngrad":  # the shared scalers ride on the handshake, one float64 per tensor
        return HANDSHAKE + 8 * L, math.ceil(D * 2 / 8)
    if name in ("efsignsgd", "signsgd"):
        scales = 0 if options.get("scale") == "none" else 4 * L
        return HANDSHAKE, scales + math.ceil(D / 8)
    return HANDSHAKE, 2 * D  # fp16, bf16


CASES = [("qsgd", {}), ("qsgd", {"levels": 127, "bucket_size": 100}), ("terngrad", {}), ("efsignsgd", {}),
         ("signsgd", {}), ("signsgd", {"scale": "none"}), ("fp16", {}), ("bf16", {}),
         ("fp16", {"exchange": "allreduce"})]


def bytes_of_cases(cases):
    out = []
    for name, options in cases:
        r = reducers.build(name, **options)
        r.reduce(sc.make_grads(sc.SHAPES, sc.rank(), 0))
        out.append(r.stats)
    return out


def test_bytes_are_the_packed_rows(clusters):
    P = 3
    results = clusters(P).run(bytes_of_cases, CASES)
    for r in range(P):
        for (name, options), stats in zip(CASES, results[r]):
            shake, payload = expected_bytes(name, options)
            assert stats["bytes_sent"] == shake + payload, (name, options)
            ring = options.get("exchange") == "allreduce"
            wire = (P - 1) * shake + (2 * (P - 1) / P * payload if ring else (P - 1) * payload)
            assert stats["bytes_wire"] == pytest.approx(wire), (name, options)
            assert stats["density"] == 1.0 and stats["target_density"] == 1.0
    qsgd = results[0][0]  # 4-bit codes and one float32 per 512 coordinates
    assert qsgd["bits_per_coordinate"] == pytest.approx(8 * expected_bytes("qsgd", {})[1] / D)


def test_qsgd_code_width_follows_the_levels():
    for levels, width in [(1, 2), (3, 3), (7, 4), (15, 5), (127, 8)]:
        r = reducers.build("qsgd", levels=levels, bucket_size=None)
        r.reduce([torch.randn(1000)])
        assert r.stats["bytes_sent"] == HANDSHAKE + 4 + math.ceil(1000 * width / 8)


# ----------------------------------------------------------------- unbiasedness, variance
def repeated(name, x, n, seed=0, **options):
    """n compressions of the fixed vector x on one worker (nothing carried between them)."""
    r = reducers.build(name, seed=seed, **options)
    return torch.stack([r.reduce([x])[0].double() for _ in range(n)])


def check_mean(samples, x, variance, bound=5.0):
    """Per coordinate, |mean - x| within ``bound`` standard errors (a union bound over the
    coordinates: with 100 of them, a false alarm has probability below 1e-4 under the normal
    approximation); where the variance is 0 the value itself; and the sum of squared z-scores
    near its expectation n (within 5 standard deviations sqrt(2 n)), so the variance is the
    predicted one too. A bias of 5% of each coordinate's spread, or a variance 1.5^2 times the
    predicted one, fails (checked when this was written)."""
    n = samples.shape[0]
    mean, x = samples.mean(0), x.double()
    random = variance > 1e-30
    torch.testing.assert_close(samples[:, ~random], x[~random].expand(n, -1), rtol=1e-6, atol=1e-12)
    z = (mean[random] - x[random]) / (variance[random] / n).sqrt()
    assert z.abs().max() < bound, f"largest |z| {float(z.abs().max()):.2f}"
    k = int(random.sum())
    assert abs(float((z ** 2).sum()) - k) < 5 * math.sqrt(2 * k), f"sum z^2 = {float((z ** 2).sum()):.1f}, {k} coords"


def test_qsgd_is_unbiased_with_the_predicted_variance():
    x = torch.randn(120, generator=torch.Generator().manual_seed(5))
    x[7] = 0.0
    levels, size = 3, 40
    samples = repeated("qsgd", x, 4000, levels=levels, bucket_size=size)
    norms = x.double().view(-1, size).norm(dim=1).repeat_interleave(size)
    r = x.double().abs() / norms * levels
    p = r - r.floor()
    check_mean(samples, x, (norms / levels) ** 2 * p * (1 - p))
    levels_seen = (samples.abs() / (norms / levels)).round()
    assert set(levels_seen.unique().tolist()) <= set(range(levels + 1))


@pytest.mark.parametrize("P", [1, 2])
def test_terngrad_is_unbiased_with_the_predicted_variance(P):
    """Without clipping; with P workers holding the same vector the scaler is shared and each
    draws its own stream, so the mean of P ternary vectors has 1/P of the variance."""
    x = torch.randn(100, generator=torch.Generator().manual_seed(6))
    x[3] = 0.0
    if P == 1:
        samples = repeated("terngrad", x, 4000, clip=None)
    else:
        samples = torch.stack([repeated("terngrad", x, 4000, clip=None, seed=s) for s in (0, 1)]).mean(0)
    s = x.double().abs().max()
    check_mean(samples, x, (s * x.double().abs() - x.double() ** 2) / P)


def test_terngrad_clips_at_c_sigma_before_rounding():
    x = torch.randn(200, generator=torch.Generator().manual_seed(7))
    x[0], x[1] = 40.0, -30.0  # far beyond 2.5 sigma
    samples = repeated("terngrad", x, 4000, clip=2.5)
    bound = 2.5 * x.std(correction=0)
    clipped = x.clamp(-bound, bound).double()
    s = clipped.abs().max()
    assert samples.abs().max() == pytest.approx(float(s), rel=1e-6)  # the scaler is the clipped max
    check_mean(samples, clipped, s * clipped.abs() - clipped ** 2)


def same_vector_everywhere(name, steps, **options):
    r = reducers.build(name, **options)
    x = torch.randn(300, generator=torch.Generator().manual_seed(8))
    return [r.reduce([x])[0] for _ in range(steps)]


def test_rounding_streams_differ_between_ranks(clusters):
    """Every worker holds the same vector: with one stream per rank the two roundings differ
    somewhere, so the mean of two ternary vectors takes values off the {-s, 0, s} grid."""
    assert stream_seed(0, 0) != stream_seed(0, 1)
    results = clusters(2).run(same_vector_everywhere, "terngrad", 3, clip=None)
    x = torch.randn(300, generator=torch.Generator().manual_seed(8))
    s = float(x.abs().max())
    for t in range(3):
        assert torch.equal(results[0][t], results[1][t])
        off_grid = (results[0][t].abs() - s / 2).abs() < 1e-6 * s
        assert off_grid.sum() > 10


# ---------------------------------------------------------------------------- sign methods
def test_efsignsgd_sends_the_scaled_sign_and_keeps_the_rest():
    g = [torch.tensor([[1.0, -2.0], [0.0, 3.0]]), torch.tensor([-0.5, 0.5, 0.0])]
    r = reducers.build("efsignsgd")
    avg = r.reduce([t.clone() for t in g])
    assert avg[0].tolist() == [[1.5, -1.5], [1.5, 1.5]]  # ||x||_1 / n = 6 / 4; a zero votes +
    assert avg[1].tolist() == pytest.approx([-1 / 3, 1 / 3, 1 / 3])
    for m, a, x in zip(r.residual, avg, g):
        assert torch.equal(m, x - a)
    zero = reducers.build("efsignsgd").reduce([torch.zeros(5)])[0]
    assert int(zero.count_nonzero()) == 0


def vote_grads(rank, step):
    """Three workers: coordinate 0 is + for all, 1 is + for two of them, 2 is - for two."""
    signs = [[1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [-1.0, -1.0, 1.0]][rank]
    return [torch.tensor(signs) * (rank + 1)]


@pytest.mark.parametrize("scale", ["none", "l1"])
def test_signsgd_is_a_majority_vote(clusters, scale):
    outs = clusters(3).run(sc.call_reduce, "signsgd", vote_grads, options={"scale": scale})
    vote = torch.tensor([1.0, 1.0, -1.0])
    expected = vote if scale == "none" else vote * (1 + 2 + 3) / 3  # mean of the workers' ||g||_1 / n
    for o in outs:
        assert torch.equal(o[0]["avg"], expected)
        assert int(o[0]["memory"].count_nonzero()) == 0 and o[0]["stats"]["tie_fraction"] == 0.0
    assert reducers.build("signsgd").conserves is False


def test_signsgd_ties_give_zero(clusters):
    outs = clusters(4).run(sc.call_reduce, "signsgd", vote_grads, options={"scale": "none"})
    # votes: +2, 0, 0 over four workers
    assert outs[0][0]["avg"].tolist() == [1.0, 0.0, 0.0]
    assert outs[0][0]["stats"]["tie_fraction"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------ fp16, bf16
@pytest.mark.parametrize("name,wire", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_keeps_its_rounding_error(name, wire):
    g = torch.randn(1000, generator=torch.Generator().manual_seed(9)) * 1e-3
    r = reducers.build(name)
    avg = r.reduce([g.clone()])[0]
    assert torch.equal(avg, g.to(wire).float())
    assert torch.equal(r.residual[0], g - g.to(wire).float())
    assert r.stats["payload_ratio"] == 0.5 and r.conserves


def test_fp16_saturates_instead_of_overflowing():
    r = reducers.build("fp16")
    avg = r.reduce([torch.tensor([1e6, -1e6, 1.0])])[0]
    assert avg.tolist() == [65504.0, -65504.0, 1.0]
    assert r.residual[0].tolist() == [1e6 - 65504.0, -(1e6 - 65504.0), 0.0]


def test_fp16_allreduce_is_identical_everywhere_and_close_to_the_mean(clusters):
    P = 3
    results = clusters(P).run(sc.run_steps, "fp16", steps=3, options={"exchange": "allreduce"})
    for t in range(3):
        grads = [sc.flat(sc.make_grads(sc.SHAPES, r, t)) for r in range(P)]
        for r in range(1, P):
            assert torch.equal(results[r]["avg"][t], results[0]["avg"][t])
        x = [g + (results[w]["memory"][t - 1] if t else 0) for w, g in enumerate(grads)]
        mean = sum(v.double() for v in x) / P
        # each part rounded to 16 bits once, each partial sum once more
        bound = 4 * 2.0 ** -11 * sum(v.double().abs() for v in x) / P + 1e-7
        assert ((results[0]["avg"][t].double() - mean).abs() <= bound).all()
        for w in range(P):  # each residual is its own cast's error, x - P cast(x / P)
            assert torch.equal(results[w]["memory"][t], x[w] - (x[w] / P).half().float() * P)
    assert not reducers.build("fp16", exchange="allreduce").conserves


# ------------------------------------------------------------------------------------- DGC
def dgc_steps(steps, shapes, density=0.05, epochs=None, **options):
    """dgc with begin_epoch(epochs[t]) before step t when given; averages, residuals, the
    momentum before and after each step, stats."""
    r = reducers.build("dgc", density=density, **options)
    out = {"avg": [], "memory": [], "u_before": [], "u": [], "stats": []}
    for t in range(steps):
        if epochs is not None:
            r.begin_epoch(epochs[t], 0.1, 10)
        u = r.state_dict()["method_state"].get("momentum") if t else None
        out["u_before"].append(torch.zeros(sum(math.prod(s) for s in shapes)) if u is None else u)
        out["avg"].append(sc.flat(r.reduce(sc.make_grads(shapes, sc.rank(), t))))
        out["memory"].append(sc.flat(r.residual))
        out["u"].append(r.state_dict()["method_state"]["momentum"])
        out["stats"].append(r.stats)
    out["describe"] = r.describe()
    return out


COMPRESSED = torch.cat([torch.arange(a, a + math.prod(shape)) for shape, a in
                        zip(sc.SHAPES, [sum(math.prod(x) for x in sc.SHAPES[:i]) for i in range(L)]) if len(shape) > 1])


def test_dgc_momentum_identity_across_workers(clusters):
    """sum_w (g_w + m_w + mu u_w) = P avg + sum_w m_w(new): what the momentum adds is all
    that is added; and momentum factor masking zeroes u where v was sent."""
    P, steps, mu = 3, 5, 0.9
    results = clusters(P).run(dgc_steps, steps, sc.SHAPES)
    previous = [torch.zeros(D) for _ in range(P)]
    for t in range(steps):
        lhs = sum(sc.flat(sc.make_grads(sc.SHAPES, w, t)) + previous[w] + mu * results[w]["u_before"][t]
                  for w in range(P))
        rhs = P * results[0]["avg"][t] + sum(results[w]["memory"][t] for w in range(P))
        torch.testing.assert_close(rhs, lhs, rtol=1e-5, atol=1e-6)
        for w in range(P):  # sent where the velocity was zeroed: the momentum is zeroed there too
            memory, u = results[w]["memory"][t][COMPRESSED], results[w]["u"][t][COMPRESSED]
            sent = memory == 0
            assert int(sent.sum()) > 0 and int(u[sent].count_nonzero()) == 0
            assert int(u[~sent].count_nonzero()) == int((~sent).sum())
        previous = [results[w]["memory"][t] for w in range(P)]
    assert not reducers.build("dgc").conserves and reducers.build("dgc", momentum=0.0).conserves


def test_dgc_sending_everything_is_momentum_sgd():
    """The paper's equivalence: with every coordinate sent and no masking, the local velocity
    is momentum SGD's momentum: avg_t = mu avg_(t-1) + g_t (one worker; (2, 1) is small enough
    for the exact top-k, which at density 1 takes both coordinates; the 1-d tensor is dense)."""
    r = reducers.build("dgc", density=1.0, momentum=0.5, momentum_masking=False)
    previous = [torch.zeros(2, 1), torch.zeros(3)]
    for t in range(4):
        g = [torch.randn(2, 1, generator=torch.Generator().manual_seed(t)), torch.full((3,), float(t))]
        avg = r.reduce([x.clone() for x in g])
        for a, p, x in zip(avg, previous, g):
            torch.testing.assert_close(a, 0.5 * p + x)
        previous = avg
        assert all(int(m.count_nonzero()) == 0 for m in r.residual)


@pytest.mark.parametrize("P", [2, 3])
def test_dgc_with_warm_up_and_clipping_agrees_with_the_reference(clusters, P):
    shapes = ((300, 40), (25, 4), (40,))
    epochs = [0, 0, 1, 2, 3, 4, 5]
    options = {"clip_norm": 0.2}
    results = clusters(P).run(dgc_steps, len(epochs), shapes, density=0.001, epochs=epochs, **options)
    sim = Simulation("dgc", P, shapes, 0.001, **options)
    for t, epoch in enumerate(epochs):
        sim.begin_epoch(epoch, 0.1, 10)
        ref_avg, ref_residuals = sim.step([sc.make_grads(shapes, w, t) for w in range(P)])
        torch.testing.assert_close(results[0]["avg"][t], ref_avg, rtol=1e-5, atol=1e-7)
        for w in range(P):
            assert torch.equal(results[w]["avg"][t], results[0]["avg"][t])
            assert torch.equal(results[w]["memory"][t], ref_residuals[w]), f"step {t}: rank {w}'s residual"
        density = max(0.001, 0.25 ** (epoch + 1)) if epoch < 4 else 0.001
        stats = results[0]["stats"][t]
        assert stats["target_density"] == density == sim.state["density"]
        k = max(1, math.floor(density * 12000))  # the big tensor's threshold is sampled
        for w in range(P):
            assert 0.8 * k <= int((results[w]["memory"][t][:12000] == 0).sum()) <= k
    assert results[0]["describe"]["compressed"] == [0, 1] and results[0]["describe"]["dense"] == [2]


def test_dgc_clips_the_local_gradient_before_the_momentum():
    g = [torch.full((4, 5), 1.0), torch.full((5,), 2.0)]  # ||g|| = sqrt(20 + 20)
    r = reducers.build("dgc", density=1.0, clip_norm=0.5, momentum=0.0, error_feedback=False)
    avg = r.reduce([x.clone() for x in g])
    coef = 0.5 / (math.sqrt(40) + 1e-6)
    torch.testing.assert_close(avg[1], g[1] * coef)  # the dense tensor: everything, scaled
    assert float(avg[0].abs().max()) == pytest.approx(coef, rel=1e-6)


def test_dgc_density_warm_up_schedule():
    r = reducers.build("dgc", density=0.001)
    assert r.target_density == 0.001  # never told its epoch: no warm-up
    expected = [0.25, 0.0625, 0.015625, 0.00390625, 0.001, 0.001]
    for epoch, density in enumerate(expected):
        r.begin_epoch(epoch, 0.1, 10)
        assert r.target_density == pytest.approx(density)
    slow = reducers.build("dgc", density=0.01, warmup_epochs=2, warmup_coeff=0.5)
    assert [slow.density_at(e) for e in range(4)] == [0.5, 0.25, 0.01, 0.01]


def test_dgc_skipped_step_leaves_its_state_alone():
    r = reducers.build("dgc", density=0.05, nonfinite="skip")
    r.reduce(sc.make_grads(sc.SHAPES, 0, 0))
    before = r.state_dict()
    bad = sc.make_grads(sc.SHAPES, 0, 1)
    bad[0][0, 0] = float("nan")
    r.reduce(bad)
    after = r.state_dict()
    assert r.stats["skipped"] and after["steps"] == before["steps"]
    assert torch.equal(after["residual"], before["residual"])
    for key in ("momentum", "generator"):
        assert torch.equal(after["method_state"][key], before["method_state"][key]), key


# -------------------------------------------------- long tensors: encoded and decoded in pieces
LONG_SHAPES = [(7,), (300_001,), (5, 3), (262_150,)]  # pieces of 2**18 start at odd offsets
LONG_CASES = [("qsgd", {}), ("qsgd", {"levels": 3, "bucket_size": 100}), ("terngrad", {}), ("efsignsgd", {}),
              ("signsgd", {}), ("fp16", {}), ("bf16", {})]


@pytest.mark.parametrize("name,options", LONG_CASES)
def test_long_tensors_decoded_in_pieces_agree_with_the_reference(name, options, monkeypatch):
    """Pieces of 2**18 coordinates, gathered in one table and then a piece or two at a time
    (tables of at most a few hundred kB): the same bits, and the reference's values."""
    from sparsecomm.reducers.comm import exchange
    from sparsecomm.reducers.comm.virtual import VirtualWorld

    assert max(math.prod(s) for s in LONG_SHAPES) > exchange.DECODE_CHUNK
    P = 3
    runs = []
    for table_min in (exchange.TABLE_MIN, 64):
        monkeypatch.setattr(exchange, "TABLE_MIN", table_min)
        monkeypatch.setattr(exchange, "TABLE_SHARE", 10 ** 9 if table_min == 64 else 8)
        world = VirtualWorld(P)
        rs = [reducers.build(name, group=world.communicator(r), **options) for r in range(P)]
        sim = Simulation(name, P, LONG_SHAPES, 1.0, **options)
        gen = torch.Generator().manual_seed(5)
        out = []
        for _ in range(2):
            grads = [[torch.randn(s, generator=gen) for s in LONG_SHAPES] for _ in range(P)]
            avgs = world.run(lambda r: rs[r].reduce(grads[r]))
            ref_avg, ref_res = sim.step(grads)
            for w in range(P):
                flat = torch.cat([a.reshape(-1) for a in avgs[w]])
                torch.testing.assert_close(flat, ref_avg, rtol=1e-5, atol=1e-7)
                if rs[w].compensates:
                    torch.testing.assert_close(torch.cat([m.reshape(-1) for m in rs[w].residual]), ref_res[w],
                                               rtol=1e-5, atol=1e-6)
                out.append(flat)
        runs.append(out)
    for whole, windowed in zip(*runs):
        assert torch.equal(whole, windowed)


# ------------------------------------------------- rows gathered a window at a time
def test_windows_cover_the_row_and_prefer_whole_groups_of_codes():
    from sparsecomm.reducers.comm.exchange import windows

    def check(ranges, head, width, limit):
        size = head + (ranges[-1][1] * width + 7) // 8
        plan = windows(ranges, head, width, size, limit)
        assert plan[0][0] == plan[0][2] == plan[0][4] == 0 and plan[-1][1] == len(ranges) and plan[-1][3] == size
        for (f0, l0, lo0, hi0, _), (f1, _, lo1, _, start1) in zip(plan, plan[1:]):
            at = ranges[f1][0]
            assert l0 == f1 and start1 == at - at % 8 and lo1 == head + start1 * width // 8
            assert hi0 == head + (at * width + 7) // 8 and 0 <= hi0 - lo1 <= width  # bytes shared only inside a group
            assert hi0 == lo1 or at % 8  # a whole group: no byte twice
        return plan

    aligned = [(0, 16), (16, 40), (40, 48), (48, 50)]
    plan = check(aligned, head=12, width=4, limit=4)
    assert [w[:2] for w in plan] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert all(hi == lo for (*_, hi, _), (_, _, lo, *_) in zip(plan, plan[1:]))  # no byte twice
    mixed = [(0, 10), (10, 16), (16, 21), (21, 40), (40, 48), (48, 50)]
    plan = check(mixed, head=12, width=4, limit=4)
    assert [w[:2] for w in plan] == [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6)]
    plan = check(mixed, head=12, width=4, limit=12)  # a whole group preferred where one came in time
    assert [w[:2] for w in plan] == [(0, 1), (1, 2), (2, 4), (4, 6)]  # at 21 the cut goes back to 16
    for width in (1, 2, 3, 5, 7, 8, 16):
        check([(0, 3), (3, 1003), (1003, 2011), (2011, 2020)], head=5, width=width, limit=40)
    assert windows(mixed, 12, 4, 37, limit=10 ** 6) == [(0, 6, 0, 37, 0)]  # under the limit: one window
    assert windows([], 0, 16, 0, limit=1) == []


def windowed_and_whole(cases, steps=2):
    """Each case reduced twice on this rank: rows gathered whole, then a few bytes at a time."""
    from sparsecomm.reducers.comm import exchange

    out, defaults = [], (exchange.TABLE_MIN, exchange.TABLE_SHARE)
    for name, options in cases:
        runs = []
        for table_min, share in (defaults, (64, 10 ** 9)):
            exchange.TABLE_MIN, exchange.TABLE_SHARE = table_min, share
            try:
                r = reducers.build(name, seed=3, **options)
                avgs = [torch.cat([a.reshape(-1) for a in r.reduce(sc.make_grads(sc.SHAPES, sc.rank(), s))])
                        for s in range(steps)]
            finally:
                exchange.TABLE_MIN, exchange.TABLE_SHARE = defaults
            residual = torch.cat([m.reshape(-1) for m in r.residual]) if r.compensates else None
            runs.append((avgs, residual, r.stats["bytes_sent"]))
        out.append(runs)
    return out


@pytest.mark.parametrize("P", [2, 3, 4])
def test_rows_gathered_in_windows_give_the_same_bits(clusters, P):
    """Many windows (a table of at most 64 bytes) against one: the same average, residual and
    bytes on every rank, to the bit, for every quantizer and cast."""
    cases = [c for c in CASES if c[1].get("exchange") != "allreduce"]
    results = clusters(P).run(windowed_and_whole, cases)
    for r in range(P):
        for (name, _), (whole, windowed) in zip(cases, results[r]):
            for a, b in zip(whole[0], windowed[0]):
                assert torch.equal(a, b), name
            assert (whole[1] is None) == (windowed[1] is None) and (whole[1] is None or
                                                                   torch.equal(whole[1], windowed[1])), name
            assert whole[2] <= windowed[2] <= whole[2] + 8 * len(sc.SHAPES), name  # a group sent twice at most per cut
            assert torch.equal(results[r][cases.index((name, _))][0][0][0], results[0][cases.index((name, _))][0][0][0])


# ------------------------------------------------------------- routed to the owners (issue 22)
def owners_of(P):
    """Owners of the flat vector of sc.SHAPES in pieces that start off groups of eight codes
    and off tensor boundaries (1,200 and 1,230 are tensor starts), a worker owning several."""
    from sparsecomm.reducers.comm.exchange import Owners

    cuts = [0, 13, 501, 517, 1207, 1230, 1500, 1733, 1901, 1903, D]
    return Owners([(a, b, (i * 5) % P) for i, (a, b) in enumerate(pairwise(cuts))], P)


def routed_and_unrouted(cases, steps=2):
    """Each case reduced by two reducers on this rank, one routed to :func:`owners_of`: with
    the default tables, then a few bytes at a time. Per case and table: both averages and
    residuals per step, and both reducers' stats."""
    import torch.distributed as dist

    from sparsecomm.reducers.comm import exchange

    default = (exchange.TABLE_MIN, exchange.TABLE_SHARE)
    owners = owners_of(dist.get_world_size())
    out = []
    for name, options in cases:
        by_table = []
        for table_min, share in (default, (64, 10 ** 9)):
            exchange.TABLE_MIN, exchange.TABLE_SHARE = table_min, share
            try:
                pair = [reducers.build(name, seed=3, **options) for _ in range(2)]
                pair[0].route_to(owners)
                got = [[], []]
                for s in range(steps):
                    for r, into in zip(pair, got):
                        avg = torch.cat([a.reshape(-1) for a in r.reduce(sc.make_grads(sc.SHAPES, sc.rank(), s))])
                        into.append((avg, torch.cat([m.reshape(-1) for m in r.residual]), dict(r.stats)))
            finally:
                exchange.TABLE_MIN, exchange.TABLE_SHARE = default
            by_table.append(got)
        out.append(by_table)
    return out


@pytest.mark.parametrize("P", [2, 3, 4])
def test_routed_rows_give_the_owned_average_bit_for_bit(clusters, P):
    """Every quantizer and cast routed to the owners against unrouted, with whole and tiny
    tables: each rank's owned coordinates bit-identical to the unrouted average, the others
    0, the residual bit-identical; stats routed and shard_density 1; what this rank receives
    (bytes_wire) at most the unrouted all-gather's, and the bytes sent over all ranks fewer."""
    cases = [c for c in CASES if c[1].get("exchange") != "allreduce"]
    results = clusters(P).run(routed_and_unrouted, cases)
    owners = owners_of(P)
    for (name, options), *per_rank in zip(cases, *results):
        for table in range(2):
            sent = [0, 0]
            for r in range(P):
                mask = torch.zeros(D, dtype=torch.bool)
                for a, b in owners.owned(r):
                    mask[a:b] = True
                for t, (routed, plain) in enumerate(zip(*per_rank[r][table])):
                    what = f"{name} {options}, rank {r}/{P}, table {table}, step {t}"
                    assert torch.equal(routed[0][mask], plain[0][mask]), what
                    assert not routed[0][~mask].any(), what
                    assert torch.equal(routed[1], plain[1]), what + ": residual"
                    assert routed[2]["routed"] and routed[2]["shard_density"] == 1.0, what
                    assert "routed" not in plain[2], what
                    assert routed[2]["bytes_wire"] <= plain[2]["bytes_wire"], what
                    sent[0] += routed[2]["bytes_sent"]
                    sent[1] += plain[2]["bytes_sent"]
            assert sent[0] < sent[1], (name, options, table, sent)
    assert any(results[0][i][0][0][0][1].any() for i, c in enumerate(cases) if c[0] == "efsignsgd"), \
        "efsignsgd keeps a residual"


def test_routing_with_one_worker_is_the_plain_exchange():
    """One worker: the owners cover everything; the step is the plain one (``routed`` False)."""
    from sparsecomm.reducers.comm.exchange import Owners

    grads = sc.make_grads(sc.SHAPES, 0, 0)
    routed, plain = (reducers.build("qsgd", seed=3, group=reducers.SoloCommunicator()) for _ in range(2))
    routed.route_to(Owners([(0, D, 0)], 1))
    for a, b in zip(routed.reduce(grads), plain.reduce(grads)):
        assert torch.equal(a, b)
    assert routed.stats["routed"] is False and routed.stats["shard_density"] == 1.0
    assert routed.stats["bytes_sent"] == plain.stats["bytes_sent"]
