"""Block-quantised matmul weights read exactly: GGUF files' own blocks, and bild's q4_1 / q8_0 recovered ones.

Kinds (LAYOUTS; every byte layout is documented once, in the C file that reads it):
  "q4_1", "q8_0"            bild's own layouts with fp32 scales (blocks.c): what `to_blocks` recovers from a
                            dequantised GGUF weight (d * q + m of each 32-weight block, rebuilt bit for bit), and
                            what `quantise` rounds a draft's weights to.
  "gguf_q4_k", "gguf_q6_k", GGUF's own layouts with fp16 scales (kquant.c), read straight from a file's bytes by
  "gguf_q5_0", "gguf_q8_0"  `from_gguf` (zero-copy over a memory map). GGUF_KINDS maps GGUF type names to them.
  Note "q8_0" (bild, 36 bytes a block) is not "gguf_q8_0" (GGUF's Q8_0, 34 bytes).

`linear` computes x W^T with any kind: fp32 activations (weights rebuilt exactly, as gguf's dequantisation gives
them, fp32 fma) or, for a weight marked `int8` (`with_int8`), activations rounded to int8 per block as llama.cpp
computes (lossy, faster). Both are batch-invariant: a row of x gives bitwise the same output alone or among T.
`model_forward` runs whole decoder stacks (layer_pointers: per-product weights of any kinds, several stacked
along the output rows, see `stack`); `embedding` gathers exact rows of a block weight.

The C sources compile on first use into one library per ISA level (ISAS: avx2, avxvnni, avx512vnni) under
$BILD_CACHE/kernels; the best one this CPU runs is loaded (`isa()` says which), or the one $BILD_ISA or an `isa=`
argument forces (refused when the CPU lacks it). Without a C compiler or AVX2 + FMA + F16C the native engine keeps
its torch kernels (`unavailable()` says why).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import shutil
import subprocess
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    code: int  # the kind's number in blocks.c / kquant.h
    block_bytes: int
    block_values: int  # consecutive values of a weight row per block
    gguf: str | None  # the GGUF type name, for the kinds read from files


LAYOUTS = {
    "q4_1": Layout(4, 24, 32, None), "q8_0": Layout(8, 36, 32, None),
    "gguf_q4_k": Layout(20, 144, 256, "Q4_K"), "gguf_q6_k": Layout(21, 210, 256, "Q6_K"),
    "gguf_q5_0": Layout(22, 22, 32, "Q5_0"), "gguf_q8_0": Layout(23, 34, 32, "Q8_0"),
}
KINDS = {kind: (lay.code, lay.block_bytes) for kind, lay in LAYOUTS.items()}  # kind -> (code, bytes per block)
GGUF_KINDS = {lay.gguf: kind for kind, lay in LAYOUTS.items() if lay.gguf}  # GGUF type name -> kind
QK = 32  # weights per block of bild's q4_1 / q8_0, along the input dimension
HERE = os.path.dirname(__file__)
SOURCES = [os.path.join(HERE, "blocks.c"), os.path.join(HERE, "kquant.c")]
HEADERS = [os.path.join(HERE, "kquant.h")]
FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off",  # no fma contraction: every ISA build
         # computes the same float operations. gcc's generic tuning splits every unaligned 256-bit load in two:
         # 1.35x slower on the 2-core EPYC
         "-mno-avx256-split-unaligned-load", "-mno-avx256-split-unaligned-store"]
ISAS = {  # name -> (compiler flags, /proc/cpuinfo flags it needs), slowest first
    "avx2": (["-mavx2", "-mfma", "-mf16c"], {"avx2", "fma", "f16c"}),
    "avxvnni": (["-mavx2", "-mfma", "-mf16c", "-mavxvnni"], {"avx2", "fma", "f16c", "avx_vnni"}),
    "avx512vnni": (["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"],
                   {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}),
}
CPU_FLAGS = ISAS["avx2"][1]


@dataclass(frozen=True, slots=True)
class BlockWeight:
    """A (N, K) matmul weight as N rows of blocks, each block its bytes in its kind's layout; or, with parts, the
    rows of several such weights one after another (`stack`), whose kind names theirs ("a+b" when they differ)."""
    kind: str  # a key of LAYOUTS, or the stacked parts' kinds
    data: Tensor  # (N, K / block values, block bytes) uint8; empty for a stack
    shape: tuple[int, int]  # (N, K)
    int8: bool = False  # products take x rounded to int8 per block (lossy), not fp32 x
    parts: tuple = ()  # a stack's BlockWeights, in row order

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts) if self.parts else self.data.numel()


def from_gguf(raw: Tensor | np.ndarray, kind: str, shape: tuple[int, int]) -> BlockWeight:
    """A GGUF tensor's raw bytes as a block weight, without a copy. raw: uint8, contiguous, (N, bytes per row)
    or any shape of as many bytes; kind: a GGUF type name ("Q4_K", "Q6_K", "Q5_0", "Q8_0") or its gguf_ kind;
    shape: (N, K) in PyTorch order (GGUF lists it reversed)."""
    kind = GGUF_KINDS.get(kind, kind)
    if kind not in LAYOUTS or LAYOUTS[kind].gguf is None:
        raise ValueError(f"from_gguf reads GGUF types {', '.join(GGUF_KINDS)}, not {kind!r}")
    if isinstance(raw, np.ndarray):
        with warnings.catch_warnings():  # a read-only memory map: the kernels never write to weights
            warnings.simplefilter("ignore")
            raw = torch.from_numpy(raw)
    lay = LAYOUTS[kind]
    N, K = (int(v) for v in shape)
    if raw.dtype != torch.uint8 or not raw.is_contiguous():
        raise ValueError(f"{lay.gguf} bytes must be a contiguous uint8 array, got {raw.dtype} "
                         f"{'contiguous' if raw.is_contiguous() else 'strided'}")
    if N <= 0 or K <= 0 or K % lay.block_values:
        raise ValueError(f"a {lay.gguf} weight's rows are whole blocks of {lay.block_values} values: shape {(N, K)}")
    want = N * (K // lay.block_values) * lay.block_bytes
    if raw.numel() != want:
        raise ValueError(f"a ({N}, {K}) {lay.gguf} weight is {want} bytes "
                         f"({K // lay.block_values} blocks of {lay.block_bytes} a row), got {raw.numel()}")
    return BlockWeight(kind, raw.reshape(N, K // lay.block_values, lay.block_bytes), (N, K))  # a view


def from_gguf_tensor(t) -> BlockWeight:
    """A gguf.GGUFReader tensor (memory-mapped) as a block weight."""
    N, K = (int(v) for v in reversed(t.shape.tolist())) if len(t.shape) == 2 else (1, int(t.shape[0]))
    return from_gguf(t.data, t.tensor_type.name, (N, K))


def stack(weights: list[BlockWeight]) -> BlockWeight:
    """The rows of several block weights of one input width, one after another (q | k | v, gate | up), without
    copying: linear and model_forward write consecutive output columns from each."""
    parts = tuple(p for w in weights for p in (w.parts or (w,)))
    if not parts or not all(isinstance(p, BlockWeight) for p in parts):
        raise ValueError("stack takes block weights")
    if len({p.shape[1] for p in parts}) > 1 or len({p.int8 for p in parts}) > 1:
        raise ValueError(f"stacked weights share their input width and activations: "
                         f"{[(p.kind, p.shape, p.int8) for p in parts]}")
    if len(parts) == 1:
        return parts[0]
    kinds = list(dict.fromkeys(p.kind for p in parts))
    return BlockWeight("+".join(kinds), torch.empty(0, dtype=torch.uint8),
                       (sum(p.shape[0] for p in parts), parts[0].shape[1]), parts[0].int8, parts)


def _check_weight(w: BlockWeight) -> None:
    """Every byte a kernel will read is there: a plain weight's data is its shape's blocks, contiguous uint8."""
    if w.parts:
        for p in w.parts:
            _check_weight(p)
        return
    if w.kind not in LAYOUTS:
        raise ValueError(f"unknown block kind {w.kind!r} (kinds: {', '.join(LAYOUTS)})")
    lay, (N, K) = LAYOUTS[w.kind], w.shape
    if K % lay.block_values or tuple(w.data.shape) != (N, K // lay.block_values, lay.block_bytes) \
            or w.data.dtype != torch.uint8 or not w.data.is_contiguous():
        raise ValueError(f"a ({N}, {K}) {w.kind} weight needs contiguous uint8 data of shape "
                         f"{(N, K // lay.block_values, lay.block_bytes)}, got {w.data.dtype} {tuple(w.data.shape)}")


class Dims(ctypes.Structure):
    """blocks.c's dims_t."""
    _fields_ = [("dim", ctypes.c_int), ("n_heads", ctypes.c_int), ("n_kv_heads", ctypes.c_int),
                ("head_dim", ctypes.c_int), ("ffn_dim", ctypes.c_int), ("cache_length", ctypes.c_int),
                ("eps", ctypes.c_float)]


