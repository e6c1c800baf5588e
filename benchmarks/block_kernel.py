"""Microbenchmark of bild/kernels' block product: ns per Q4_1 block for 1, 4 and 9 rows of x, on 1 and 2 threads,
with fp32 activations and with int8 ones (`--activations int8`).

    .venv/bin/python benchmarks/block_kernel.py [--rounds 20]

A random (24576, 576) Q4_1 weight (442,368 blocks, 10.6 MB) against x (T, 576): the cost of rebuilding a block
and of each further row's products with it, which decides what a k-token verification costs against one token.
"""

from __future__ import annotations

import argparse
import time

import torch

from bild import kernels


def weight(n: int, k: int) -> kernels.BlockWeight:
    d = torch.rand(n, k // 32).half().float()  # (N, nb)
    m = -torch.rand(n, k // 32).half().float()  # (N, nb)
    q = torch.randint(0, 16, (n, k // 32, 32)).float()  # (N, nb, 32)
    return kernels.BlockWeight("q4_1", kernels._pack("q4_1", d, m, q), (n, k))


def ns_per_block(w: kernels.BlockWeight, rows: int, threads: int, rounds: int) -> float:
    x = torch.randn(rows, w.shape[1])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    for _ in range(3):
        kernels.linear(x, w)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        kernels.linear(x, w)
        best = min(best, time.perf_counter() - t)
    torch.set_num_threads(before)
    return best / w.data.shape[0] / w.data.shape[1] * 1e9 * threads  # per block, per thread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    if kernels.unavailable():
        raise SystemExit(f"block kernels unavailable: {kernels.unavailable()}")
    torch.manual_seed(0)
    w = weight(24576, 576)
    print("| activations | rows of x | threads | ns per block per thread (best) | vs 1 row |")
    print("|---|---|---|---|---|")
    for name, weights in (("fp32", w), ("int8", kernels.with_int8(w))):
        for threads in (1, 2):
            one = ns_per_block(weights, 1, threads, args.rounds)
            for rows in (1, 4, 9):
                ns = one if rows == 1 else ns_per_block(weights, rows, threads, args.rounds)
                print(f"| {name} | {rows} | {threads} | {ns:.2f} | {ns / one:.2f}x |")


if __name__ == "__main__":
    main()
