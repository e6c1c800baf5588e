"""Native models read straight from a GGUF file: each tensor's own block bytes, memory-mapped, never dequantised.

A Qwen2 file (Qwen2.5, Qwen2.5-Coder) becomes a NativeModel whose matmul weights are the file's Q4_K / Q5_0 /
Q6_K / Q8_0 blocks (bild/kernels) and whose norms and biases are float32. Every offset and size is checked against
the file before any kernel sees a pointer; a tensor type or architecture the kernels do not take is refused with
one BildError that names it and the `--engine hf` fallback (transformers dequantises every tensor to float32).

LLaMA-architecture files store their q and k rows permuted for ggml's rope; they keep the conversion path through
transformers (bild.models), which undoes it.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, replace as with_fields

import numpy as np
import torch
from torch import Tensor

from .. import kernels
from ..errors import BildError
from ..files import keyed_path, write_quietly
from .model import Layer, NativeConfig, NativeModel, Precision, rope_tables

ARCHITECTURES = ("qwen2",)
PLAIN_TYPES = ("F32", "F16")  # read as float32 tensors (norms, biases; matmul weights of small models)
FALLBACK = "use --engine hf (engine=\"hf\") to load it through transformers, which dequantises every tensor"


@dataclass(frozen=True, slots=True)
class FileTensor:
    """One tensor of a GGUF file: its type name, shape in PyTorch order and bytes (a view of the memory map)."""
    name: str
    kind: str
    shape: tuple[int, ...]
    data: np.ndarray  # uint8, the tensor's n_bytes

    def values(self) -> np.ndarray:
        """A plain tensor's values as float32, shaped."""
        dtype = np.float32 if self.kind == "F32" else np.float16
        return self.data.view(dtype).astype(np.float32).reshape(self.shape)


@dataclass(frozen=True, slots=True)
class Tensors:
    """A GGUF file's scalar metadata and its tensors by name."""
    path: str
    arch: str
    meta: dict
    tensors: dict  # name -> FileTensor

    def get(self, name: str) -> FileTensor:
        if name not in self.tensors:
            raise BildError(f"{self.path}: tensor {name} is missing; the file is not a complete {self.arch} model")
        return self.tensors[name]


def index(path: str) -> dict:
    """{"architecture", "types", "meta", "tensors": [[name, type, shape, offset, bytes], ...]} of a GGUF file,
    every tensor checked to lie inside it. gguf's GGUFReader takes seconds over a header that holds a whole
    vocabulary, so the index is kept in the user's cache, keyed by the file's size and time."""
    record = keyed_path("gguf-index", path) + ".json"
    try:
        with open(record) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    found = _index(path)
    write_quietly(record, json.dumps(found))
    return found


def _index(path: str) -> dict:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as e:  # truncated headers, unknown types and short tensors all surface here
        raise BildError(f"{path} is not a readable GGUF file (truncated or corrupt?): {type(e).__name__}: {e}") from e
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise BildError(f"{path}: tensor {t.name} ({t.tensor_type.name}) runs past the end of the file "
                            f"({t.data_offset} + {t.n_bytes} > {size} bytes): the file is truncated")
    meta = {f.name: _value(f) for f in reader.fields.values()}
    tensors = [[t.name, t.tensor_type.name, [int(d) for d in reversed(t.shape.tolist())], int(t.data_offset),
                int(t.n_bytes)] for t in reader.tensors]
    return {"architecture": str(meta.get("general.architecture") or ""), "types": sorted({t[1] for t in tensors}),
            "meta": {k: v for k, v in meta.items() if v is not None}, "tensors": tensors}