MAX_SEGMENTS = 4  # blocks.c's: weights stacked in one product


class Segment(ctypes.Structure):
    """blocks.c's segment_t: one weight's rows within a product."""
    _fields_ = [("w", ctypes.c_void_p), ("kind", ctypes.c_int), ("rows", ctypes.c_int)]


class LayerPointers(ctypes.Structure):
    """blocks.c's layer_t: where one decoder layer's blocks, biases and norms live. It keeps the tensors alive
    (keep) and their shapes (shapes: each product's (N, K); lengths: the biases' and norms'), which
    model_forward checks against the model's dims before any call."""
    _fields_ = [("seg", (Segment * MAX_SEGMENTS) * 4), ("n_seg", ctypes.c_int * 4), ("bias", ctypes.c_void_p * 4),
                ("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p), ("int8", ctypes.c_int)]


def layer_pointers(weights: list, biases: list, attn_norm: Tensor, mlp_norm: Tensor) -> LayerPointers | None:
    """For a layer whose wqkv, wo, w13 and w2 are all blocks (any kinds, stacked or not) of one activation
    precision, and whose other tensors are contiguous float32; else None."""
    vectors = [b for b in biases if b is not None] + [attn_norm, mlp_norm]
    if not all(isinstance(w, BlockWeight) for w in weights) or len({w.int8 for w in weights}) > 1:
        return None
    if not all(v.dtype == torch.float32 and v.is_contiguous() for v in vectors):
        return None
    if any(len(w.parts) > MAX_SEGMENTS for w in weights):
        raise ValueError(f"a product stacks at most {MAX_SEGMENTS} weights")
    for w in weights:
        _check_weight(w)
    p = LayerPointers()
    for i, w in enumerate(weights):
        parts = w.parts or (w,)
        for g, part in enumerate(parts):
            p.seg[i][g] = Segment(part.data.data_ptr(), LAYOUTS[part.kind].code, part.shape[0])
        p.n_seg[i] = len(parts)
    p.bias = (ctypes.c_void_p * 4)(*[b.data_ptr() if b is not None else None for b in biases])
    p.attn_norm, p.mlp_norm, p.int8 = attn_norm.data_ptr(), mlp_norm.data_ptr(), int(weights[0].int8)
    p.keep = (list(weights), list(biases), attn_norm, mlp_norm)
    p.shapes = [w.shape for w in weights]
    p.lengths = [None if b is None else b.numel() for b in biases] + [attn_norm.numel(), mlp_norm.numel()]
    return p


def _check_layer(p: LayerPointers, d: Dims) -> None:
    qkv, hd = (d.n_heads + 2 * d.n_kv_heads) * d.head_dim, d.n_heads * d.head_dim
    shapes = [(qkv, d.dim), (d.dim, hd), (2 * d.ffn_dim, d.dim), (d.dim, d.ffn_dim)]
    if [tuple(s) for s in p.shapes] != shapes:
        raise ValueError(f"a layer's products have shapes {p.shapes}; these dims need {shapes}")
    lengths = [n for n, _ in shapes] + [d.dim, d.dim]
    if any(got is not None and got != want for got, want in zip(p.lengths, lengths)):
        raise ValueError(f"a layer's biases and norms have {p.lengths} values; these dims need {lengths}")


def _check_forward(x: Tensor, start: int, d: Dims, layers: list, k_caches: list, v_caches: list, cos: Tensor,
                   sin: Tensor) -> None:
    if min(d.dim, d.n_heads, d.n_kv_heads, d.head_dim, d.ffn_dim, d.cache_length) <= 0 or d.n_heads % d.n_kv_heads:
        raise ValueError(f"bad dims: {[(f, getattr(d, f)) for f, _ in Dims._fields_]}")
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != d.dim or not x.is_contiguous() or x.shape[0] < 1:
        raise ValueError(f"model_forward takes contiguous float32 (T, {d.dim}) x, got {x.dtype} {tuple(x.shape)}")
    T, S, D = x.shape[0], d.cache_length, d.head_dim
    if start < 0 or start + T > S:
        raise ValueError(f"positions {start}..{start + T - 1} do not fit a cache of {S}")
    if len(k_caches) < len(layers) or len(v_caches) < len(layers):
        raise ValueError(f"{len(layers)} layers need as many caches, got {len(k_caches)} and {len(v_caches)}")
    for c in list(k_caches[:len(layers)]) + list(v_caches[:len(layers)]):
        if c.dtype != torch.float32 or tuple(c.shape) != (1, d.n_kv_heads, S, D) or not c.is_contiguous():
            raise ValueError(f"caches must be contiguous float32 (1, {d.n_kv_heads}, {S}, {D}), got "
                             f"{c.dtype} {tuple(c.shape)}")
    for t in (cos, sin):
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape[1] != D or t.shape[0] < start + T \
                or not t.is_contiguous():
            raise ValueError(f"rope tables must be contiguous float32 (>= {start + T}, {D}), got {tuple(t.shape)}")
    for p in layers:
        if not isinstance(p, LayerPointers):
            raise ValueError("model_forward takes layer_pointers() of every layer")
        _check_layer(p, d)


def model_forward(x: Tensor, start: int, dims: Dims, layers: list[LayerPointers], k_caches: list[Tensor],
                  v_caches: list[Tensor], cos: Tensor, sin: Tensor, isa: str | None = None) -> None:
    """x (T, dim) float32 contiguous, updated in place by the decoder layers in one call (one parallel region) at
    positions start..start+T-1; layer l writes its keys and values into k_caches[l], v_caches[l] (1, H_kv, S, D)
    float32 contiguous; cos, sin (S', D) tables. Every shape is checked first (ValueError)."""
    _check_forward(x, start, dims, layers, k_caches, v_caches, cos, sin)
    n = len(layers)
    keys = (ctypes.c_void_p * n)(*[k.data_ptr() for k in k_caches[:n]])  # an early exit's caches are the first n
    values = (ctypes.c_void_p * n)(*[v.data_ptr() for v in v_caches[:n]])
    done = _library(isa).model_forward(x.data_ptr(), x.shape[0], start, ctypes.byref(dims),
                                       (LayerPointers * n)(*layers), n, keys, values, cos.data_ptr(), sin.data_ptr(),
                                       torch.get_num_threads())
    if done:
        raise MemoryError(f"blocks.c could not allocate scratch memory for {x.shape[0]} tokens")


def unavailable() -> str | None:
    """Why the kernels cannot run here, or None when they can."""
    try:
        _library()
    except OSError as e:
        return str(e)
    return None


def supported_isas() -> list[str]:
    """The ISA levels this CPU runs, slowest first."""
    flags = _cpu_flags()
    if flags is None:  # no flags to read: the AVX2 build, and let the first call tell
        return ["avx2"]
    return [name for name, (_, need) in ISAS.items() if need <= flags]


def isa(requested: str | None = None) -> str:
    """The ISA level the kernels use: `requested`, else $BILD_ISA, else the best this CPU runs. A level the CPU
    cannot run, or an unknown name, is a ValueError; a CPU without AVX2 + FMA + F16C an OSError."""
    name = requested or os.environ.get("BILD_ISA") or None
    runs = supported_isas()
    if name is None:
        if not runs:
            raise OSError(f"the block kernels need a CPU with {' and '.join(sorted(CPU_FLAGS))}")
        return runs[-1]
    if name not in ISAS:
        raise ValueError(f"unknown ISA level {name!r} (BILD_ISA / isa=): one of {', '.join(ISAS)}")
    if name not in runs:
        raise ValueError(f"this CPU cannot run the {name} kernels (it lacks "
                         f"{', '.join(sorted(ISAS[name][1] - (_cpu_flags() or set())))}); it runs "
                         f"{', '.join(runs) or 'none'}")
    return name


def _library(requested: str | None = None) -> ctypes.CDLL:
    return _build(isa(requested))


@functools.cache
def _build(name: str) -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("the block kernels need a C compiler (cc or gcc; set CC)")
    flags = FLAGS + ISAS[name][0]
    h = hashlib.sha256(" ".join(flags).encode())
    for path in SOURCES + HEADERS:
        with open(path, "rb") as f:
            h.update(f.read())
    root = os.environ.get("BILD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bild"))
    target = os.path.join(root, "kernels", f"blocks-{name}-{h.hexdigest()[:16]}.so")
    if not os.path.isfile(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.tmp{os.getpid()}"
        done = subprocess.run([compiler, *flags, "-o", tmp, *SOURCES], capture_output=True, text=True)
        if done.returncode:
            raise OSError(f"compiling {', '.join(SOURCES)} for {name} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, target)  # atomic: concurrent first uses never load a half-written library
    lib = ctypes.CDLL(target)
    lib.kq_isa.restype = ctypes.c_char_p
    if lib.kq_isa().decode() != name:
        raise OSError(f"{target} was built for {lib.kq_isa().decode()}, not {name}")
    lib.block_linear.restype = None
    lib.block_linear_int8.restype = ctypes.c_int
    lib.model_forward.restype = ctypes.c_int
    for f in (lib.block_linear, lib.block_linear_int8):
        f.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                      ctypes.c_void_p, ctypes.c_int]
    lib.kq_linear.restype = ctypes.c_int
    lib.kq_linear.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.kq_rows.restype = None
    lib.kq_rows.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                            ctypes.c_void_p, ctypes.c_int]
    lib.model_forward.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(Dims),
                                  ctypes.POINTER(LayerPointers), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return lib


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def linear(x: Tensor, w: BlockWeight, isa: str | None = None) -> Tensor:
    """x (T, K) float32 -> (T, N) float32 = x @ W^T, on the ISA level `isa` (default: isa())."""
    N, K = w.shape
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"block linear takes float32 (T, {K}) inputs, got {x.dtype} {tuple(x.shape)}")
    _check_weight(w)
    x = x.contiguous()
    y = torch.empty(x.shape[0], N)  # (T, N)
    if x.shape[0] == 0:
        return y
    col = 0
    for part in w.parts or (w,):
        _linear_into(x, part, y, col, isa)
        col += part.shape[0]
    return y


