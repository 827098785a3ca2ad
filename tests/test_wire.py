"""Wire formats of the sparse exchanges (sparsecomm/reducers/comm/wire.py): codes that decode to
what was encoded, real gloo process groups of 1 to 4 workers in which every format gives
identical averages on every rank, exact conservation with 16-bit values, the same average
bit for bit as int32 positions when values travel in full, payloads of exactly the encoded
size, and a state round trip."""
import math

import pytest
import torch

from sparsecomm import reducers
from sparsecomm.reducers.comm import wire
from reducer_scenarios import SHAPES, flat, make_grads, resume_matches
from wire_scenarios import edge_formats, run_formats

FULL = [("full", "int32"), ("full", "bitmap"), ("full", "delta"), ("full", "auto")]
ROUNDED = [("fp16", "int32"), ("fp16", "delta"), ("bf16", "bitmap")]
CASES = [("topk", {}), ("global_topk", {"exchange": "union"}), ("sage", {}), ("micro", {}),
         ("exdyna", {"num_blocks": 16})]
UNION = {"global_topk", "micro", "exdyna"}
D = sum(math.prod(s) for s in SHAPES)


def test_codes_round_trip_at_the_size_they_claim():
    gen = torch.Generator().manual_seed(1)
    for span in (1, 2, 7, 8, 9, 31, 100, 1000, 4097):
        for n in sorted({1, 2, 3, 5, 50, span}):
            if n > span:
                continue
            for count in sorted({1, max(1, n // 2), n}):
                pos = torch.sort(torch.randperm(span, generator=gen)[:count]).values
                for kind in ("bitmap", "delta"):
                    data = wire.encode_positions(pos, kind, n, span)
                    assert data.dtype == torch.uint8 and data.numel() == wire.index_bytes(kind, n, span)
                    assert torch.equal(wire.decode_positions(data, count, kind, n, span), pos), (kind, n, span)


def test_delta_is_close_to_the_floor_and_auto_takes_the_smallest():
    for span, n in ((11_000_000, 11_000), (11_000_000, 110_000), (4096, 1)):
        floor = wire.floor_bits(span, n, 0, 0)
        assert wire.index_bytes("delta", n, span) * 8 <= floor + 2.1 * n + 16
    fmt = wire.WireFormat(indices="auto")
    assert fmt.index_kind(10, 100_000) == "delta"
    assert fmt.index_kind(60_000, 100_000) == "bitmap"
    assert fmt.index_kind(1, 8) in ("int32", "delta", "bitmap")


def test_values_keep_what_rounding_lost_exactly():
    v = torch.tensor([1e-3, -3.3, 70000.0, -1e9, 1e-30, 0.0, 123.456])
    for name in ("fp16", "bf16"):
        sent, kept = wire.WireFormat(values=name).encode_values(v)
        assert sent.dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
        assert torch.isfinite(sent).all()
        assert torch.equal(sent.float() + kept, v)
    same, nothing = wire.WireFormat(values="fp16").encode_values(v.half())
    assert nothing is None and same.dtype == torch.float16


def test_options_are_checked_listed_and_kept():
    with pytest.raises(ValueError, match=r"^values must be one of \['full', 'fp16', 'bf16'\], got 'fp8'$"):
        reducers.build("topk", values="fp8")
    with pytest.raises(ValueError, match=r"^indices must be one of \['int32', 'bitmap', 'delta', 'auto'\]"):
        reducers.build("exdyna", indices="varint")
    for name in ("topk", "global_topk", "thresh", "sage", "micro", "exdyna", "accordion", "legacy"):
        assert reducers.method_options(name)["values"] == "full"
        assert reducers.method_options(name)["indices"] == "int32"
        assert reducers.build(name, values="bf16", indices="delta").options()["indices"] == "delta"
    assert "values" not in reducers.method_options("randomk")
    # the default format leaves options() (saved states, run records) as they were
    assert reducers.build("topk").options() == {"exchange": "gather", "selection": "auto"}
    with pytest.raises(ValueError, match="does not match"):
        reducers.build("topk").load_state_dict(reducers.build("topk", values="fp16").state_dict())


def _row_bytes(values: str, kind: str, n: int, span: int) -> int:
    """Expected payload of one worker's row, from the format's definition (not wire.py's)."""
    vs = 4 if values == "full" else 2
    if kind == "int32":  # int32 and values, the pair count rounded up to keep 4-byte alignment
        return (n + (n * (4 + vs)) % 4 // 2) * (4 + vs)
    return -(-(n * vs + _index_bytes(kind, n, span)) // vs) * vs


def _index_bytes(kind: str, n: int, span: int) -> int:
    if kind == "int32":
        return 4 * n
    if kind == "bitmap":
        return (span + 7) // 8
    low = int(math.floor(math.log2(span / n))) if span > n else 0
    return (n * low + 7) // 8 + (n + ((span - 1) >> low) + 1 + 7) // 8


def _resolved(indices: str, n: int, span: int) -> str:
    return wire.WireFormat(indices=indices).index_kind(n, span)


@pytest.mark.parametrize("P", (1, 2, 3, 4))
def test_formats_across_processes(clusters, P):
    for name, options in CASES:
        results = clusters(P).run(run_formats, name, FULL + ROUNDED, options=options)
        base = results[0][FULL[0]]
        for fmt in FULL + ROUNDED:
            mine = [res[fmt] for res in results]
            prev = [torch.zeros(D) for _ in range(P)]
            for t in range(len(mine[0]["avg"])):
                where = f"{name} {fmt} P={P} step {t}"
                avg = mine[0]["avg"][t]
                for r in range(1, P):
                    assert torch.equal(mine[r]["avg"][t], avg), f"{where}: rank {r} differs"
                x_sum = sum(prev[w] + flat(make_grads(SHAPES, w, t)) for w in range(P))
                residuals = [m["memory"][t] for m in mine]
                torch.testing.assert_close(P * avg + sum(residuals), x_sum, rtol=1e-5, atol=1e-6, msg=where)
                prev = residuals
                if fmt[0] == "full":
                    assert torch.equal(avg, base["avg"][t]), f"{where}: differs from int32"
                    assert torch.equal(mine[0]["memory"][t], base["memory"][t]), f"{where}: residual differs"
                # the payload is the encoded size, and it is what bytes_sent counts
                stats = [m["stats"][t] for m in mine]
                counts = [round(s["local_density"] * D) for s in stats]
                n = max(counts)
                span = max(round(s["partition_size"] * D) for s in stats) if "partition_size" in stats[0] else D
                kind = _resolved(fmt[1], n, span)
                log = mine[0]["collectives"][t]
                assert stats[0]["bytes_sent"] == sum(b for _, b in log), where
                union = round(stats[0]["density"] * D)
                if name in UNION or options.get("exchange") == "union":
                    assert log[-2] == ("gather", _index_bytes(kind, n, span)), (where, log)
                    vs = 4 if fmt[0] == "full" else 2
                    assert log[-1] == ("reduce" if fmt[0] == "full" else "gather", union * vs), (where, log)
                else:
                    assert log[-1] == ("gather", _row_bytes(fmt[0], kind, n, span)), (where, log, n, kind)
                assert stats[0]["bytes_sent"] >= stats[0]["wire_floor_bytes"] > 0, where
            if fmt[0] != "full":  # the rounding error stays behind: residuals differ from full values'
                assert not torch.equal(mine[0]["memory"][0], base["memory"][0]), f"{name} {fmt}: nothing kept"


@pytest.mark.parametrize("name,options", [("topk", {"values": "fp16", "indices": "delta"}),
                                          ("exdyna", {"values": "bf16", "indices": "bitmap", "num_blocks": 16}),
                                          ("sage", {"values": "bf16", "indices": "auto", "exchange": "union"})])
def test_state_round_trip(clusters, name, options):
    assert all(clusters(3).run(resume_matches, name, options=options))


@pytest.mark.parametrize("recipe", ("tiny_grads", "zeros_grads", "empty_grads", "half_grads", "bf16_grads"))
def test_edge_cases_on_four_workers(clusters, recipe):
    """d smaller than the worker count, nothing to send, no coordinates, 16-bit gradients."""
    names = ("topk", "global_topk", "sage", "micro", "exdyna")
    fmts = [("fp16", "delta"), ("bf16", "bitmap"), ("full", "auto")]
    results = clusters(4).run(edge_formats, recipe, names, fmts)
    for key, rows in results[0].items():
        for t, (avg, memory, x, before) in enumerate(rows):
            assert all(torch.equal(res[key][t][0], avg) for res in results[1:]), (recipe, key, t)
            assert torch.isfinite(avg).all(), (recipe, key, t)
            sent = sum(res[key][t][2].double() + res[key][t][3].double() - res[key][t][1].double()
                       for res in results)
            # 16-bit gradients: the average itself is 16-bit, its sums round at 2**-8 (bf16) of their terms
            atol = 1e-2 * float(sent.abs().max()) if recipe in ("half_grads", "bf16_grads") else 1e-6
            torch.testing.assert_close(4 * avg.double(), sent, rtol=1e-5, atol=atol, msg=f"{recipe} {key} {t}")
