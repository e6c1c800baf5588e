"""Where a little model's one-token step goes: the step of its first 1, 6, 12, ... layers (same head), so the
slope is the cost of one layer and the intercept that of the head and embedding; beside a plain read of as many
bytes as a layer holds (torch fp32 sum over a large buffer), all in interleaved rounds.

    .venv/bin/python benchmarks/little_layers.py [--little DIR] [--rounds 30] [--threads 2]   # default: the pair's little

A layer's time near its bytes over the read bandwidth means the step is bound by memory, and only fewer bytes make
the little cheaper; well above it, the kernels or the per-layer work (attention, norms, rope) are the lever.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from native_forward import interleaved, memory_read

from bild import models
from bild.api import BigLittle, gguf_little_runner
from bild.native import NativeRunner, keep_layers
from bild.native.model import streamed_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--little", default=None, help="a little model directory or GGUF (default: the big's own)")
    p.add_argument("--big", default="qwen2.5-coder-1.5b", help="whose tokenizer makes the prompt")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    bl = BigLittle.load(args.big, little="early-exit:1")
    args.little = args.little or models.default_little(args.big)
    little, _ = gguf_little_runner(args.little, bl.big_runner, True)
    model, prompt = little.model, bl.encode("def fibonacci(n):\n    " * 20)
    n = model.config.n_layers
    counts = sorted({1, n // 4, n // 2, n} - {0})
    steps = {}
    for k in counts:
        runner = NativeRunner(keep_layers(model, list(range(k))))
        runner.start(prompt), runner.forward(prompt)
        base, token = len(prompt), prompt[-1]

        def step(runner=runner, base=base, token=token):
            runner.forward([token])
            runner.crop(base)
        steps[f"{k} layers"] = step
    per_layer = (streamed_bytes(model) - streamed_bytes(keep_layers(model, [0]))) / (n - 1)
    steps["read"] = memory_read(int(per_layer) * 64)
    times = {k: statistics.median(v) for k, v in interleaved(steps, args.rounds).items()}
    best_read = min(interleaved({"read": steps["read"]}, 10)["read"])
    bandwidth = per_layer * 64 / best_read
    slope = (times[f"{n} layers"] - times["1 layers"]) / (n - 1)
    print(f"little {args.little}: {n} layers, {streamed_bytes(model) / 1e6:.0f} MB a token, "
          f"{per_layer / 1e6:.2f} MB a layer; read {bandwidth / 1e9:.1f} GB/s (best of 10)\n")
    print("| layers | step (median ms) |\n|---|---|")
    for k in counts:
        print(f"| {k} | {times[f'{k} layers'] * 1e3:.2f} |")
    print(f"\none layer: {slope * 1e3:.3f} ms, against {per_layer / bandwidth * 1e3:.3f} ms to read its bytes "
          f"({slope * bandwidth / per_layer:.2f}x); head, embedding and one layer: {times['1 layers'] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