def _linear_into(x: Tensor, w: BlockWeight, y: Tensor, col: int, isa: str | None) -> None:
    """y[:, col:col + N] = x W^T for one plain weight."""
    (N, K), T, lib, threads = w.shape, x.shape[0], _library(isa), torch.get_num_threads()
    code = LAYOUTS[w.kind].code
    if LAYOUTS[w.kind].gguf is not None:
        failed = lib.kq_linear(x.data_ptr(), T, K, w.data.data_ptr(), N, code, int(w.int8),
                               y.data_ptr() + 4 * col, y.shape[1], threads)
    else:
        out = y if col == 0 and N == y.shape[1] else torch.empty(T, N)
        args = (x.data_ptr(), T, K, w.data.data_ptr(), N, code, out.data_ptr(), threads)
        failed = lib.block_linear_int8(*args) if w.int8 else lib.block_linear(*args)
        if out is not y:
            y[:, col:col + N] = out
    if failed:
        raise MemoryError(f"the kernels could not allocate int8 activations for {T} rows")


def embedding(w: BlockWeight, ids: Tensor | list[int], isa: str | None = None) -> Tensor:
    """Rows ids of the block weight w (an embedding lookup) as float32 (n, K), exactly as dequantise gives them."""
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).contiguous()  # (n,)
    N, K = w.shape
    if w.parts:
        raise ValueError("embedding reads one block weight, not a stack")
    _check_weight(w)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= N):
        raise ValueError(f"row ids must lie in 0..{N - 1}, got {int(ids.min())}..{int(ids.max())}")
    if LAYOUTS[w.kind].gguf is None:
        return dequantise(BlockWeight(w.kind, w.data[ids], (ids.numel(), K)))
    out = torch.empty(ids.numel(), K)  # (n, K)
    if ids.numel():
        _library(isa).kq_rows(w.data.data_ptr(), K, LAYOUTS[w.kind].code, ids.data_ptr(), ids.numel(),
                              out.data_ptr(), torch.get_num_threads())
    return out


