"""The native forward: embedding, decoder layers (in blocks.c when every weight is in blocks, else torch), head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import kernels
from ..kernels import BlockWeight
from .model import STEP_TOKENS, KVCache, Layer, NativeConfig, NativeModel


def linear(x: Tensor, w: Tensor | torch.ScriptObject | BlockWeight, b: Tensor | None = None) -> Tensor:
    if isinstance(w, BlockWeight):  # GGUF blocks, see pack_blocks
        y = kernels.linear(x, w)  # (N, out) float32
        return y if b is None else y + b
    if isinstance(w, torch.ScriptObject):  # fp16 weights packed for fbgemm, see pack_fp16
        y = torch.ops.quantized.linear_dynamic_fp16(x, w)  # (N, out) float32
        return y if b is None else y + b
    if not w.is_mkldnn:
        return F.linear(x, w, b)
    if x.shape[0] == 1:  # oneDNN's one-row kernel sums in another order; as two rows it matches every batch
        return torch.ops.mkldnn._linear_pointwise(x.expand(2, -1), w, b, "none", [], "")[:1]  # (1, out)
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")  # packed weight, see pack_weights


def embedding(model: NativeModel, ids: Tensor) -> Tensor:
    """ids (T,) -> their embedding rows (T, dim), gathered exactly from blocks where the embedding is in blocks."""
    if isinstance(model.embed, BlockWeight):
        return kernels.embedding(model.embed, ids)
    return F.embedding(ids, model.embed)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., T, heads, D), cos/sin (T, 1, D) -> x rotated. Swapping the halves (a roll by D/2, one flip here)
    plus the sign folded into sin is rotate_half."""
    swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)  # (..., heads, 2, D/2) -> [x2, x1]
    return x * cos + swapped * sin


def group_mask(start: int, end: int, groups: int) -> Tensor:
    """(G * T, end) bool for grouped queries (rows ordered g, t): position start + t sees keys 0..start + t."""
    causal = torch.arange(end) <= torch.arange(start, end).unsqueeze(1)  # (T, end)
    return causal.repeat(groups, 1)  # (G * T, end)


