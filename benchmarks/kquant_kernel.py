"""Benchmark of bild/kernels' GGUF kinds: a whole 28-layer decoder stack of Qwen2.5-Coder-1.5B's shapes (width
1536, 12 / 2 heads of 128, FFN 8960) on synthetic blocks (~0.74 GB of Q4_K, so every step streams them from
memory), for k = 1, 2, 4, 8, 16 tokens, on every ISA level this CPU runs, in interleaved rounds, beside a plain
streaming read of the same bytes (torch sum over an int32 view).

    .venv/bin/python benchmarks/kquant_kernel.py [--rounds 5] [--mix q4_k|q4_k_m] [--fp32] [--against DIR]

--mix q4_k_m makes v and down Q6_K as in the Q4_K_M file (0.80 GB). --fp32 adds the fp32-activation path on the
best ISA. --against DIR adds the best ISA's build of DIR's blocks.c, kquant.c, kquant.h (say an older revision's,
`git show REV:bild/kernels/kquant.c > DIR/kquant.c`) to the same interleaved rounds, for an A/B. Prints a markdown table: the best time of each (path, k) and its ratio to k = 1 and to the plain read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

import numpy as np
import torch

from bild import kernels

DIM, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS = 1536, 12, 2, 128, 8960, 28
KS = (1, 2, 4, 8, 16)


def blocks(kind: str, n: int, k: int, rng: np.random.Generator) -> kernels.BlockWeight:
    lay = kernels.LAYOUTS[kind]
    raw = rng.integers(0, 256, size=(n, k // lay.block_values, lay.block_bytes), dtype=np.uint8)  # (N, nb, bytes)
    at = 208 if kind == "gguf_q6_k" else 0  # where the fp16 d lies
    raw[..., at:at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if kind == "gguf_q4_k":
        raw[..., 2:4] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    return kernels.from_gguf(raw.reshape(n, -1), lay.gguf, (n, k))


def layer(mix: str, rng: np.random.Generator, int8: bool) -> tuple[kernels.LayerPointers, list]:
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    six = "gguf_q6_k" if mix == "q4_k_m" else "gguf_q4_k"
    ws = [blocks("gguf_q4_k", q, DIM, rng), blocks("gguf_q4_k", kv, DIM, rng), blocks(six, kv, DIM, rng),
          blocks("gguf_q4_k", DIM, q, rng), blocks("gguf_q4_k", FFN, DIM, rng), blocks("gguf_q4_k", FFN, DIM, rng),
          blocks(six, DIM, FFN, rng)]
    products = [kernels.stack(ws[:3]), ws[3], kernels.stack(ws[4:6]), ws[6]]
    products = [kernels.with_int8(p) if int8 else p for p in products]
    bias = torch.randn(q + 2 * kv) * 0.01
    pointers = kernels.layer_pointers(products, [bias, None, None, None], torch.ones(DIM), torch.ones(DIM))
    return pointers, ws


def machine() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].split() for ln in out.splitlines() if ln.startswith("Flags")), [])
    keep = [f for f in flags if f.startswith(("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
                                              "avx512_bf16", "avx2", "fma"))]
    family = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("cpu family")), "?")
    return f"{name} (family {family}), {torch.get_num_threads()} threads; flags: {' '.join(sorted(keep))}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mix", choices=("q4_k", "q4_k_m"), default="q4_k")
    ap.add_argument("--fp32", action="store_true")
    ap.add_argument("--against", help="a directory of other kernel sources, run interleaved as ISA 'against'")
    args = ap.parse_args()
    if kernels.unavailable():
        raise SystemExit(f"kernels unavailable: {kernels.unavailable()}")
    rng = np.random.default_rng(0)
    built = [layer(args.mix, rng, int8=True) for _ in range(LAYERS)]
    int8_layers = [p for p, _ in built]
    weights = [w for _, ws in built for w in ws]
    total = sum(w.nbytes for w in weights)
    fp32_layers = [kernels.layer_pointers(
        [kernels.dataclasses.replace(p, int8=False, parts=tuple(kernels.dataclasses.replace(q, int8=False)
                                                                  for q in p.parts)) for p in ps[0]],
        list(ps[1]), ps[2], ps[3]) for ps in (p.keep for p in int8_layers)] if args.fp32 else []
    S, start = 64, 32
    dims = kernels.Dims(DIM, HEADS, KV_HEADS, HEAD_DIM, FFN, S, 1e-6)
    kc = [torch.zeros(1, KV_HEADS, S, HEAD_DIM) for _ in range(LAYERS)]
    vc = [torch.zeros(1, KV_HEADS, S, HEAD_DIM) for _ in range(LAYERS)]
    cos, sin = torch.ones(S, HEAD_DIM), torch.zeros(S, HEAD_DIM)
    views = [w.data.reshape(-1).view(torch.int32) for w in weights]  # every weight's bytes as int32 words
    paths = [(isa, "int8", int8_layers) for isa in kernels.supported_isas()]
    if args.fp32:
        paths.append((kernels.isa(), "fp32", fp32_layers))
    x = {k: torch.randn(k, DIM) * 0.1 for k in KS}
    libs = {isa: kernels._library(isa) for isa, _, _ in paths}
    if args.against:  # the same build step on the other sources (cached by their hash like the repo's)
        keep = list(kernels.SOURCES), list(kernels.HEADERS)
        kernels.SOURCES[:] = [os.path.join(args.against, f) for f in ("blocks.c", "kquant.c")]
        kernels.HEADERS[:] = [os.path.join(args.against, "kquant.h")]
        libs["against"] = kernels._build.__wrapped__(kernels.isa())
        kernels.SOURCES[:], kernels.HEADERS[:] = keep
        paths.append(("against", "int8", int8_layers))
    library = kernels._library

    def step(isa, layers, k):
        kernels._library = lambda requested=None: libs[isa]  # model_forward's library, this path's build
        try:
            kernels.model_forward(x[k].clone(), start, dims, layers, kc, vc, cos, sin)
        finally:
            kernels._library = library

    def read():
        for v in views:
            v.sum()
    times: dict = {}
    for isa, name, layers in paths:  # warm-up: compile, page in
        step(isa, layers, 1)
    read()
    for _ in range(args.rounds):
        t = time.perf_counter()
        read()
        times.setdefault("read", []).append(time.perf_counter() - t)
        for isa, name, layers in paths:
            for k in KS:
                t = time.perf_counter()
                step(isa, layers, k)
                times.setdefault((isa, name, k), []).append(time.perf_counter() - t)
    plain = min(times["read"])
    print(f"machine: {machine()}")
    print(f"{LAYERS} layers of Qwen2.5-Coder-1.5B shapes, {args.mix} blocks: {total / 1e9:.3f} GB of weights; "
          f"plain read {plain * 1e3:.1f} ms ({total / plain / 1e9:.1f} GB/s); best of {args.rounds} interleaved "
          f"rounds (median in brackets)\n")
    print("| ISA | activations | " + " | ".join(f"k={k}" for k in KS) + " | k=1 / read | "
          + " | ".join(f"{k}/1" for k in KS[1:]) + " |")
    print("|---|---|" + "---|" * (2 * len(KS)) + "")
    for isa, name, _ in paths:
        best = {k: min(times[(isa, name, k)]) for k in KS}
        med = {k: statistics.median(times[(isa, name, k)]) for k in KS}
        cells = " | ".join(f"{best[k] * 1e3:.1f} ms ({med[k] * 1e3:.1f})" for k in KS)
        ratios = " | ".join(f"{best[k] / best[1]:.2f}x" for k in KS[1:])
        print(f"| {isa} | {name} | {cells} | {best[1] / plain:.2f}x | {ratios} |")


if __name__ == "__main__":
    main()