def with_int8(w: BlockWeight) -> BlockWeight:
    """The same blocks, multiplied with activations rounded to int8 per block (lossy)."""
    return dataclasses.replace(w, int8=True, parts=tuple(with_int8(p) for p in w.parts))


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
    """The float32 weight (N, K) the blocks stand for (for tests and checks); for GGUF's kinds bitwise what
    gguf.quants.dequantize gives (the kernels' rebuild when they are available, else gguf's own)."""
    N, K = w.shape
    if w.parts:
        return torch.cat([dequantise(p) for p in w.parts])
    if w.kind in LAYOUTS and LAYOUTS[w.kind].gguf is not None:
        if unavailable() is None:
            return embedding(w, torch.arange(N))
        from gguf import GGMLQuantizationType, quants
        raw = w.data.reshape(N, -1).numpy()
        return torch.from_numpy(quants.dequantize(raw, GGMLQuantizationType[LAYOUTS[w.kind].gguf]).reshape(N, K))
    raw = w.data  # (N, nb, bytes)
    d = raw[..., :4].contiguous().view(torch.float32)  # (N, nb, 1)
    if w.kind == "q4_1":
        m = raw[..., 4:8].contiguous().view(torch.float32)  # (N, nb, 1)
        body = raw[..., 8:]  # (N, nb, 16)
        q = torch.cat([body & 15, body >> 4], dim=-1).float()  # (N, nb, 32)
        return (d * q + m).reshape(N, K)
    q = raw[..., 4:].contiguous().view(torch.int8).float()  # (N, nb, 32)
    return (d * q).reshape(N, K)
