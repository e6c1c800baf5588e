"""From a loaded Hugging Face LLaMA-family model (LLaMA, Mistral, Qwen2) to a NativeModel."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import kernels
from .cpu import resolve_dtype
from .model import DYNAMIC_ROPE, SUPPORTED_TYPES, Layer, NativeConfig, NativeModel, rope_tables
from .pack import pack_blocks, pack_fp16, pack_like, pack_weights, with_int8


def supports(hf_model) -> bool:
    """Whether `NativeRunner.from_hf` handles this Hugging Face model exactly; others keep the HF path."""
    cfg = getattr(hf_model, "config", None)
    if cfg is None or not config_supported(cfg):
        return False
    inner = getattr(hf_model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") in DYNAMIC_ROPE:
        return False
    head = getattr(hf_model, "lm_head", None)
    plain = isinstance(head, torch.nn.Linear) and head.bias is None
    return (plain or _is_reduced_head(head)) and len(inner.layers) > 0


def config_supported(cfg) -> bool:
    """What `supports` can tell from a model's config alone, before its weights are loaded."""
    if getattr(cfg, "is_encoder_decoder", False):
        return False
    if getattr(cfg, "model_type", None) not in SUPPORTED_TYPES or getattr(cfg, "hidden_act", None) != "silu":
        return False
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return rope.get("rope_type", rope.get("type", "default")) not in DYNAMIC_ROPE


def _is_reduced_head(head) -> bool:
    """bild.drafts.heads.ReducedHead: logits over `kept` ids only, -inf elsewhere."""
    from ..drafts.heads import ReducedHead
    return isinstance(head, ReducedHead)


def from_hf(hf_model, dtype: torch.dtype | None = None, pack: bool | None = None, gguf_blocks: bool | None = None,
            like: NativeModel | None = None, int8: bool = False) -> NativeModel:
    """Copy-free where dtypes match: weights are referenced, fused and converted tensors are new.
    pack (default: where oneDNN is available) pre-reorders matmul weights into its blocked layout, see pack_weights.
    dtype float16: fp32 everywhere except the matmul weights, which are fp16 and always packed (pack_fp16).
    gguf_blocks (float32 only; default: where the block kernels run): weights that are GGUF blocks, dequantised, are
    read as those blocks (pack_blocks). like: the big model a little one runs beside; its other weights are then
    packed as pack_like says (fp16 beside blocks: a draft's precision never changes a lossless policy's output).
    int8: the blocks take int8-rounded activations (with_int8); needs gguf_blocks. A little model packed like an
    int8 model takes int8 anyway."""
    if not supports(hf_model):
        raise ValueError(f"native forward does not handle {type(hf_model).__name__}")
    weights = resolve_dtype(dtype)
    if weights == torch.float16 and pack is False:
        raise ValueError("float16 weights exist only packed for fbgemm; pack=False needs float32 or bfloat16")
    dtype = torch.float32 if weights == torch.float16 else weights  # activations
    inner = hf_model.model
    config = hf_config(hf_model)
    embed = _weight(inner.embed_tokens.weight, dtype)
    if weights == torch.float16:  # the lookup reads the rows a tied head packs: both fp16-rounded, stored fp32
        embed = embed.half().float()
    head, head_ids = _head(hf_model.lm_head, inner.embed_tokens, embed, dtype)
    cos, sin = rope_tables(inner.rotary_emb.inv_freq, inner.rotary_emb.attention_scaling, config.max_length, dtype)
    layers = [hf_layer(block, dtype) for block in inner.layers]
    model = NativeModel(config, embed, layers, _weight(inner.norm.weight, dtype), head, cos, sin, head_ids)
    _check_shapes(model)
    if weights == torch.float16:
        return pack_fp16(model)
    if weights == torch.float32 and (kernels.unavailable() is None if gguf_blocks is None else gguf_blocks):
        model = pack_blocks(model)
    if like is not None:
        model = pack_like(model, like)  # int8 as well when `like` takes int8
    elif torch.backends.mkldnn.is_available() if pack is None else pack:
        model = pack_weights(model)
    return with_int8(model) if int8 else model


