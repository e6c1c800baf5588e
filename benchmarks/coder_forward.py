"""The native engine on the coder pair's GGUF files, side by side in one run: the bandwidth bound, the big model's
step for k = 1, 2, 4, 8, 16 tokens, the little model's step, and llama.cpp's llama-bench on the same files.

    .venv/bin/python benchmarks/coder_forward.py [--rounds 20] [--context 128] [--threads 2] [--activations int8]
        [--llamacpp BIN_DIR]   (default: the last line `bash benchmarks/llamacpp.sh` prints; skipped if absent)

Every configuration runs once per round, rounds interleaved, so a noisy shared CPU slows all of them alike; the
table reports medians (and minima). A step feeds k tokens after a `context`-token prefix and keeps the logits of
all k, as a verification does, then rolls back, so every measurement sees the same cache length. The bound is
the bytes a step streams (every matmul weight and the head; one embedding row) at the best bandwidth of a plain
read of as many bytes (torch fp32 sum) in the same rounds. llama-bench runs before and after the
rounds (tg64 and pp1..pp16 with -r 3), since it is a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import torch

from bild import kernels, model_files, models
from bild.drafts import gguf as gguf_little
from bild.bench.designs import stepper
from bild.native import NativeRunner, gguf, streamed_bytes
from native_forward import interleaved, memory_read, ms

KS = (1, 2, 4, 8, 16)


def llama_bench(bin_dir: str, path: str, threads: int) -> dict:
    """{"tg64": ms per token, "pp1".."pp16": ms per pass} from llama-bench's JSON output."""
    cmd = [os.path.join(bin_dir, "llama-bench"), "-m", path, "-t", str(threads), "-r", "3", "-o", "json",
           "-p", "1,2,4,8,16", "-n", "64"]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    out = {}
    for r in rows:
        n = r["n_prompt"] or r["n_gen"]
        out[f"pp{n}" if r["n_prompt"] else f"tg{n}"] = 1e3 * n / r["avg_ts"] / (n if r["n_gen"] else 1)
    return out


def default_bin_dir() -> str | None:
    script = os.path.join(os.path.dirname(__file__), "llamacpp.sh")
    cache = os.environ.get("BILD_CACHE", os.path.expanduser("~/.cache/bild"))
    if not os.path.isdir(os.path.join(cache, "llamacpp")):
        return None  # not built: building takes ~10 minutes, so the benchmark does not start it
    done = subprocess.run(["bash", script], capture_output=True, text=True)
    return done.stdout.strip().splitlines()[-1] if done.returncode == 0 and done.stdout.strip() else None


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{cpu}, {os.cpu_count()} cores, kernels {kernels.isa()}, load {os.getloadavg()[0]:.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--activations", choices=["int8", "fp32"], default="int8")
    parser.add_argument("--big", default="qwen2.5-coder-1.5b")
    parser.add_argument("--little", default="qwen2.5-coder-0.5b")
    parser.add_argument("--llamacpp", default=None, help="llama.cpp's bin directory (benchmarks/llamacpp.sh); none skips llama-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    paths = {name: model_files.path(alias) for name, alias in (("big", args.big), ("little", args.little))}
    t = time.perf_counter()
    int8 = args.activations == "int8"
    runners = {name: NativeRunner(gguf.load(p, int8=int8), max_length=args.context + 32) for name, p in paths.items()}
    print(f"loaded in {time.perf_counter() - t:.1f}s; {machine()}; activations {args.activations}")
    bin_dir = None if args.llamacpp == "none" else args.llamacpp or default_bin_dir()
    before = {n: llama_bench(bin_dir, p, args.threads) for n, p in paths.items()} if bin_dir else None

    context = [(7 * i) % 5000 + 100 for i in range(args.context)]
    nbytes = streamed_bytes(runners["big"].model)
    steps = {f"big k={k}": stepper(runners["big"], context, k) for k in KS}
    steps["little k=1"] = stepper(runners["little"], context, 1)
    shipped = models.default_little(args.big)
    if gguf_little.is_gguf_little(shipped):  # the pair's shipped little: the same file with a reduced head
        steps["shipped little k=1"] = stepper(gguf_little.load(shipped, int8=int8), context, 1)
    steps[f"plain read of {nbytes / 1e6:.0f} MB"] = memory_read(nbytes)
    with torch.inference_mode():
        times = interleaved(steps, args.rounds)
    after = {n: llama_bench(bin_dir, p, args.threads) for n, p in paths.items()} if bin_dir else None

    med = {name: statistics.median(xs) for name, xs in times.items()}
    read = min(times[f"plain read of {nbytes / 1e6:.0f} MB"])
    one = med["big k=1"]
    print(f"\n{args.rounds} interleaved rounds, context {args.context}, {args.threads} threads; ms, median (min)\n")
    print("| step | ms | vs big k=1 | vs plain read |\n|---|---|---|---|")
    for name, xs in times.items():
        print(f"| {name} | {ms(xs)} | {med[name] / one:.2f}x | {med[name] / read:.2f}x |")
    print(f"\nbandwidth of the plain read (best round): {nbytes / read / 1e9:.1f} GB/s")
    if before:
        print("\nllama.cpp llama-bench, same files and threads, before | after the rounds (ms per token for tg64, "
              "per pass for ppN)\n\n| model | tg64 | pp1 | pp2 | pp4 | pp8 | pp16 |\n|---|---|---|---|---|---|---|")
        for n in paths:
            cells = " | ".join(f"{before[n][k]:.1f} / {after[n][k]:.1f}" for k in
                               ("tg64", "pp1", "pp2", "pp4", "pp8", "pp16"))
            print(f"| {n} | {cells} |")
        tg = min(before["big"]["tg64"], after["big"]["tg64"])
        print(f"\nbild big k=1 vs llama.cpp tg64 (its best of before/after): {tg / one / 1e3:.2f}x its speed")
    print(f"little k=1 / big k=1 (c): {med['little k=1'] / one:.3f}")
    if "shipped little k=1" in med:
        print(f"shipped little ({shipped}) k=1 / big k=1 (c): {med['shipped little k=1'] / one:.3f}")


if __name__ == "__main__":
    main()
