"""Block-quantised matmul weights read exactly: GGUF's Q4_1 and Q8_0 blocks, recovered from dequantised weights.

A GGUF model loaded through transformers arrives dequantised to fp32, but every value is still d * q + m of its
32-weight block. `to_blocks` recovers (d, m, q) and checks that they rebuild the weight bit for bit; if they do,
`linear` computes with them in `blocks.c` (AVX2 + FMA, fp32 accumulation) and streams 6 bits per weight (q4_1)
or 9 (q8_0) instead of 32. Results are those of an fp32 matmul over the very same weights, up to summation order.
A weight marked `int8` instead takes activations rounded to int8 per 32-value block, as llama.cpp computes:
lossy, and about 1.3x faster for one row of x (`with_int8`; benchmarks/block_kernel.py).
The C file compiles on first use (about a second) into $BILD_CACHE/kernels; without a C compiler or AVX2 the
native engine keeps its torch kernels (`unavailable()` says why).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass

import torch
from torch import Tensor

QK = 32  # weights per block, along the input dimension
KINDS = {"q4_1": (4, 24), "q8_0": (8, 36)}  # kind -> (code in blocks.c, bytes per block)
SOURCE = os.path.join(os.path.dirname(__file__), "blocks.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC",
         "-mno-avx256-split-unaligned-load", "-mno-avx256-split-unaligned-store"]  # gcc's generic tuning splits
# every unaligned 256-bit load in two: 1.35x slower on the 2-core EPYC
CPU_FLAGS = {"avx2", "fma"}


@dataclass(frozen=True, slots=True)
class BlockWeight:
    """A (N, K) matmul weight as N rows of K / 32 blocks, each block its bytes in blocks.c's layout."""
    kind: str  # "q4_1" or "q8_0"
    data: Tensor  # (N, K / 32, block bytes) uint8
    shape: tuple[int, int]  # (N, K)
    int8: bool = False  # products take x rounded to int8 per 32-value block (lossy), not fp32 x

    @property
    def nbytes(self) -> int:
        return self.data.numel()