def hf_config(hf_model) -> NativeConfig:
    """The shape of a Hugging Face LLaMA-family model, read off its config and first layer."""
    cfg, inner = hf_model.config, hf_model.model
    head_dim = inner.layers[0].self_attn.q_proj.weight.shape[0] // cfg.num_attention_heads
    return NativeConfig(
        n_layers=len(inner.layers), dim=cfg.hidden_size, n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads, head_dim=head_dim, ffn_dim=inner.layers[0].mlp.up_proj.weight.shape[0],
        vocab_size=hf_model.lm_head.weight.shape[0], max_length=context_length(cfg), norm_eps=inner.norm.variance_epsilon,
    )


def _head(lm_head, embed_tokens, embed: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(head weight, kept ids or None); a head tied to the embedding reuses the converted embedding."""
    if _is_reduced_head(lm_head):
        return _weight(lm_head.sub_weight, dtype), lm_head.kept
    tied = lm_head.weight.data_ptr() == embed_tokens.weight.data_ptr()
    return (embed if tied else _weight(lm_head.weight, dtype)), None


def context_length(cfg) -> int:
    """max_position_embeddings, clamped to a sliding window: within the window full attention is exact."""
    length = int(cfg.max_position_embeddings)
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None) or ()
    if window and (not layer_types or "sliding_attention" in layer_types):
        length = min(length, int(window))
    return length


def _weight(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    if t is None:
        return None
    t = t.detach()
    return t if t.dtype == dtype else t.to(dtype)


def _cat(tensors: list[Tensor | None], dtype: torch.dtype) -> Tensor | None:
    """Fuse along rows; absent biases are zeros when at least one part has one (as Qwen2's o_proj-less bias)."""
    if all(t is None for t in tensors):
        return None
    like = next(t for t in tensors if t is not None)
    return torch.cat([t.detach() if t is not None else torch.zeros_like(like) for t in tensors]).to(dtype)


def hf_layer(block, dtype: torch.dtype) -> Layer:
    a, m = block.self_attn, block.mlp
    return Layer(
        attn_norm=_weight(block.input_layernorm.weight, dtype),
        wqkv=_cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], dtype),
        bqkv=_cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias], dtype),
        wo=_weight(a.o_proj.weight, dtype), bo=_weight(a.o_proj.bias, dtype),
        mlp_norm=_weight(block.post_attention_layernorm.weight, dtype),
        w13=_cat([m.gate_proj.weight, m.up_proj.weight], dtype),
        b13=_cat([m.gate_proj.bias, m.up_proj.bias], dtype),
        w2=_weight(m.down_proj.weight, dtype), b2=_weight(m.down_proj.bias, dtype),
    )


def _check_shapes(model: NativeModel) -> None:
    """Fail loudly at build time rather than with a reshape error mid-decode."""
    c = model.config
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    expected = {"wqkv": (qkv, c.dim), "wo": (c.dim, c.n_heads * c.head_dim), "w13": (2 * c.ffn_dim, c.dim),
                "w2": (c.dim, c.ffn_dim), "attn_norm": (c.dim,), "mlp_norm": (c.dim,)}
    for i, layer in enumerate(model.layers):
        for name, shape in expected.items():
            got = tuple(getattr(layer, name).shape)
            if got != shape:
                raise ValueError(f"layer {i} {name}: expected {shape}, got {got}")
    rows = c.vocab_size if model.head_ids is None else model.head_ids.shape[0]
    if tuple(model.head.shape) != (rows, c.dim) or tuple(model.embed.shape)[1] != c.dim:
        raise ValueError(f"embed {tuple(model.embed.shape)} / head {tuple(model.head.shape)} do not fit dim {c.dim}")
