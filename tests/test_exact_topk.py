"""Exact top-k by one rule (sparsecomm.reducers.select.exact_topk): the torch reference against
a plain-Python oracle of the rule on edge cases, the sampled-bound search (the C loop; Triton
under TRITON_INTERPRET=1) against the reference bit for bit, including the rare paths (a bound
too high, more candidates than room) and many ranges of mixed sizes (layer-wise: the C
backend's bounds, pass and rule as one call each, its bounds equal to the batched torch
ones); topk and global_topk give the same results with
selection="torch" and "fused" when k = n (on 1 to 4 workers, with NaN, tiny and huge values:
tests/test_fused.py)."""
import math
import os
import subprocess
import sys

import pytest
import torch

import fused_scenarios as fs
from test_fused import compare, same
from sparsecomm import reducers
from sparsecomm.reducers.select import exact_topk, fused, fused_cpu

KINDS = ((torch.float32, torch.int32), (torch.float32, torch.int64), (torch.float64, torch.int32),
         (torch.float64, torch.int64))
METHODS = ("topk", "global_topk")


def oracle(x, ranges, ks):
    """The rule, one position at a time: NaN first, then larger |x|, then the lower position."""
    chosen = []
    for (a, b), k in zip(ranges, ks):
        order = sorted(range(a, b), key=lambda i: (not math.isnan(x[i]), -abs(x[i]) if x[i] == x[i] else 0.0, i))
        chosen += order[:max(0, k)]
    return sorted(chosen)


def edge_cases():
    """(name, x, ranges, ks): ties, k = 1, k = n and beyond, NaN and Inf, all equal, signed
    zeros, a range smaller than any sample, gaps between ranges, empty ranges."""
    gen = torch.Generator().manual_seed(3)
    r = torch.randn(300, generator=gen).tolist()
    inf, nan = float("inf"), float("nan")
    return [
        ("k = 1", r[:50], [(0, 50)], [1]),
        ("k = n", r[:50], [(0, 50)], [50]),
        ("k > n", r[:7], [(0, 7)], [9]),
        ("k = 0", r[:7], [(0, 7)], [0]),
        ("ties", [1.0, -2.0, 2.0, 1.0, -1.0, 2.0, 0.5, -2.0], [(0, 8)], [2]),
        ("ties at the k-th", [1.0, -2.0, 2.0, 1.0, -1.0, 2.0, 0.5, -1.0], [(0, 8)], [4]),
        ("all equal", [0.25] * 40, [(0, 40)], [7]),
        ("signed zeros", [0.0, -0.0, 0.0, 1e-30, -0.0], [(0, 5)], [3]),
        ("nan and inf", [1.0, nan, -inf, 3.0, inf, nan, 2.0], [(0, 7)], [3]),
        ("more nan than k", [nan, 1.0, nan, nan, inf], [(0, 5)], [2]),
        ("one value", [-4.0], [(0, 1)], [1]),
        ("ties at the k-th, k << n", [0.5] * 20 + [-2.0, 1.0, 2.0, 2.0, 1.0, -2.0, 2.0] + [0.5] * 21, [(0, 48)], [4]),
        ("nan, k << n", r[:20] + [nan, 1.0, -inf] + r[20:40], [(0, 43)], [3]),
        ("more nan than k, k << n", r[:30] + [nan] * 5 + r[30:60], [(0, 65)], [2]),
        ("ranges with gaps", r[:100], [(3, 20), (40, 41), (60, 100)], [4, 1, 10]),
        ("empty range", r[:10], [(4, 4), (5, 10)], [3, 2]),
        ("many ranges", r, [(i, i + 30) for i in range(0, 300, 30)], [1, 2, 3, 30, 5, 6, 7, 8, 9, 40]),
    ]


@pytest.mark.parametrize("dtype,index_dtype", KINDS)
def test_reference_obeys_the_rule_on_edge_cases(dtype, index_dtype):
    for name, values, ranges, ks in edge_cases():
        x = torch.tensor(values, dtype=dtype)
        got = exact_topk.reference(x, ranges, ks, index_dtype)
        assert got.dtype == index_dtype
        assert got.tolist() == oracle(x.tolist(), ranges, ks), name