class Dims(ctypes.Structure):
    """blocks.c's dims_t."""
    _fields_ = [("dim", ctypes.c_int), ("n_heads", ctypes.c_int), ("n_kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("ffn_dim", ctypes.c_int), ("cache_length", ctypes.c_int),
                ("eps", ctypes.c_float)]


class LayerPointers(ctypes.Structure):
    """blocks.c's layer_t: where one decoder layer's blocks, biases and norms live. The tensors must outlive it."""
    _fields_ = [("w", ctypes.c_void_p * 4), ("kind", ctypes.c_int * 4), ("bias", ctypes.c_void_p * 4),
                ("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("int8", ctypes.c_int)]


def layer_pointers(weights: list, biases: list, attn_norm: Tensor, mlp_norm: Tensor) -> LayerPointers | None:
    """For a layer whose wqkv, wo, w13 and w2 are all blocks of one activation precision (and whose other
    tensors are contiguous float32), else None."""
    vectors = [b for b in biases if b is not None] + [attn_norm, mlp_norm]
    if not all(isinstance(w, BlockWeight) for w in weights) or len({w.int8 for w in weights}) > 1:
        return None
    if not all(v.dtype == torch.float32 and v.is_contiguous() for v in vectors):
        return None
    return LayerPointers((ctypes.c_void_p * 4)(*[w.data.data_ptr() for w in weights]),
                         (ctypes.c_int * 4)(*[KINDS[w.kind][0] for w in weights]),
                         (ctypes.c_void_p * 4)(*[b.data_ptr() if b is not None else None for b in biases]),
                         attn_norm.data_ptr(), mlp_norm.data_ptr(), int(weights[0].int8))


def model_forward(x: Tensor, start: int, dims: Dims, layers: list[LayerPointers], k_caches: list[Tensor],
                  v_caches: list[Tensor], cos: Tensor, sin: Tensor) -> None:
    """x (T, dim) float32 contiguous, updated in place by the decoder layers in one call (one parallel region) at
    positions start..start+T-1; layer l writes its keys and values into k_caches[l], v_caches[l] (1, H_kv, S, D)
    float32 contiguous; cos, sin (S', D) tables."""
    n = len(layers)
    keys = (ctypes.c_void_p * n)(*[k.data_ptr() for k in k_caches[:n]])  # an early exit's caches are the first n
    values = (ctypes.c_void_p * n)(*[v.data_ptr() for v in v_caches[:n]])
    done = _library().model_forward(x.data_ptr(), x.shape[0], start, ctypes.byref(dims), (LayerPointers * n)(*layers),
                                    n, keys, values, cos.data_ptr(), sin.data_ptr(), torch.get_num_threads())
    if done:
        raise MemoryError(f"blocks.c could not allocate scratch memory for {x.shape[0]} tokens")


def unavailable() -> str | None:
    """Why the kernels cannot run here, or None when they can."""
    try:
        _library()
    except OSError as e:
        return str(e)
    return None


@functools.cache
def _library() -> ctypes.CDLL:
    flags = _cpu_flags()
    if flags is not None and not CPU_FLAGS <= flags:
        raise OSError(f"the block kernels need a CPU with {' and '.join(sorted(CPU_FLAGS))}")
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("the block kernels need a C compiler (cc or gcc; set CC)")
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read() + " ".join(FLAGS).encode()).hexdigest()[:16]
    root = os.environ.get("BILD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bild"))
    target = os.path.join(root, "kernels", f"blocks-{digest}.so")
    if not os.path.isfile(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp{os.getpid()}"
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, SOURCE], capture_output=True, text=True)
        if done.returncode:
            raise OSError(f"compiling {SOURCE} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: concurrent first uses never load a half-written library
    lib = ctypes.CDLL(target)
    lib.block_linear.restype = None
    lib.block_linear_int8.restype = ctypes.c_int
    lib.model_forward.restype = ctypes.c_int
    for f in (lib.block_linear, lib.block_linear_int8):
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                      ctypes.c_void_p, ctypes.c_int]
    lib.model_forward.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(Dims),
                                  ctypes.POINTER(LayerPointers), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None  # no flags to read: let the compiler and the first call tell


def linear(x: Tensor, w: BlockWeight) -> Tensor:
    """x (T, K) float32 -> (T, N) float32 = x @ W^T."""
    N, K = w.shape
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"block linear takes float32 (T, {K}) inputs, got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    y = torch.empty(x.shape[0], N)  # (T, N)
    args = (x.data_ptr(), x.shape[0], K, w.data.data_ptr(), N, KINDS[w.kind][0], y.data_ptr(), torch.get_num_threads())
    if not w.int8:
        _library().block_linear(*args)
    elif _library().block_linear_int8(*args):
        raise MemoryError(f"blocks.c could not allocate int8 activations for {x.shape[0]} rows")
    return y


def with_int8(w: BlockWeight) -> BlockWeight:
    """The same blocks, multiplied with activations rounded to int8 per 32-value block (lossy)."""
    return dataclasses.replace(w, int8=True)


