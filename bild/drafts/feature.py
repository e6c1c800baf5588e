"""Feature-conditioned little models: decoder layers that read the big model's own features (EAGLE).

Li et al., "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty" (arXiv 2401.15077). The big
model's final hidden state already holds most of what decides its next token. EAGLE reports that a single layer
given that state, plus the token actually chosen, predicts the big model's next state far better than a small
model reading tokens alone, after training on ~10^8 positions. (This project's own runs, at ~10^6 positions, are in
benchmarks/results/2026-11-23-avx2-feature-drafts.) The big model computes those states anyway when it verifies, so
they cost nothing extra.

Notation: f_t is the big model's final normed hidden state at position t, from which its head gives p for the
token at t+1. At position t the draft reads the token x_t and f_{t-1}:

    u_t  = W_fc [emb(x_t); f_{t-1}] + b_fc        (dim)         f_{-1} = 0
    h    = K LLaMA decoder layers over u_0..u_t  (own KV cache; K = 1 unless built from a shallow draft)
    f̂_t  = rms_norm(h_t) * w_out                  the predicted feature
    q_t  = softmax(head(f̂_t))                     the big model's head rows (reduced: the kept ids, -inf elsewhere)

While decoding, f_{t-1} is the big model's wherever it has run over position t-1, and the draft's own f̂_{t-1}
beyond that. Embeddings and head rows are the big model's: shared, frozen, never saved.

Pieces: `FeatureDraft` (the trainable module, saved like every draft by bild.drafts.recipe; its loss and held-out
agreement are in bild.training), `FeatureModel` + `feature_forward` (the
native inference forward) and `FeatureRunner` (the decoding loop's runner, reading the big runner's features).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import native
from ..errors import BildError
from . import LittleSpec
from .heads import ReducedHead


EVAL_STEPS = 3  # draft tokens per round that held-out agreement scores (the draft sweep's γ)
KV = tuple[Tensor, Tensor]  # one pass's keys and values, (B, H_kv, T, D) each


def unrolled_attention(q: Tensor, kvs: list[KV]) -> Tensor:
    """Causal attention for pass n = len(kvs) of a drafting unroll (HASS, arXiv 2408.15766): q (B, H, T, D).

    Pass n at position t is the n-th draft token of a round that began at position t - n + 1. Its context is what
    the draft's cache holds then: pass 1's entries (built from the big model's features) at positions
    <= t - n + 1, and pass m's entry at position t - (n - m) for m = 2..n (built from the draft's own f̂)."""
    B, H, T, D = q.shape
    n, group = len(kvs), H // kvs[0][0].shape[1]
    expand = lambda t: t.repeat_interleave(group, dim=1)  # noqa: E731  (B, H_kv, T, D) -> (B, H, T, D)
    pos = torch.arange(T, device=q.device)
    k1, v1 = expand(kvs[0][0]), expand(kvs[0][1])  # (B, H, T, D) each
    scores = (q @ k1.transpose(-1, -2)) * D ** -0.5  # (B, H, T, T)
    scores = scores.masked_fill(pos[None, :] > pos[:, None] - (n - 1), float("-inf"))
    own_scores, own_values = [], []
    for m in range(2, n + 1):
        lag = n - m  # pass m's entry sits `lag` positions before the query
        k, v = (F.pad(expand(t), (0, 0, lag, 0))[:, :, :T] for t in kvs[m - 1])  # (B, H, T, D): row t = entry t - lag
        own_scores.append(((q * k).sum(-1) * D ** -0.5).masked_fill(pos < lag, float("-inf")))  # (B, H, T)
        own_values.append(v)
    p = torch.cat([scores, torch.stack(own_scores, dim=-1)], dim=-1).softmax(-1)  # (B, H, T, T + n - 1)
    own = (p[..., T:].unsqueeze(-1) * torch.stack(own_values, dim=-2)).sum(-2)  # (B, H, T, D)
    return p[..., :T] @ v1 + own


class Block(nn.Module):
    """One trainable LLaMA decoder layer laid out as bild.native's Layer (fused qkv and gate/up, no biases)."""

    def __init__(self, layer: native.Layer, config: native.NativeConfig):
        super().__init__()
        own = lambda t: nn.Parameter(t.detach().float().clone())  # noqa: E731
        self.attn_norm, self.wqkv, self.wo = own(layer.attn_norm), own(layer.wqkv), own(layer.wo)
        self.mlp_norm, self.w13, self.w2 = own(layer.mlp_norm), own(layer.w13), own(layer.w2)
        self.config = config

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], past: list[KV] = ()) -> tuple[Tensor, KV]:
        """x (B, T, dim), rope: cos and sin (T, 1, D) -> (B, T, dim) and this pass's keys and values, through
        bild.native's one layer definition (decoder_layer) over this block's parameters.
        `past`: the keys and values of the earlier passes of an unroll (FeatureDraft.unroll)."""
        layer = native.Layer(attn_norm=self.attn_norm, wqkv=self.wqkv, bqkv=None, wo=self.wo, bo=None,
                             mlp_norm=self.mlp_norm, w13=self.w13, b13=None, w2=self.w2, b2=None)
        kv = []
        out = native.decoder_layer(layer, x, self.config, lambda h: self._attention(layer, h, rope, past, kv))
        return out, kv[0]

    def _attention(self, layer: native.Layer, x: Tensor, rope: tuple[Tensor, Tensor], past: list[KV],
                   kv: list) -> Tensor:
        B, T, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in native.project_qkv(layer, x, rope, self.config))  # (B, heads, T, D)
        kv.append((k, v))
        if past:
            y = unrolled_attention(q, [*past, (k, v)])  # (B, H, T, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, H, T, D)
        return F.linear(y.transpose(1, 2).reshape(B, T, -1), self.wo)  # (B, T, dim)

    def native(self, dtype: torch.dtype) -> native.Layer:
        w = lambda t: t.detach().to(dtype).contiguous()  # noqa: E731
        return native.Layer(attn_norm=w(self.attn_norm), wqkv=w(self.wqkv), bqkv=None, wo=w(self.wo), bo=None,
                            mlp_norm=w(self.mlp_norm), w13=w(self.w13), b13=None, w2=w(self.w2), b2=None)


