"""Row-wise top-k selection: `saebench.sae.topk.row_topk` (through group maxima) against torch.topk.

For each (n, k) it times both on the same random (rows, n) pre-activations, rows = 2^24 / n (one trainer
chunk of 64 MB in float32), checks that they select the same values, and prints the medians and their
ratio.

    python benchmarks/topk_selection.py [--n 2048 4096 16384 65536] [--k 16 32 64 128] [--repeats 7]
                                        [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from saebench.sae.topk import grouped, row_topk


def median_ms(fn, repeats: int, device: torch.device) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, nargs="+", default=[2048, 4096, 16384, 65536])
    parser.add_argument("--k", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    print(f"device={device} threads={torch.get_num_threads()}")
    print(f"{'n':>6} {'k':>4} {'rows':>6} {'path':>8} {'torch.topk ms':>14} {'row_topk ms':>12} {'ratio':>6}")
    for n in args.n:
        rows = max(1, (1 << 24) // n)
        x = torch.randn(rows, n, generator=generator, device=device)
        for k in args.k:
            if k > n:
                continue
            expected = torch.topk(x, k, dim=1).values
            values, indices = row_topk(x, k)
            same = torch.equal(values.sort(1, descending=True).values, expected)
            same = same and torch.equal(x.gather(1, indices), values)
            if not same:
                raise SystemExit(f"row_topk disagrees with torch.topk at n={n}, k={k}")
            theirs = median_ms(lambda: torch.topk(x, k, dim=1, sorted=False), args.repeats, device)  # noqa: B023
            ours = median_ms(lambda: row_topk(x, k), args.repeats, device)  # noqa: B023
            path = "grouped" if grouped(n, k, device) else "topk"
            print(f"{n:>6} {k:>4} {rows:>6} {path:>8} {theirs:>14.2f} {ours:>12.2f} {theirs / ours:>5.2f}x")


if __name__ == "__main__":
    main()