def to_blocks(w: Tensor, kind: str) -> BlockWeight | None:
    """The blocks that rebuild the float32 weight w (N, K) exactly, or None if it is not such a weight."""
    N, K = w.shape
    if w.dtype != torch.float32 or K % QK:
        return None
    v = w.detach().reshape(N, K // QK, QK)  # (N, nb, 32)
    found = _q4_1(v) if kind == "q4_1" else _q8_0(v)
    if found is None:
        return None
    d, m, q = found
    return BlockWeight(kind, _pack(kind, d, m, q), (N, K))


def quantise(w: Tensor, kind: str = "q8_0") -> BlockWeight | None:
    """w (N, K) float32 rounded to blocks as GGUF quantises (lossy; for weights a GGUF file does not hold, such as
    a trained draft's), or None when K is not a multiple of 32. q8_0: d = max |w| / 127 in fp16, q = round(w / d)."""
    N, K = w.shape
    if kind != "q8_0":
        raise ValueError(f"only q8_0 rounding is implemented, not {kind}")
    if K % QK:
        return None
    v = w.detach().float().reshape(N, K // QK, QK)  # (N, nb, 32)
    d = (v.abs().amax(-1) / 127).half().float()  # (N, nb)
    return BlockWeight(kind, _pack(kind, d, None, _round_q(v, d, -127, 127)), (N, K))


def _q4_1(v: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """v (N, nb, 32) -> d, m (N, nb) and q (N, nb, 32) in 0..15 with fl(d q + m) == v, or None."""
    m = v.amin(-1)  # the block's q = 0 element
    if not torch.equal(m, m.half().float()):
        return None
    fit = _fit_scale((v.amax(-1) - m) / 15, lambda d: _round_q(v - m[..., None], d, 0, 15),
                     lambda d, q: d * q + m[..., None], v)
    return None if fit is None else (fit[0], m, fit[1])


def _q8_0(v: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """v (N, nb, 32) -> d (N, nb), no m, and q (N, nb, 32) in -127..127 with d q == v, or None."""
    fit = _fit_scale(v.abs().amax(-1) / 127, lambda d: _round_q(v, d, -127, 127), lambda d, q: d * q, v)
    return None if fit is None else (fit[0], None, fit[1])


def _round_q(v: Tensor, d: Tensor, low: int, high: int) -> Tensor:
    safe = torch.where(d == 0, torch.ones_like(d), d)[..., None]  # (N, nb, 1)
    return torch.round(v / safe).clamp(low, high)  # (N, nb, 32)


def _fit_scale(estimate: Tensor, quantise, rebuild, v: Tensor) -> tuple[Tensor, Tensor] | None:
    """The fp16 scale of each block: the estimate rounded to fp16, else one of its fp16 neighbours."""
    d = estimate.half()
    best_d, best_q, ok = None, None, None
    for cand in (d, torch.nextafter(d, torch.full_like(d, float("inf"))), torch.nextafter(d, torch.zeros_like(d))):
        cand = cand.float()
        q = quantise(cand)  # (N, nb, 32)
        good = (rebuild(cand[..., None], q) == v).all(-1)  # (N, nb)
        if best_d is None:
            best_d, best_q, ok = cand, q, good
        else:
            fix = good & ~ok
            best_d = torch.where(fix, cand, best_d)
            best_q = torch.where(fix[..., None], q, best_q)
            ok = ok | good
        if ok.all():
            return best_d, best_q
    return None


def _pack(kind: str, d: Tensor, m: Tensor | None, q: Tensor) -> Tensor:
    """Blocks in blocks.c's byte layout: (N, nb, 24) for q4_1, (N, nb, 36) for q8_0."""
    head = [d[..., None].view(torch.uint8)] + ([m[..., None].view(torch.uint8)] if m is not None else [])  # (N, nb, 4)
    if kind == "q4_1":
        nib = q.to(torch.uint8)  # (N, nb, 32)
        body = nib[..., :16] | (nib[..., 16:] << 4)  # (N, nb, 16): element j low, element j + 16 high
    else:
        body = q.to(torch.int8).view(torch.uint8)  # (N, nb, 32)
    return torch.cat(head + [body], dim=-1).contiguous()  # (N, nb, bytes)


def dequantise(w: BlockWeight) -> Tensor:
    """The float32 weight (N, K) the blocks stand for (for tests and checks)."""
    N, K = w.shape
    raw = w.data  # (N, nb, bytes)
    d = raw[..., :4].contiguous().view(torch.float32)  # (N, nb, 1)
    if w.kind == "q4_1":
        m = raw[..., 4:8].contiguous().view(torch.float32)  # (N, nb, 1)
        body = raw[..., 8:]  # (N, nb, 16)
        q = torch.cat([body & 15, body >> 4], dim=-1).float()  # (N, nb, 32)
        return (d * q + m).reshape(N, K)
    q = raw[..., 4:].contiguous().view(torch.int8).float()  # (N, nb, 32)
    return (d * q).reshape(N, K)
