"""What bitwise-exact bf16 steps cost `ar`: an interleaved A/B in one process.

    .venv/bin/python benchmarks/exact_steps_ab.py [--prompts 4] [--tokens 64] [--threads 1]

Four variants of the native engine, each decoding the same held-out ShareGPT prompts greedily with `ar`:
both measures (the default), the batch-invariant step attention only, two-row matmuls only, and neither
(SDPA and oneDNN's one-row kernel: faster, but verification then rounds differently from one-token steps).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bild import BigLittle, native
from bild.bench.datasets import load_items


def one_row_linear(x, w, b=None):
    """native.linear without the two-row trick."""
    if w.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
    return torch.nn.functional.linear(x, w, b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bl = BigLittle.load("smollm2-135m")
    items = load_items("sharegpt", args.prompts)
    exact_linear, step_tokens = native.linear, native.STEP_TOKENS
    variants = {"both (default)": (step_tokens, exact_linear),
                "invariant attention only": (step_tokens, one_row_linear),
                "two-row matmuls only": (0, exact_linear), "neither": (0, one_row_linear)}
    speeds = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (native.STEP_TOKENS, native.linear) in variants.items():
            for item in items:
                res = bl.generate(item.prompt, policy="ar", max_new_tokens=args.tokens)
                speeds[name].append(res.stats.tokens_per_s)
    native.STEP_TOKENS, native.linear = step_tokens, exact_linear
    for name, values in speeds.items():
        print(f"{name:26s} {statistics.mean(values):6.1f} tok/s")


if __name__ == "__main__":
    main()