def step_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(D)) v, batch-invariant in bf16: a query row's result is bitwise the same whether it is
    computed alone over its own prefix or among T rows over a longer, masked prefix. SDPA is not (its reduction
    order depends on the shapes), and in bf16 that last-bit difference flips near-tie argmaxes, so a verified draft
    token could differ from what one-token `ar` steps produce. oneDNN's bf16 matmuls with at least two rows are
    invariant (masked keys add exact zeros); scores are rounded to bf16 and softmaxed in fp32, like HF's eager
    attention. q (1, H_kv, Q, D), k and v (1, H_kv, L, D), attn_mask (Q, L) bool or None -> (1, H_kv, Q, D)"""
    one = q.shape[-2] == 1
    if one:  # a one-row matmul takes another kernel; two identical rows match every larger block
        q = q.expand(-1, -1, 2, -1)
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (1, H_kv, Q, L)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    y = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # (1, H_kv, Q, D)
    return y[..., :1, :] if one else y


def decoder_layer(layer: Layer, x: Tensor, c: NativeConfig, attend) -> Tensor:
    """One LLaMA-family decoder layer, the one definition in Python (blocks.c computes the same): pre-norm
    attention, then a pre-norm SwiGLU MLP, each added to the residual stream. attend(h) -> (..., T, dim) is the
    attention over normed inputs h with its projections: what differs between a cached step, a batch of rows at
    their own positions and a training pass."""
    x = x + attend(rms_norm(x, layer.attn_norm, c.norm_eps))
    return x + mlp(layer, rms_norm(x, layer.mlp_norm, c.norm_eps), c)


def project_qkv(layer: Layer, x: Tensor, rope: tuple[Tensor, Tensor], c: NativeConfig) -> tuple[Tensor, Tensor, Tensor]:
    """x (..., T, dim) -> q (..., T, H, D) and k (..., T, H_kv, D), both rotated, and v (..., T, H_kv, D)."""
    H, Hkv, D = c.n_heads, c.n_kv_heads, c.head_dim
    qkv = linear(x, layer.wqkv, layer.bqkv).unflatten(-1, (H + 2 * Hkv, D))  # (..., T, H + 2 H_kv, D)
    qk = apply_rope(qkv[..., :H + Hkv, :], *rope)  # (..., T, H + H_kv, D)
    return qk[..., :H, :], qk[..., H:, :], qkv[..., H + Hkv:, :]


def attention(layer: Layer, x: Tensor, k_cache: Tensor, v_cache: Tensor, start: int,
              rope: tuple[Tensor, Tensor], mask: Tensor | None, c: NativeConfig) -> Tensor:
    """GQA by folding each kv head's G query heads into the query axis: one SDPA per kv head, no expanded K/V.
    At T = 1 this is also a mask-free SDPA, several times faster on CPU than enable_gqa."""
    T, H, Hkv, D = x.shape[0], c.n_heads, c.n_kv_heads, c.head_dim
    G, end = H // Hkv, start + T
    q, k, v = project_qkv(layer, x, rope, c)  # (T, H, D), (T, H_kv, D), (T, H_kv, D)
    k_cache[0, :, start:end] = k.transpose(0, 1)  # (H_kv, T, D)
    v_cache[0, :, start:end] = v.transpose(0, 1)  # (H_kv, T, D)
    q = q.reshape(T, Hkv, G, D).permute(1, 2, 0, 3).reshape(1, Hkv, G * T, D)  # (1, H_kv, G * T, D)
    invariant = T <= STEP_TOKENS and x.dtype == torch.bfloat16  # fp32 SDPA differs only in rounding
    attend = step_attention if invariant else F.scaled_dot_product_attention
    y = attend(q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask)  # (1, H_kv, G * T, D)
    y = y.view(Hkv, G, T, D).permute(2, 0, 1, 3).reshape(T, H * D)  # (T, H * D), head h = kv * G + g
    return linear(y, layer.wo, layer.bo)  # (T, dim)


def mlp(layer: Layer, x: Tensor, c: NativeConfig) -> Tensor:
    """x (..., T, dim) -> (..., T, dim): SwiGLU over the fused gate and up rows."""
    gate_up = linear(x, layer.w13, layer.b13).unflatten(-1, (2, c.ffn_dim))  # (..., T, 2, F)
    return linear(F.silu(gate_up[..., 0, :]) * gate_up[..., 1, :], layer.w2, layer.b2)  # (..., T, dim)


@torch.inference_mode()
def forward(model: NativeModel, cache: KVCache, ids: Tensor, start: int, keep: int,
            features: Tensor | None = None) -> Tensor:
    """ids (T,) at positions start..start+T-1 -> float32 logits (keep, V) of the last `keep` positions.
    features: an optional (S, dim) buffer that receives the final normed hidden state of every fed position
    (rows start..start+T-1), the input of a feature-conditioned little model (bild/drafts/feature.py)."""
    x = blocks(model, cache, embedding(model, ids), start)  # (T, dim)
    T = ids.shape[0]
    if features is None:
        return head_logits(model, x[T - keep:])  # (keep, V): the head only where logits are kept
    f = final_norm(model, x)  # (T, dim)
    features[start:start + T] = f
    return project(model, f[T - keep:])  # (keep, V)


def blocks(model: NativeModel, cache: KVCache, x: Tensor, start: int) -> Tensor:
    """The decoder layers over input vectors x (T, dim) at positions start..start+T-1 -> (T, dim)."""
    if x.dtype == torch.float32 and all(layer.fused is not None for layer in model.layers):
        return fused_blocks(model, cache, x, start)
    c = model.config
    T = x.shape[0]
    end = start + T
    rope = (model.cos[start:end].unsqueeze(1), model.sin[start:end].unsqueeze(1))  # (T, 1, D) each
    mask = group_mask(start, end, c.n_heads // c.n_kv_heads) if T > 1 else None  # one query sees the whole prefix
    for layer, k_cache, v_cache in zip(model.layers, cache.k, cache.v):
        x = decoder_layer(layer, x, c, lambda h: attention(layer, h, k_cache, v_cache, start, rope, mask, c))  # noqa: B023
    return x


def fused_blocks(model: NativeModel, cache: KVCache, x: Tensor, start: int) -> Tensor:
    """blocks() for a model whose layers are all GGUF blocks: one call into blocks.c for all of them, which does
    what attention() and mlp() do (its attention is batch-invariant too). x (T, dim) -> (T, dim)."""
    c = model.config
    x = x.contiguous().clone()  # (T, dim), updated in place layer by layer
    dims = kernels.Dims(c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, cache.k[0].shape[2], c.norm_eps)
    kernels.model_forward(x, start, dims, [layer.fused for layer in model.layers], cache.k, cache.v, model.cos,
                          model.sin)
    return x


def head_logits(model: NativeModel, x: Tensor) -> Tensor:
    """Final norm and head: x (N, dim) -> float32 logits (N, V)."""
    return project(model, final_norm(model, x))


def final_norm(model: NativeModel, x: Tensor) -> Tensor:
    return rms_norm(x, model.norm, model.config.norm_eps)


def project(model: NativeModel, f: Tensor) -> Tensor:
    """The head over normed hidden states f (N, dim) -> float32 logits (N, V); a reduced head gives -inf (zero
    probability) outside its kept ids."""
    logits = linear(f, model.head).float()  # (N, V) or (N, kept)
    if model.head_ids is None:
        return logits
    full = logits.new_full((f.shape[0], model.config.vocab_size), float("-inf"))
    return full.index_copy_(1, model.head_ids, logits)  # (N, V)