class FeatureDraft(nn.Module):
    """The trainable draft: fc over [embedding; feature], K LLaMA blocks, an output norm, the big model's head.

    The blocks start as big layers `init_layers`, the output norm as the big model's final norm, the fc as
    [0; I] (the feature passes through). `init_from_shallow` instead starts from a trained shallow draft with
    fc = [I; 0]: the draft then computes exactly what the shallow draft does until training teaches it to use the
    features. `lm_head` is the big head (or a bild.drafts.heads.ReducedHead of it), so vocabulary checks see its size.
    """

    bild_little = LittleSpec(reads_big_features=True)

    def __init__(self, big: nn.Module, head: nn.Module, init_layers: list[int]):
        super().__init__()
        cfg, inner = big.config, big.model
        self.config = cfg
        self.eps = inner.norm.variance_epsilon
        self.embed_tokens = inner.embed_tokens  # shared, frozen
        self.lm_head = head                     # shared rows, frozen
        shape = native.hf_config(big)
        self.blocks = nn.ModuleList(Block(native.hf_layer(inner.layers[i], torch.float32), shape) for i in init_layers)
        self.out_norm = nn.Parameter(inner.norm.weight.detach().float().clone())
        dim = cfg.hidden_size
        self.fc = nn.Linear(2 * dim, dim)
        self._pass_through(feature=True)
        cos, sin = native.rope_tables(inner.rotary_emb.inv_freq, inner.rotary_emb.attention_scaling,
                                      native.context_length(cfg), torch.float32)
        self.register_buffer("cos", cos, persistent=False)  # (S, D)
        self.register_buffer("sin", sin, persistent=False)  # (S, D)

    @torch.no_grad()
    def _pass_through(self, feature: bool) -> None:
        """fc = [0; I] (u_t = f_{t-1}) or [I; 0] (u_t = emb(x_t)), bias 0."""
        dim = self.fc.out_features
        eye, zero = torch.eye(dim), torch.zeros(dim, dim)
        self.fc.weight.copy_(torch.cat([zero, eye] if feature else [eye, zero], dim=1))
        self.fc.bias.zero_()

    @torch.no_grad()
    def init_from_shallow(self, shallow: nn.Module) -> None:
        """Copy a trained shallow draft's layers and final norm (same count and shapes) and set fc = [I; 0]."""
        layers = shallow.model.layers
        if len(layers) != len(self.blocks):
            raise ValueError(f"the shallow draft has {len(layers)} layers, this feature draft {len(self.blocks)}")
        for block, layer in zip(self.blocks, layers):
            src = native.hf_layer(layer, torch.float32)
            for name in ("attn_norm", "wqkv", "wo", "mlp_norm", "w13", "w2"):
                getattr(block, name).copy_(getattr(src, name))
        self.out_norm.copy_(shallow.model.norm.weight)
        self._pass_through(feature=False)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, ids: Tensor, feats: Tensor) -> Tensor:
        """ids (B, T), feats (B, T, dim) with feats[:, t] = f_{t-1} -> predicted features f̂ (B, T, dim)."""
        return self.unroll(ids, feats, 1)[0]

    def unroll(self, ids: Tensor, feats: Tensor, steps: int) -> list[Tensor]:
        """The first `steps` draft tokens of a round starting at every position at once: pass 1 reads the big
        model's features feats (B, T, dim), pass n > 1 reads pass n-1's f̂ and attends as unrolled_attention
        says. -> f̂ of each pass, (B, T, dim) each; pass n's row t predicts the token after t."""
        emb = self.embed_tokens(ids)  # (B, T, dim)
        T = ids.shape[1]
        rope = (self.cos[:T].unsqueeze(1), self.sin[:T].unsqueeze(1))  # (T, 1, D) each
        pasts: list[list[KV]] = [[] for _ in self.blocks]
        out = []
        for _ in range(steps):
            h = self.fc(torch.cat([emb, feats.to(self.fc.weight.dtype)], dim=-1))  # (B, T, dim)
            for block, past in zip(self.blocks, pasts):
                h, kv = block(h, rope, past)
                past.append(kv)
            out.append(F.rms_norm(h, h.shape[-1:], self.out_norm, self.eps))  # (B, T, dim)
            feats = shifted(out[-1])
        return out

    def logits(self, f: Tensor) -> Tensor:
        """Head logits over the kept ids (reduced head) or the full vocabulary: (..., N)."""
        head = self.lm_head
        return head.reduced(f) if isinstance(head, ReducedHead) else head(f)


