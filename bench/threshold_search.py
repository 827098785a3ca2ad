"""How long threshold_select takes at several densities and block lengths (one CPU thread).

    .venv/bin/python bench/threshold_search.py [--numel 11173962] [--threads 1]

Prints milliseconds per call (median of 5) for blocks of 0 (the direct search), 16, 32, 64,
128 and 256 elements, next to one read pass over the vector (the memory floor). The block
length rule in sparsecomm.reducers.select.primitives.search_block comes from this table.
"""
import argparse
import statistics
import time

import torch

from sparsecomm.reducers.select.primitives import threshold_select


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--numel", type=int, default=11_173_962)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=15, help="timed calls per cell (the median is shown)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randn(args.numel, generator=torch.Generator().manual_seed(0))
    scratch = torch.empty_like(x)
    blocks = (0, 16, 32, 64, 128, 256)
    print(f"d = {args.numel:,}, threads = {args.threads}, floor (x.sum()) {median_ms(x.sum, args.reps):.1f} ms")
    print("density  " + "".join(f"{'block ' + str(b):>11}" for b in blocks))
    for density in (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1):
        lam = statistics.NormalDist().inv_cdf(1 - density / 2)  # P(|x| >= lam) = density
        row = [median_ms(lambda: threshold_select(x, lam, torch.int32, block=b, scratch=scratch), args.reps)
               for b in blocks]
        print(f"{density:<9}" + "".join(f"{ms:>11.1f}" for ms in row))


if __name__ == "__main__":
    main()
