"""A native model: its configuration, decoder layers, read-only weights and tables, and its KV cache.

The cache is preallocated (1, H_kv, S, D) per layer and written at explicit positions; rolling back is `length = n`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import kernels
from ..kernels import BlockWeight


SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


DYNAMIC_ROPE = ("dynamic", "longrope")  # inverse frequencies that change with the sequence length


STEP_TOKENS = 16  # forwards of at most this many tokens (decode steps, verification) use step_attention


PACK_BATCH_HINT = 9  # oneDNN picks blocking for this many rows; fits both 1-token steps and 1 + 8 drafts


@dataclass(slots=True, frozen=True)
class NativeConfig:
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    max_length: int  # positions the RoPE tables cover, and the largest cache a runner may allocate
    norm_eps: float

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads} query heads do not split into {self.n_kv_heads} kv groups")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")


@dataclass(slots=True)
class Layer:
    attn_norm: Tensor  # (dim,)
    wqkv: Tensor  # ((H + 2 H_kv) * D, dim): q rows, then k rows, then v rows
    bqkv: Tensor | None  # ((H + 2 H_kv) * D,)
    wo: Tensor  # (dim, H * D)
    bo: Tensor | None
    mlp_norm: Tensor  # (dim,)
    w13: Tensor  # (2 * ffn_dim, dim): gate rows, then up rows
    b13: Tensor | None
    w2: Tensor  # (dim, ffn_dim)
    b2: Tensor | None
    fused: kernels.LayerPointers | None = None  # every matmul weight in blocks: the whole layer runs in blocks.c


WEIGHTS = ("plain", "fp16", "blocks", "rounded")


@dataclass(frozen=True, slots=True)
class Precision:
    """What a native model's matmuls compute in: the one description the packers set and everything else reads."""
    weights: str = "plain"  # plain: weights in the activations' dtype | fp16: fp16 weights, fp32 activations (pack_fp16)
    # | blocks: a GGUF file's blocks, read exactly (pack_blocks) | rounded: also own weights rounded to q8_0 blocks
    int8: bool = False  # block products take activations rounded to int8 (lossy; with_int8)

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.int8 and self.weights not in ("blocks", "rounded"):
            raise ValueError("int8 activations need matmul weights in blocks")


@dataclass(slots=True)
class NativeModel:
    """Read-only weights and tables; all mutable state lives in a KVCache."""
    config: NativeConfig
    embed: Tensor | BlockWeight  # (V, dim); blocks in a GGUF file read directly, whose rows are gathered
    layers: list[Layer]
    norm: Tensor  # (dim,)
    head: Tensor  # (V, dim); the same tensor as embed when tied
    cos: Tensor  # (max_length, D)
    sin: Tensor  # (max_length, D), first half negated so that rotate_half(x) * sin == roll(x) * sin
    head_ids: Tensor | None = None  # reduced-vocabulary head: head is (N, dim) over these N token ids
    numerics: Precision = Precision()

    @property
    def dtype(self) -> torch.dtype:
        """Activations, norms and KV cache (and the embedding, unless it is in blocks)."""
        return self.norm.dtype

    @property
    def matmul_dtype(self) -> torch.dtype:
        """Of the layers' and head's matmul weights (float32 for blocks: they rebuild the fp32 weights exactly)."""
        return torch.float16 if self.numerics.weights == "fp16" else self.dtype

    @property
    def gguf_blocks(self) -> bool:
        """Some matmul weights are GGUF blocks (the kernels in bild/kernels run them)."""
        return self.numerics.weights in ("blocks", "rounded")

    @property
    def int8(self) -> bool:
        return self.numerics.int8

    @property
    def precision(self) -> str:
        """e.g. "torch.float32 on GGUF q4_1/q8_0 blocks" or "torch.float16 weights, torch.float32 activations"."""
        if self.gguf_blocks:
            parts = [p for w in matmul_weights(self) if isinstance(w, BlockWeight) for p in (w.parts or (w,))]
            kinds = "/".join(sorted({p.kind.removeprefix("gguf_") for p in parts}))
            acts = ", int8 activations in the products" if self.int8 else ""
            isa = f"; {kernels.isa()} kernels"
            if self.numerics.weights == "rounded":
                return f"{self.dtype} on {kinds} blocks (its own weights rounded to q8_0){acts}{isa}"
            return f"{self.dtype} on GGUF {kinds} blocks (the file's weights, exactly){acts}{isa}"
        weights = self.matmul_dtype
        return str(weights) if weights == self.dtype else f"{weights} weights, {self.dtype} activations"


