"""The exact top-k on one device: the sampled-bound search (Triton on CUDA, the C loop on CPU)
against the torch reference, for correctness (the same positions and values, bit for bit, on
edge cases) and speed in read passes of the gradient (one pass is ``flat.sum()``, as
bench/reducers.py measures it), beside plain torch.topk (no tie rule), ``x = g + m`` alone
(``add``) and the fused threshold pass alone at a bound that passes about 3k (``fused_pass``:
what the search costs at the least).

    .venv/bin/python bench/topk_check.py --out OUT/topk.json      # needs CUDA and triton
    .venv/bin/python bench/topk_check.py --device cpu             # the C loop, one thread

Sizes: the ResNet-18 gradient (11,173,962 values in 62 tensors; ``--models tiny``: 1,300 in 3,
for a rehearsal), float32, density 0.001, x = g + m built in the same pass; layer-wise (one k
per tensor) and global (one k). Exits 2 with one line when the fused path cannot run here.
"""
from __future__ import annotations

import argparse

import torch

from sparsecomm.reducers.select import exact_topk, fused
from sparsecomm.reducers.select.primitives import target_count

from fused_check import device_for, finish, timed  # bench/fused_check.py: the device, the report, timing
import reducers as bench_reducers  # bench/reducers.py: the models' shapes

DENSITY = 0.001


def segments(sizes: list[int]) -> list[tuple[int, int]]:
    out, at = [], 0
    for n in sizes:
        out.append((at, at + n))
        at += n
    return out


def edge_cases(device: torch.device) -> list[tuple[str, torch.Tensor, list[tuple[int, int]], list[int]]]:
    gen = torch.Generator(device=device).manual_seed(7)
    big = 3_000_000
    large = torch.randn(big, generator=gen, device=device)
    ties = torch.randint(-3, 4, (big,), generator=gen, device=device).float()
    special = torch.randn(5000, generator=gen, device=device)
    special[[3, 70, 900]] = torch.tensor([float("nan"), float("inf"), -float("inf")], device=device)
    return [
        ("k = 1", large[:5000], [(0, 5000)], [1]),
        ("k = n", large[:5000], [(0, 5000)], [5000]),
        ("all equal", torch.ones(100_000, device=device), [(0, 100_000)], [77]),
        ("ties", ties, [(0, big)], [3000]),
        ("NaN and Inf", special, [(0, 5000)], [4]),
        ("smaller than the sample", large[:500], [(0, 100), (100, 500)], [3, 9]),
        ("global", large, [(0, big)], [3000]),
        ("layer-wise", large, segments([1000, 999_000, 2_000_000]), [1, 999, 2000]),
    ]


def correctness(device: torch.device) -> list[str]:
    """Every edge case with x given as g + m and read in place; returns the failures."""
    failures = []
    for name, x, ranges, ks in edge_cases(device):
        m = torch.where(torch.isfinite(x), x * 0.5, torch.zeros_like(x))
        g = torch.where(torch.isfinite(x), x - m, x)
        built = m + g
        want = exact_topk.reference(built, ranges, ks, torch.int32)
        for label, args in (("g + m", (g, m, torch.empty_like(g))), ("in place", (built, None, None))):
            out, found = exact_topk.TopKSearch(ranges, ks)(*args, torch.int32)
            ok = (torch.equal(out.view(torch.int32), built.view(torch.int32)) and torch.equal(found.indices, want)
                  and torch.equal(found.values.view(torch.int32), built[want.long()].view(torch.int32)))
            if not ok:
                failures.append(f"{name} ({label})")
    return failures


def speed(device: torch.device, model: str, reps: int) -> dict:
    sizes = [bench_reducers.numel(s) for s in bench_reducers.model_shapes(model)]
    d = sum(sizes)
    gen = torch.Generator(device=device).manual_seed(0)
    g = torch.randn(d, generator=gen, device=device)
    m = torch.randn(d, generator=gen, device=device) * 0.3
    x = torch.empty_like(g)
    scratch = torch.empty_like(g)
    floor = timed(g.sum, reps)
    row: dict = {"d": d, "floor_s": floor, "add_s": timed(lambda: torch.add(m, g, out=x), reps)}
    bound = float(torch.topk(torch.add(m, g).abs_(), 3 * target_count(DENSITY, d)).values[-1])  # about 3k pass
    row["fused_pass_s"] = timed(lambda: fused.compensate_select(g, m, x, bound, 0, d, torch.int32, 4 * d // 1000), reps)
    for scope, ranges, ks in (("layer", segments(sizes), [target_count(DENSITY, n) for n in sizes]),
                              ("global", [(0, d)], [target_count(DENSITY, d)])):
        search = exact_topk.TopKSearch(ranges, ks)

        def reference():
            torch.add(m, g, out=x)
            exact_topk.reference(x, ranges, ks, torch.int32, scratch)

        def plain():
            torch.add(m, g, out=x)
            for (a, b), k in zip(ranges, ks):
                torch.topk(torch.abs(x[a:b], out=scratch[:b - a]), k, sorted=False)

        row[f"{scope}_torch_topk_s"] = timed(plain, reps)
        row[f"{scope}_reference_s"] = timed(reference, reps)
        row[f"{scope}_search_s"] = timed(lambda: search(g, m, x, torch.int32), reps)
        row[f"{scope}_reread"] = search.last.get("repassed", 0.0)
    row["passes"] = {k[:-2]: v / floor for k, v in row.items() if k.endswith("_s") and k != "floor_s"}
    print(f"{model}: d = {d:,}, one read pass {floor * 1e3:.3f} ms; read passes (x = g + m included): "
          + ", ".join(f"{k} {v:.2f}" for k, v in row["passes"].items()), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--models", default="resnet18", help="comma-separated: resnet18, lstm, tiny")
    p.add_argument("--out", default="bench/results/topk.json")
    args = p.parse_args()
    device = device_for("topk_check", args.device)
    finish(device, correctness(device),
           lambda: {model: speed(device, model, args.reps) for model in args.models.split(",") if model}, args.out)


if __name__ == "__main__":
    main()
