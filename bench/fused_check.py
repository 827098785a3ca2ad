"""The fused selection pass on a GPU: the Triton kernel against the torch reference, for
correctness (bit-identical positions, values, x and finiteness) and speed (in read passes of
the gradient: one pass is ``flat.sum()``, as bench/reducers.py measures it).

    .venv/bin/python bench/fused_check.py --out OUT/fused.json      # needs CUDA and triton
    .venv/bin/python bench/fused_check.py --device cpu              # the compiled C loop, one thread

Sizes: ResNet-18 (11,173,962) and the LSTM (28,949,319) flat gradients, float32, threshold
for 0.1% passing, the whole vector and one partition of two (exdyna/micro). Exits 2 with one
line when there is no CUDA device or no triton.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from sparsecomm.reducers.select import fused
from sparsecomm.reducers.select.primitives import ThresholdSearch

import results_files  # bench/results_files.py: earlier results are set aside

SIZES = {"resnet18": 11_173_962, "lstm": 28_949_319}


def timed(fn, reps: int) -> float:
    """Median seconds of ``fn`` with CUDA events (after one warm-up call); on CPU the minimum
    of ``reps`` wall-clock runs (the least disturbed by other processes)."""
    fn()
    if not torch.cuda.is_initialized():
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def correctness(device: torch.device) -> list[str]:
    """Small cases, edge cases included; returns the failures (empty when all agree)."""
    failures = []
    for n, start, end, thr, special in [(0, 0, 0, 0.5, None), (1, 0, 1, 0.0, None), (1000, 0, 1000, 99.0, None),
                                        (1000, 0, 1000, 0.0, None), (4099, 17, 3001, 1.5, "nan"),
                                        (5_000_003, 1_000_000, 4_000_000, 3.0, "inf"), (3000, 0, 3000, None, "nan")]:
        for dtype, index_dtype in ((torch.float32, torch.int32), (torch.float64, torch.int64)):
            gen = torch.Generator(device=device).manual_seed(n)
            g = torch.randn(n, generator=gen, device=device, dtype=dtype)
            m = torch.randn(n, generator=gen, device=device, dtype=dtype)
            if special == "nan" and n > 40:
                g[20] = float("nan")
            if special == "inf" and n > 40:
                m[38] = float("inf")
            for capacity in (None, 1):
                xr, want = fused.reference(g, m, torch.empty_like(g), thr, start, end, index_dtype)
                xf, got = fused.compensate_select(g, m, torch.empty_like(g), thr, start, end, index_dtype, capacity)
                ok = (torch.equal(xr.view(torch.uint8), xf.view(torch.uint8)) and torch.equal(want.indices, got.indices)
                      and torch.equal(want.values, got.values) and bool(want.finite) == bool(got.finite))
                if not ok:
                    failures.append(f"n={n} [{start}, {end}) thr={thr} {special} {dtype} capacity={capacity}")
    return failures


def speed(device: torch.device, reps: int) -> dict:
    out = {}
    for model, d in SIZES.items():
        gen = torch.Generator(device=device).manual_seed(0)
        g = torch.randn(d, generator=gen, device=device)
        m = torch.randn(d, generator=gen, device=device) * 0.3
        x = torch.empty_like(g)
        thr = 3.29  # |N(0, 1.04)| passes about 0.1%
        floor = timed(g.sum, reps)
        search, fsearch = ThresholdSearch(0.001), fused.FusedSearch()

        def torch_path(start=0, end=d):
            torch.add(m, g, out=x)
            lo, hi = torch.aminmax(x)
            torch.isfinite(lo) & torch.isfinite(hi)
            search(x, thr, torch.int32, start, end)

        row = {"floor_s": floor, "ef_add_s": timed(lambda: torch.add(m, g, out=x), reps)}
        row["torch_s"] = timed(torch_path, reps)
        row["fused_s"] = timed(lambda: fsearch(g, m, x, thr, 0, d, torch.int32), reps)
        row["torch_half_s"] = timed(lambda: torch_path(0, d // 2), reps)
        row["fused_half_s"] = timed(lambda: fsearch(g, m, x, thr, 0, d // 2, torch.int32), reps)
        row["passes"] = {k[:-2]: v / floor for k, v in row.items() if k.endswith("_s") and k != "floor_s"}
        out[model] = row
        print(f"{model}: d = {d:,}, one read pass {floor * 1e3:.3f} ms; read passes: "
              + ", ".join(f"{k} {v:.2f}" for k, v in row["passes"].items()), flush=True)
    return out


def device_for(prog: str, name: str) -> torch.device:
    """The device named ``cuda`` or ``cpu`` (one thread), or exit 2 with one line when the fused
    path cannot run there."""
    if name == "cpu":
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        print(f"{prog}: no CUDA device here; this check is for a machine with a GPU", file=sys.stderr)
        sys.exit(2)
    device = torch.device(name)
    reason = fused.unavailable_reason(device, torch.float32, torch.int32)
    if reason is not None:
        print(f"{prog}: the fused path cannot run here: {reason}", file=sys.stderr)
        sys.exit(2)
    return device


def finish(device: torch.device, failures: list[str], speed_of, out: str) -> None:
    """Say the correctness, time (``speed_of()``), write ``out`` and exit 1 on a failure."""
    print("correctness: " + ("all cases bit-identical" if not failures else f"{len(failures)} FAILED: "
                             + "; ".join(failures)), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu, one thread"
    result = {"device": name, "torch": torch.__version__, "failures": failures, "speed": speed_of()}
    results_files.keep_earlier(out)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    sys.exit(1 if failures else 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", default="bench/results/fused.json")
    args = p.parse_args()
    device = device_for("fused_check", args.device)
    finish(device, correctness(device), lambda: speed(device, args.reps), args.out)


if __name__ == "__main__":
    main()