def check_big(big: nn.Module) -> None:
    if not native.supports(big):
        raise BildError(f"feature drafts need a LLaMA-family big model the native engine runs, "
                        f"not {type(big).__name__}")


def shifted(feats: Tensor) -> Tensor:
    """(B, T, dim) features f_t -> the draft's inputs f_{t-1}, zeros at t = 0."""
    return torch.cat([torch.zeros_like(feats[:, :1]), feats[:, :-1]], dim=1)


# ----------------------------------------------------------------------------------------------- inference


@dataclass(slots=True)
class FeatureModel:
    """The draft on the native engine: `model` is a K-layer NativeModel (the big model's embedding, cos/sin and
    head rows; the draft's blocks and output norm), `fc` the input projection over [emb(x_t); f_{t-1}]."""
    model: native.NativeModel
    fc: Tensor  # (dim, 2 dim), packed like the blocks' weights in bf16
    fc_bias: Tensor  # (dim,)


def to_native(draft: FeatureDraft, big: native.NativeModel) -> FeatureModel:
    """Convert the trained module, sharing the big native model's embedding and rope tables (its dtype too)."""
    dtype = big.dtype
    w = lambda t: t.detach().to(dtype).contiguous()  # noqa: E731
    head = draft.lm_head
    kept = head.kept if isinstance(head, ReducedHead) else None
    rows = w(head.sub_weight) if kept is not None else big.head
    config = dataclasses.replace(big.config, n_layers=len(draft.blocks))
    layers = [block.native(dtype) for block in draft.blocks]
    model = native.NativeModel(config, big.embed, layers, w(draft.out_norm), rows, big.cos, big.sin, kept)
    model = native.pack_like(model, big)  # the draft's matmuls take the big model's kernel
    return FeatureModel(model, native.pack_weight_like(w(draft.fc.weight), big), w(draft.fc.bias))