@dataclass(slots=True)
class KVCache:
    k: list[Tensor]  # per layer (1, H_kv, S, D)
    v: list[Tensor]  # per layer (1, H_kv, S, D)


def matmul_weights(model: NativeModel) -> list:
    return [w for layer in model.layers for w in (layer.wqkv, layer.wo, layer.w13, layer.w2)] + [model.head]


def matmul_shapes(model: NativeModel) -> list[tuple[int, int]]:
    """(rows, cols) of each matmul weight, in matmul_weights' order; the head's rows are its kept ids when reduced."""
    c = model.config
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    shapes = [(qkv, c.dim), (c.dim, c.n_heads * c.head_dim), (2 * c.ffn_dim, c.dim), (c.dim, c.ffn_dim)] * c.n_layers
    return shapes + [(c.vocab_size if model.head_ids is None else model.head_ids.shape[0], c.dim)]


def streamed_bytes(model: NativeModel) -> int:
    """Bytes one decode step must read: every layer's matmul weights and norms, the final norm and the head (not
    the embedding, of which a step reads one row). Biases are left out: at most a few kB."""
    c = model.config
    weights = sum(w.nbytes if isinstance(w, BlockWeight) else rows * cols * model.matmul_dtype.itemsize
                  for w, (rows, cols) in zip(matmul_weights(model), matmul_shapes(model)))
    return weights + (2 * c.n_layers + 1) * c.dim * model.dtype.itemsize  # and the norms


def rope_tables(inv_freq: Tensor, scaling: float, length: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos and sign-folded sin for positions 0..length-1, computed in fp32 as HF does, then cast."""
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq.float())  # (S, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (S, D)
    cos, sin = emb.cos() * scaling, emb.sin() * scaling
    half = inv_freq.shape[0]
    sin[:, :half].neg_()  # rotate_half(x) = cat(-x2, x1) = roll(x, D/2) with the first half negated
    return cos.to(dtype), sin.to(dtype)


def early_exit(model: NativeModel, n_layers: int) -> NativeModel:
    """The first n_layers, then the same final norm and head. Shares every weight tensor; copies none."""
    if not 1 <= n_layers <= model.config.n_layers:
        raise ValueError(f"early exit needs 1..{model.config.n_layers} layers, got {n_layers}")
    return keep_layers(model, list(range(n_layers)))


def keep_layers(model: NativeModel, layers: list[int]) -> NativeModel:
    """Only these layers, in this order (a layer-dropped little model), then the same final norm and head.
    Shares every weight tensor; copies none."""
    n = model.config.n_layers
    if not layers or any(not 0 <= i < n for i in layers) or sorted(set(layers)) != list(layers):
        raise ValueError(f"kept layers must be distinct increasing ids in 0..{n - 1}, got {layers}")
    config = dataclasses.replace(model.config, n_layers=len(layers))
    return dataclasses.replace(model, config=config, layers=[model.layers[i] for i in layers])


def reduced_head(model: NativeModel, kept: Tensor) -> NativeModel:
    """The head over the kept token ids only (their rows gathered once, a copy of N rows); the logits of every other
    token are -inf, so a little model with it proposes only kept tokens and verification stays lossless."""
    kept = torch.as_tensor(kept, dtype=torch.long)
    V = model.config.vocab_size
    if kept.ndim != 1 or not len(kept) or int(kept.min()) < 0 or int(kept.max()) >= V \
            or int(torch.bincount(kept).max()) > 1:
        raise ValueError(f"kept ids must be distinct token ids in 0..{V - 1}")
    if model.head_ids is not None:
        raise ValueError("the head is already reduced")
    kept = kept.sort().values
    head = model.head
    if isinstance(head, BlockWeight):
        rows = head.data.reshape(head.data.shape[0], -1).index_select(0, kept)  # (N, row bytes): whole rows at once
        head = dataclasses.replace(head, data=rows.view(len(kept), *head.data.shape[1:]), shape=(len(kept), head.shape[1]))
    elif head.is_mkldnn:
        raise ValueError("the head is packed for oneDNN: reduce it before packing (from_hf(..., pack=False))")
    else:
        head = head.index_select(0, kept)  # (N, dim)
    return dataclasses.replace(model, head=head, head_ids=kept)


def allocate_cache(config: NativeConfig, max_length: int, dtype: torch.dtype) -> KVCache:
    """Uninitialised on purpose: nothing past the valid prefix is ever read, and untouched pages cost nothing."""
    shape = (1, config.n_kv_heads, max_length, config.head_dim)  # (B, H_kv, S, D)
    return KVCache([torch.empty(shape, dtype=dtype) for _ in range(config.n_layers)],
                   [torch.empty(shape, dtype=dtype) for _ in range(config.n_layers)])