def read(path: str) -> Tensors:
    """A GGUF file's tensors as views of one read-only memory map; an unchanged file is mapped once."""
    stat = os.stat(path)
    return _read(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read(path: str, size: int, mtime: int) -> Tensors:
    found = index(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, kind, shape, offset, n_bytes in found["tensors"]:
        if offset + n_bytes > data.size:  # the index was checked; the file could have changed under its key
            raise BildError(f"{path}: tensor {name} runs past the end of the file: the file is truncated")
        tensors[name] = FileTensor(name, kind, tuple(shape), data[offset:offset + n_bytes])
    return Tensors(path, found["architecture"], found["meta"], tensors)


def _value(field):
    """A scalar or string metadata value (arrays are left out: the vocabulary is read by the tokenizer)."""
    from gguf import GGUFValueType

    if not field.types or field.types[0] == GGUFValueType.ARRAY:
        return None
    part = field.parts[field.data[0]]
    return bytes(part).decode("utf-8", "replace") if field.types[0] == GGUFValueType.STRING else part.tolist()[0]


def eos_ids(path: str) -> set[int]:
    """The file's end-of-sequence and end-of-text tokens (Qwen2 instruct models end turns with either)."""
    meta = read(path).meta
    return {int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if meta.get(k) is not None}


def config(f: Tensors, max_length: int | None = None) -> tuple[NativeConfig, float]:
    """The model's shape and its rope θ from the file's metadata."""
    if f.arch not in ARCHITECTURES:
        raise BildError(f"{f.path}: architecture {f.arch or '(none)'} is not read directly by the native engine "
                        f"(it reads {', '.join(ARCHITECTURES)}); {FALLBACK}")
    a = f.arch
    need = lambda key: _need(f, f"{a}.{key}")  # noqa: E731
    dim, heads = int(need("embedding_length")), int(need("attention.head_count"))
    length = int(need("context_length"))
    embed = f.get("token_embd.weight")
    cfg = NativeConfig(n_layers=int(need("block_count")), dim=dim, n_heads=heads,
                       n_kv_heads=int(f.meta.get(f"{a}.attention.head_count_kv", heads)), head_dim=dim // heads,
                       ffn_dim=int(need("feed_forward_length")), vocab_size=int(embed.shape[0]),
                       max_length=min(length, max_length or length),
                       norm_eps=float(need("attention.layer_norm_rms_epsilon")))
    scaling = f.meta.get(f"{a}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise BildError(f"{f.path}: rope scaling {scaling} is not read directly by the native engine; {FALLBACK}")
    return cfg, float(f.meta.get(f"{a}.rope.freq_base", 10000.0))


def _need(f: Tensors, key: str):
    if f.meta.get(key) is None:
        raise BildError(f"{f.path}: metadata {key} is missing")
    return f.meta[key]


def load(path: str, int8: bool = True, max_length: int | None = None, replace: dict | None = None) -> NativeModel:
    """The file as a NativeModel on its own blocks. int8: the products take activations rounded to int8 per block,
    as llama.cpp computes (fast); False: float32 activations, the exact reference of the same weights. replace:
    {name: FileTensor} taken instead of the file's tensors of those names (a little model's merged deltas)."""
    f = read(path)
    if replace:
        f = with_fields(f, tensors={**f.tensors, **replace})
    cfg, theta = config(f, max_length)
    layers = [_layer(f, i, cfg, int8) for i in range(cfg.n_layers)]
    embed = _matrix(f, "token_embd.weight", (cfg.vocab_size, cfg.dim), int8)
    head = _matrix(f, "output.weight", (cfg.vocab_size, cfg.dim), int8) if "output.weight" in f.tensors else embed
    inv_freq = 1.0 / theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim)
    cos, sin = rope_tables(inv_freq, 1.0, cfg.max_length, torch.float32)
    norm = _vector(f, "output_norm.weight", cfg.dim)
    return NativeModel(cfg, embed, layers, norm, head, cos, sin, numerics=Precision("blocks", int8=int8))


def _layer(f: Tensors, i: int, c: NativeConfig, int8: bool) -> Layer:
    p = f"blk.{i}."
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    m = lambda name, shape: _matrix(f, p + name + ".weight", shape, int8)  # noqa: E731
    b = lambda name, n: _vector(f, p + name + ".bias", n) if p + name + ".bias" in f.tensors else None  # noqa: E731
    wqkv = _stack([m("attn_q", (q, c.dim)), m("attn_k", (kv, c.dim)), m("attn_v", (kv, c.dim))])
    w13 = _stack([m("ffn_gate", (c.ffn_dim, c.dim)), m("ffn_up", (c.ffn_dim, c.dim))])
    bqkv = [b("attn_q", q), b("attn_k", kv), b("attn_v", kv)]
    layer = Layer(attn_norm=_vector(f, p + "attn_norm.weight", c.dim), wqkv=wqkv,
                  bqkv=None if all(x is None for x in bqkv) else torch.cat(
                      [x if x is not None else torch.zeros(n) for x, n in zip(bqkv, (q, kv, kv))]),
                  wo=m("attn_output", (c.dim, q)), bo=b("attn_output", c.dim),
                  mlp_norm=_vector(f, p + "ffn_norm.weight", c.dim), w13=w13, b13=None,
                  w2=m("ffn_down", (c.dim, c.ffn_dim)), b2=None)
    layer.fused = kernels.layer_pointers([layer.wqkv, layer.wo, layer.w13, layer.w2],
                                         [layer.bqkv, layer.bo, layer.b13, layer.b2], layer.attn_norm, layer.mlp_norm)
    return layer


def _stack(weights: list):
    """Matmul weights one after another along the output rows, as one weight (q|k|v, gate|up)."""
    if all(isinstance(w, Tensor) for w in weights):
        return torch.cat(weights)
    return kernels.stack(weights)  # blocks, of one kind or several


def _matrix(f: Tensors, name: str, shape: tuple[int, int], int8: bool):
    """A matmul weight (N, K) as the file holds it: blocks for quantised types, float32 for plain ones."""
    t = f.get(name)
    kind = t.kind
    if t.shape != shape:
        raise BildError(f"{f.path}: tensor {name} has shape {t.shape}, expected {shape}")
    if kind in PLAIN_TYPES:
        return torch.from_numpy(t.values())
    if kind not in kernels.GGUF_KINDS:
        raise BildError(f"{f.path}: tensor {name} is {kind}, which the native kernels do not read "
                        f"(they read {', '.join(PLAIN_TYPES + tuple(kernels.GGUF_KINDS))}); {FALLBACK}")
    w = kernels.from_gguf(t.data, kind, shape)  # zero-copy over the memory map
    return kernels.with_int8(w) if int8 else w


def _vector(f: Tensors, name: str, n: int) -> Tensor:
    t = f.get(name)
    if t.kind not in PLAIN_TYPES or t.shape != (n,):
        raise BildError(f"{f.path}: tensor {name} is {t.kind} of shape {t.shape}, expected {n} float32 values")
    return torch.from_numpy(t.values())
