"""Matmul kernels for one decode step of SmolLM2-135M, side by side: which one should the native engine use here?

    .venv/bin/python benchmarks/matmul_kernels.py [--threads 2] [--repeats 5]

Runs every weight product of one forward (30 layers x qkv, o, gate/up, down, plus the 49,152-row head) for k rows
(k = 1 a decode step, 2 the two-row form bild uses for one row, 9 a verification of 8 drafts) with:
plain fp32 F.linear, fp32 weights pre-packed for oneDNN (what bild.native uses in fp32), torch's weight-only
int8 product with per-row scales, and fbgemm's fp16-weight product (bild.native's fp16). Random weights of the
real shapes: only speed is measured. Prints best-of-repeats ms.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from bild import native

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]  # (out, in) per product


def kernels(weights: list[torch.Tensor]) -> dict:
    packed = [native.onednn_weight(w, 9) for w in weights]
    scales = [w.abs().amax(1) / 127 for w in weights]
    int8 = [(w / s[:, None]).round().clamp(-127, 127).to(torch.int8) for w, s in zip(weights, scales)]
    fp16 = [native.fp16_weight(w) for w in weights]
    return {
        "fp32 F.linear": lambda j, x: F.linear(x, weights[j]),
        "fp32 packed (oneDNN)": lambda j, x: torch.ops.mkldnn._linear_pointwise(x, packed[j], None, "none", [], ""),
        "int8 weight-only": lambda j, x: torch.ops.aten._weight_int8pack_mm(x, int8[j], scales[j]),
        "fp16 weights, fbgemm (what bild.native uses without bf16)":
            lambda j, x: torch.ops.quantized.linear_dynamic_fp16(x, fp16[j]),
    }


def step_ms(fn, k: int, repeats: int) -> float:
    xs = {i: torch.randn(k, i) for _, i in SHAPES}
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for j, (_, i) in enumerate(SHAPES):
            fn(j, xs[i])
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fns = kernels([torch.randn(o, i) * 0.02 for o, i in SHAPES])
    print(f"{len(SHAPES)} weight products per forward, {args.threads} threads, best of {args.repeats}; ms\n")
    print("| kernel | k=1 | k=2 | k=9 |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for name, fn in fns.items():
            print(f"| {name} | " + " | ".join(f"{step_ms(fn, k, args.repeats):.1f}" for k in (1, 2, 9)) + " |")


if __name__ == "__main__":
    main()