@torch.inference_mode()
def feature_forward(fm: FeatureModel, cache: native.KVCache, ids: Tensor, feats: Tensor, start: int,
                    keep: int) -> tuple[Tensor, Tensor]:
    """ids (T,) and their input features feats (T, dim) = f_{t-1} at positions start..start+T-1
    -> float32 logits (keep, V) of the last `keep` positions and the predicted features f̂ (T, dim)."""
    model = fm.model
    u = native.linear(torch.cat([F.embedding(ids, model.embed), feats], dim=-1), fm.fc, fm.fc_bias)  # (T, dim)
    f_hat = native.final_norm(model, native.blocks(model, cache, u, start))  # (T, dim)
    return native.project(model, f_hat[ids.shape[0] - keep:]), f_hat


class FeatureRunner:
    """The decoding loop's runner interface over a FeatureModel, reading the big runner's recorded features.

    Position t's input feature is f_{t-1}: the big model's where it has run over position t-1, else the
    draft's own f̂_{t-1} (which exists only for the position just before, fed one token at a time). Cache
    entries built from an own f̂ are provisional: `crop` never keeps them, so after every verification the
    draft re-reads those positions with the big model's features (one forward over the catch-up tokens)."""

    needs_big = True  # cannot decode alone: policy "little" is refused

    def __init__(self, fm: FeatureModel, big: native.NativeRunner):
        self.fm, self.big = fm, big
        self.vocab_size = fm.model.config.vocab_size
        self.max_length = big.max_length
        self.cache = native.allocate_cache(fm.model.config, self.max_length, fm.model.dtype)
        self.own = torch.zeros(self.max_length, fm.model.config.dim, dtype=fm.model.dtype)  # f̂ per position
        self.big_features = big.record_features()  # (S, dim)
        self.length = 0
        self.exact = 0  # cache positions 0..exact-1 were all built from the big model's features

    @classmethod
    def attach(cls, draft: FeatureDraft, big) -> FeatureRunner:
        if not isinstance(big, native.NativeRunner):
            raise BildError("a feature draft reads the big model's features from the native engine; "
                            "use engine auto or native with a LLaMA-family big model")
        return cls(to_native(draft, big.model), big)

    def start(self, prompt_ids: list[int]) -> list[int]:
        self.length = self.exact = 0
        return list(prompt_ids)

    def forward(self, ids: list[int], keep: int = 1) -> Tensor:
        start, end = self.length, self.length + len(ids)
        if not 1 <= keep <= len(ids) or end > self.max_length:
            raise ValueError(f"bad feed: {len(ids)} tokens at {start}, keep {keep}, cache {self.max_length}")
        own_fed = start >= 1 and start - 1 >= self.big.length  # position `start` reads the draft's own f̂
        if end - 2 >= max(self.big.length, start):
            raise BildError("a feature draft runs ahead of the big model one token at a time")
        logits, f_hat = feature_forward(self.fm, self.cache, torch.tensor(ids), self._inputs(start, end, own_fed),
                                        start, keep)
        self.own[start:end] = f_hat
        self.exact = min(self.exact, start) if own_fed or start > self.exact else end
        self.length = end
        return logits

    def _inputs(self, start: int, end: int, own_fed: bool) -> Tensor:
        """f_{t-1} for t in start..end-1 -> (T, dim): zeros at t = 0, the draft's own f̂ at t = start when
        own_fed, the big model's recorded features everywhere else."""
        feats = torch.zeros(end - start, self.fm.model.config.dim, dtype=self.fm.model.dtype)  # (T, dim)
        lo = start + int(own_fed or start == 0)
        feats[lo - start:] = self.big_features[lo - 1:end - 1]
        if own_fed:
            feats[0] = self.own[start - 1]
        return feats

    def crop(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot crop to {n} tokens")
        self.length = min(n, self.length, self.exact)
