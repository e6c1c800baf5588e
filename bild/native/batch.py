"""Batched greedy decoding of many prompts at once (teacher data for training little models)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .forward import decoder_layer, embedding, final_norm, forward, linear, project, project_qkv
from .model import KVCache, Layer, NativeConfig, NativeModel


def allocate_batch_cache(config: NativeConfig, batch: int, max_length: int, dtype: torch.dtype) -> KVCache:
    """Zeroed, unlike allocate_cache: shorter rows attend over masked slots, and a masked NaN would still
    poison softmax(scores) @ V (0 * NaN)."""
    shape = (batch, config.n_kv_heads, max_length, config.head_dim)  # (B, H_kv, S, D)
    return KVCache([torch.zeros(shape, dtype=dtype) for _ in range(config.n_layers)],
                   [torch.zeros(shape, dtype=dtype) for _ in range(config.n_layers)])


def _row(cache: KVCache, b: int) -> KVCache:
    """Row b of a batched cache as a batch-1 cache (views), so `forward` can prefill it."""
    return KVCache([k[b:b + 1] for k in cache.k], [v[b:b + 1] for v in cache.v])


def batch_attention(layer: Layer, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
                    rope: tuple[Tensor, Tensor], mask: Tensor, c: NativeConfig) -> Tensor:
    """x (B, dim): one new token per row, row b at its own position pos[b]; caches (B, H_kv, S, D)."""
    B, H, Hkv, D = x.shape[0], c.n_heads, c.n_kv_heads, c.head_dim
    q, k, v = project_qkv(layer, x, rope, c)  # (B, H, D), (B, H_kv, D), (B, H_kv, D)
    rows = torch.arange(B)
    k_cache[rows, :, pos] = k  # (B, H_kv, D) into (B, H_kv, S, D) at (b, :, pos[b])
    v_cache[rows, :, pos] = v
    end = mask.shape[-1]
    q = q.reshape(B, Hkv, H // Hkv, D)  # (B, H_kv, G, D), head h = kv * G + g
    y = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask)  # (B, H_kv, G, D)
    return linear(y.reshape(B, H * D), layer.wo, layer.bo)  # (B, dim)


@torch.inference_mode()
def batch_step(model: NativeModel, cache: KVCache, ids: Tensor, pos: Tensor) -> Tensor:
    """ids (B,) at per-row positions pos (B,) -> final normed hidden states (B, dim). Rows never see each other."""
    c = model.config
    end = int(pos.max()) + 1
    rope = (model.cos[pos].unsqueeze(1), model.sin[pos].unsqueeze(1))  # (B, 1, D) each
    mask = (torch.arange(end) <= pos.unsqueeze(1)).view(len(pos), 1, 1, end)  # (B, 1, 1, end)
    x = embedding(model, ids)  # (B, dim)
    for layer, k_cache, v_cache in zip(model.layers, cache.k, cache.v):
        x = decoder_layer(layer, x, c, lambda h: batch_attention(layer, h, k_cache, v_cache, pos, rope, mask, c))  # noqa: B023
    return final_norm(model, x)  # (B, dim)


@dataclass(slots=True)
class GreedyBatch:
    """What greedy_batch returns: top-k logits and ids per generated step, and optionally the features."""
    topv: Tensor  # (B, S, k) float32
    topi: Tensor  # (B, S, k); topi[:, :, 0] are the greedy tokens
    features: list[Tensor] | None = None  # per row (P_b + S - 1, dim): final normed hidden of every fed position


@torch.inference_mode()
def greedy_batch(model: NativeModel, prompts: list[list[int]], max_new_tokens: int, top_k: int,
                 eos: int = -1, features: bool = False) -> GreedyBatch:
    """Greedy-continue every prompt for up to max_new_tokens steps (stopping early once every row has hit eos).
    features=True also keeps each row's final normed hidden states over its prompt and generated tokens."""
    if max_new_tokens < 1 or not prompts or min(map(len, prompts)) < 1:
        raise ValueError("greedy_batch needs non-empty prompts and max_new_tokens >= 1")
    pos = torch.tensor([len(p) for p in prompts])  # (B,): where each row's next token goes
    if int(pos.max()) + max_new_tokens > model.config.max_length:
        raise ValueError(f"{int(pos.max())} prompt + {max_new_tokens} new tokens exceed the model's "
                         f"{model.config.max_length} positions")
    cache = allocate_batch_cache(model.config, len(prompts), int(pos.max()) + max_new_tokens, model.dtype)
    prefill = [torch.empty(len(p), model.config.dim, dtype=model.dtype) if features else None
               for p in prompts]  # P_b x (P_b, dim)
    first = [forward(model, _row(cache, b), torch.tensor(p), 0, 1, prefill[b]) for b, p in enumerate(prompts)]
    steps = [torch.cat(first).topk(top_k, dim=-1)]  # values, ids: (B, k) each
    fed = []  # per step (B, dim)
    done = steps[-1].indices[:, 0] == eos
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        fed.append(batch_step(model, cache, steps[-1].indices[:, 0], pos))
        steps.append(project(model, fed[-1]).topk(top_k, dim=-1))
        done |= steps[-1].indices[:, 0] == eos
        pos = pos + 1
    out = GreedyBatch(torch.stack([s.values for s in steps], 1), torch.stack([s.indices for s in steps], 1))
    if features:
        later = torch.stack(fed, 1) if fed else torch.empty(len(prompts), 0, model.config.dim, dtype=model.dtype)
        out.features = [torch.cat([prefill[b], later[b]]) for b in range(len(prompts))]
    return out
