"""Is torch.compile a win for the native engine's decode step? Eager vs compiled `native.blocks`, one run.

    .venv/bin/python benchmarks/compile_blocks.py [--dtype fp16|fp32|bf16] [--threads 2] [--rounds 20]

Compiles the 30 decoder layers of SmolLM2-135M (dynamic shapes: the cache position changes every step), reports
the compile time, the largest difference from eager, and the median ms of one-token steps at a 200-token context.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from bild import native
from bild.models import DTYPES
from native_forward import load_model


def median_ms(fn, rounds: int) -> float:
    for _ in range(3):
        fn(0)
    times = []
    for i in range(rounds):
        t = time.perf_counter()
        fn(i % 5)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runner = native.NativeRunner.from_hf(load_model(), dtype=DTYPES[args.dtype], max_length=1024)
    context = list(range(200, 400))
    runner.start(context)
    runner.forward(context)
    model, cache = runner.model, runner.cache
    x = F.embedding(torch.tensor([1000]), model.embed)  # (1, dim)
    compiled = torch.compile(native.blocks, dynamic=True)
    with torch.inference_mode():
        t = time.perf_counter()
        y = compiled(model, cache, x, 200)
        compile_s = time.perf_counter() - t
        diff = (y - native.blocks(model, cache, x, 200)).abs().max().item()
        eager = median_ms(lambda i: native.blocks(model, cache, x, 200 + i), args.rounds)
        fast = median_ms(lambda i: compiled(model, cache, x, 200 + i), args.rounds)
    print(f"{args.dtype}, {args.threads} threads: compile {compile_s:.1f} s, max |compiled - eager| {diff:.3g}; "
          f"one-token step over 30 layers: eager {eager:.1f} ms, compiled {fast:.1f} ms")


if __name__ == "__main__":
    main()