@pytest.mark.parametrize("piece", [exact_topk.PIECE, 3])
def test_rest_and_top_into_are_the_rule_and_its_complement(monkeypatch, piece):
    """rest_of (the positions top_of leaves out) and top_into (top_of written into a given
    vector, from rest_of where k > n / 2) on the edge cases at every k that matters, with the
    pieces of the range as they are and 3 positions long."""
    monkeypatch.setattr(exact_topk, "PIECE", piece)
    gen = torch.Generator().manual_seed(5)
    cases = [(name, torch.tensor(v[a:b])) for name, v, ranges, _ in edge_cases() for a, b in ranges] + [
        ("ties, 5000", torch.randint(-3, 4, (5000,), generator=gen).float()), ("zeros", torch.zeros(300))]
    for name, x in cases:
        n = x.numel()
        for k in sorted({0, 1, n // 2, n // 2 + 1, n - 2, n - 1, n, n + 1}):
            want = oracle(x.tolist(), [(0, n)], [k])
            for dtype in (torch.int32, torch.int64):
                out = torch.full((n + 2,), -1, dtype=dtype)
                got = exact_topk.top_into(x.abs(), k, out)
                assert got.tolist() == want and out[len(want):].eq(-1).all(), (name, k, dtype)
            assert exact_topk.rest_of(x.abs(), k).tolist() == sorted(set(range(n)) - set(want)), (name, k)


def search(x, ranges, ks, index_dtype, backend, mode="g+m"):
    """The search over x given as g + m (m = x / 2, g the rest: x again but for the sign of a
    zero), copied, or read in place. Returns (the search, what it found, the x it built)."""
    n, dtype = x.numel(), x.dtype
    s = exact_topk.TopKSearch(ranges, ks, backend=backend)
    if mode == "g+m":
        m = torch.where(torch.isfinite(x), x * 0.5, torch.zeros_like(x))
        g = torch.where(torch.isfinite(x), x - m, x)
        x = m + g
        out, found = s(g, m, torch.full((n,), 7.0, dtype=dtype), index_dtype)
    elif mode == "copy":
        out, found = s(x, None, torch.empty(n, dtype=dtype), index_dtype)
    else:
        out, found = s(x, None, None, index_dtype)
    assert same(out, x)
    return s, found, x


def check_search(backend, kinds=KINDS, modes=("g+m", "copy", "in place"), big=20_000):
    gen = torch.Generator().manual_seed(11)
    large = torch.randn(big, generator=gen)
    cases = [(name, torch.tensor(v), rg, ks) for name, v, rg, ks in edge_cases()] + [
        ("large, one range", large, [(0, big)], [big // 1000]),
        ("large, layer-wise", large, [(0, 3), (3, 700), (700, big // 2), (big // 2, big)], [1, 7, 9, 10]),
        ("large, ties", torch.randint(-3, 4, (big,), generator=gen).float(), [(0, big)], [big // 100]),
        ("large, all equal", torch.ones(big), [(0, big // 2), (big // 2, big)], [5, 17]),
    ]
    for dtype, index_dtype in kinds:
        for name, x, ranges, ks in cases:
            for mode in modes:
                _, found, built = search(x.to(dtype), ranges, ks, index_dtype, backend, mode)
                want = exact_topk.reference(built, ranges, ks, index_dtype)
                where = (backend, dtype, index_dtype, name, mode)
                assert same(found.indices, want), where
                assert same(found.values, built[want.long()]), where
                assert bool(found.finite) == bool(torch.isfinite(built).all()), where


def test_compiled_search_matches_the_reference():
    assert fused.unavailable_reason(torch.device("cpu"), torch.float32, torch.int32) is None, "gcc is needed here"
    check_search("c")


def check_rare_paths(backend):
    """A sample that meets more of the largest values than chance would (its bound is too
    high: the range is read again, lower) and a bound with more candidates than room (read
    again, with room)."""
    n, k = 50_000, 50
    s = exact_topk.TopKSearch([(0, n)], [k], backend=backend)
    x = torch.randn(n, generator=torch.Generator().manual_seed(5)) * 1e-3
    s(x, None, None, torch.int32)  # draws the sample
    (sampled,) = s.samples.values()
    x[sampled[:40]] = 20.0  # 40 of the top 50, all in the sample
    hidden = torch.arange(1, n, 997)
    hidden = hidden[~torch.isin(hidden, sampled)][:30]
    x[hidden] = 5.0  # the other 10: the first of 30 ties, none sampled
    _, found = s(x, None, None, torch.int32)
    assert s.last["repassed"] > 0
    assert same(found.indices, exact_topk.reference(x, [(0, n)], [k], torch.int32))
    assert found.indices.tolist() == sorted(sampled[:40].tolist() + hidden[:10].tolist())
    ties = torch.ones(n)
    _, found = s(ties, None, None, torch.int32)  # everything passes a bound of 1
    assert s.last["candidates"] == n
    assert found.indices.tolist() == list(range(k))


def test_compiled_search_reads_again_where_the_sample_misled_it():
    check_rare_paths("c")


def mixed_cases(seed=0, layers=60):
    """(name, x, ranges, ks) with many ranges of mixed sizes, as one per layer: most shorter
    than the sample (read whole), a few longer, gaps and empty ranges between them, k from 0
    to past the range's length; random values, then the same ranges over ties, all equal,
    and with NaN and Inf."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(v) for v in torch.randint(0, 300, (layers,), generator=gen)]
    sizes[::7] = [int(v) for v in torch.randint(5000, 40_000, (len(sizes[::7]),), generator=gen)]
    sizes[3] = 0
    ranges, ks, at = [], [], 0
    for i, size in enumerate(sizes):
        at += 5 if i % 5 == 0 else 0  # a gap
        ranges.append((at, at + size))
        ks.append(max(1, size // 1000) if i % 9 else [0, 1, size, size + 3][i // 9 % 4])
        at += size
    n = at + 11
    random = torch.randn(n, generator=gen)
    ties = torch.randint(-3, 4, (n,), generator=gen).float()
    special = random.clone()
    special[torch.randint(0, n, (5,), generator=gen)] = float("nan")
    special[torch.randint(0, n, (5,), generator=gen)] = float("inf")
    return [("mixed, random", random, ranges, ks), ("mixed, ties", ties, ranges, ks),
            ("mixed, all equal", torch.full((n,), -0.5), ranges, ks), ("mixed, nan and inf", special, ranges, ks)]


def check_mixed(backend, kinds=KINDS, modes=("g+m", "copy", "in place"), seeds=(0, 1)):
    for seed in seeds:
        for name, x, ranges, ks in mixed_cases(seed):
            for dtype, index_dtype in kinds:
                for mode in modes:
                    s, found, built = search(x.to(dtype), ranges, ks, index_dtype, backend, mode)
                    want = exact_topk.reference(built, ranges, ks, index_dtype)
                    where = (backend, seed, name, dtype, index_dtype, mode)
                    assert same(found.indices, want), where
                    assert same(found.values, built[want.long()]), where
                    if name == "mixed, random":  # the sample's bounds held: nothing read twice
                        assert s.last["repassed"] == 0.0, where


def test_compiled_search_over_many_ranges_of_mixed_sizes_matches_the_reference():
    check_mixed("c")


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_compiled_bounds_equal_the_batched_torch_bounds(dtype):
    """The C backend's bounds (one call over every range, a short sorted array for small ranks,
    the quickselect for large ones) are the batched torch selection's, bit for bit."""
    gen = torch.Generator().manual_seed(9)
    sizes = [10, 300, 4000, 5000, 70_000, 1000, 2, 9000]
    ranges, at = [], 0
    for size in sizes:
        ranges.append((at, at + size))
        at += size
    ks = [3, 100, 40, 5, 70, 999, 1, 200]  # ranks above and below the short array's 64
    g = torch.randn(at, generator=gen, dtype=dtype)
    m = torch.randint(-2, 3, (at,), generator=gen).to(dtype)  # ties in the sample
    s = exact_topk.TopKSearch(ranges, ks, backend="c")
    s(g, m, torch.empty_like(g), torch.int32)
    plan = s._plan
    assert max(plan.ranks) > 64 and min(plan.ranks) < 64 and not all(plan.whole) and any(plan.whole)
    for mm in (m, None):
        batch = s._batch(plan, True)
        got = torch.empty(len(batch.read), dtype=dtype)
        fused_cpu.sample_bounds(g, mm, batch.bounds, batch.offsets, batch.lengths, batch.positions, batch.ranks,
                                got, torch.empty(batch.longest, dtype=dtype))
        sampled = exact_topk._sample_matrix(plan, g, mm)
        want = torch.stack([torch.topk(row, rank).values[-1] for row, rank in zip(sampled, plan.ranks)])
        assert same(got[plan.chosen], want)
        assert torch.isnan(got[[i for i in range(len(batch.read)) if i not in plan.chosen]]).all()


@pytest.mark.parametrize("dtype,index_dtype", KINDS)
def test_compiled_rule_over_many_ranges_keeps_what_the_reference_keeps(dtype, index_dtype):
    """keep_top_ranges on candidates heavy with ties (few distinct values, sorted runs, all
    equal) against top_of, range by range, compacted to the front."""
    gen = torch.Generator().manual_seed(4)
    counts = [0, 1, 7, 500, 3000, 64, 65, 2000, 2000]
    ks = [0, 1, 3, 499, 1000, 64, 1, 1999, 7]
    parts = [torch.randint(0, 5, (counts[0],), generator=gen), torch.tensor([2.0]), torch.randn(7, generator=gen),
             torch.randint(-4, 5, (500,), generator=gen), torch.randn(3000, generator=gen),
             torch.full((64,), 3.0), torch.arange(65.0), torch.arange(2000.0).flip(0), torch.ones(2000)]
    slots, at = [], 3
    room = sum(counts) + 3 * len(counts) + 3
    idx = torch.full((room,), -1, dtype=index_dtype)
    val = torch.full((room,), 99.0, dtype=dtype)
    want_i, want_v = [], []
    for part, k in zip(parts, ks):
        part = part.to(dtype)
        slots.append(at)
        positions = torch.arange(at, at + part.numel()) * 3
        idx[at:at + part.numel()] = positions.to(index_dtype)
        val[at:at + part.numel()] = part
        keep = exact_topk.top_of(part.abs(), k, finite=True)
        want_i.append(positions[keep])
        want_v.append(part[keep])
        at += part.numel() + 3
    longs = lambda v: torch.tensor(v, dtype=torch.int64)  # noqa: E731
    kept = fused_cpu.keep_top_ranges(idx, val, longs(slots), longs(counts), longs(ks), torch.empty(max(counts), dtype=dtype))
    assert kept == sum(min(k, c) for k, c in zip(ks, counts))
    assert idx[:kept].tolist() == torch.cat(want_i).tolist()
    assert same(val[:kept], torch.cat(want_v))


def quickselect_killer(c):
    """c distinct magnitudes in an order where the C quickselect's middle pivot is always the
    smallest left (McIlroy's adversary, replaying its partition for k = 1): without its round
    limit it would take c rounds."""
    ids, value, frozen = list(range(c)), {}, 0
    lo, hi = 0, c
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        value[ids[mid]] = frozen  # the pivot: the smallest of what is left
        frozen += 1
        ids[mid], ids[hi - 1] = ids[hi - 1], ids[mid]
        at = lo
        for j in range(lo, hi - 1):  # every other value (still free) is above the pivot
            ids[j], ids[at] = ids[at], ids[j]
            at += 1
        hi = at
    out = [0.0] * c
    for i in range(c):
        out[i] = float(value.get(i, c))
    return out


def test_compiled_rule_stays_exact_where_the_quickselect_meets_its_worst_order():
    values = torch.tensor(quickselect_killer(5000))
    for k in (1, 2, 17):
        idx = torch.arange(values.numel(), dtype=torch.int64)
        val = values.clone()
        fused_cpu.keep_top(idx, val, k, torch.empty(values.numel()))
        want = exact_topk.top_of(values.abs(), k, finite=True)
        assert idx[:k].tolist() == want.tolist() and same(val[:k], values[want])


@pytest.mark.skipif(not fused.triton_importable(), reason="triton is not installed")
def test_triton_search_matches_the_reference_under_the_interpreter():
    code = ("import test_exact_topk as t, torch\n"
            "t.check_search('triton', ((torch.float32, torch.int32), (torch.float64, torch.int64)), "
            "('g+m', 'in place'), big=5000)\n"
            "t.check_rare_paths('triton')\n"
            "t.check_mixed('triton', ((torch.float32, torch.int32),), ('g+m', 'in place'), seeds=(0,))\n"
            "print('ok')\n")
    here = os.path.dirname(__file__)
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_a_search_that_selects_nothing_still_builds_x_and_reports_its_finiteness():
    """A CLT-k follower's pass: no range selects, x = g + m is written, a NaN is reported."""
    g, m = torch.randn(5000), torch.randn(5000)
    g[4321] = float("nan")
    x, found = exact_topk.TopKSearch([(0, 5000)], [0], backend="c")(g, m, torch.empty(5000), torch.int32)
    assert same(x, m + g) and found.indices.numel() == 0 and not bool(found.finite)


def test_overlapping_ranges_are_refused():
    with pytest.raises(ValueError, match="top-k ranges overlap at position 5"):
        exact_topk.reference(torch.randn(10), [(0, 6), (5, 10)], [1, 1], torch.int32)


def test_topk_methods_default_to_the_fused_search_and_agree_with_torch_when_k_is_n(clusters):
    for name in METHODS:
        r = reducers.build(name, density=0.1)
        r.reduce([torch.randn(100), torch.randn(7)])
        assert r.describe() == {"selection": "fused"} and r.options()["selection"] == "auto"
        compare(clusters(2).run(fs.both_paths, name, steps=3, density=1.0), f"{name} k = n")
