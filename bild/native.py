"""A lean native forward for LLaMA-family decoders on CPU, gpt-fast style.

Weights live in plain tensors (fused QKV and gate/up projections, pre-packed for oneDNN), the KV
cache is preallocated [1, H_kv, S, D] per layer, and every forward writes at explicit positions
start..start+T-1. Rolling back is `length = n`: stale entries past the valid prefix are never read, and the
next write overwrites them.

    runner = NativeRunner.from_hf(hf_model, dtype=torch.bfloat16)   # or torch.float32 for exactness
    runner = NativeRunner.from_hf(hf_model, dtype=torch.float16)    # fp16 weights, fp32 activations (x86 fbgemm)
    runner = NativeRunner.from_hf(gguf_q4_model, dtype=torch.float32)  # fp32 on GGUF Q4_1/Q8_0 blocks, read exactly
    little = runner.early_exit(2)                                   # shares weights, own cache

Handles LLaMA, Mistral and Qwen2 (q/k/v bias) from a loaded Hugging Face model; `supports()` says which.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .kernels import BlockWeight

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


@dataclass(slots=True)
class NativeModel:
    """Read-only weights and tables; all mutable state lives in a KVCache."""
    config: NativeConfig
    embed: Tensor  # (V, dim)
    layers: list[Layer]
    norm: Tensor  # (dim,)
    head: Tensor  # (V, dim); the same tensor as embed when tied
    cos: Tensor  # (max_length, D)
    sin: Tensor  # (max_length, D), first half negated so that rotate_half(x) * sin == roll(x) * sin
    head_ids: Tensor | None = None  # reduced-vocabulary head: head is (N, dim) over these N token ids
    weight_dtype: torch.dtype | None = None  # of the matmul weights, when not `dtype` (fp16, see pack_fp16)
    gguf_blocks: bool = False  # some matmul weights are GGUF blocks read exactly (see pack_blocks)
    rounded: str | None = None  # a little model's own weights, rounded to these blocks (see round_blocks)
    int8: bool = False  # the blocks' products take int8-rounded activations (lossy, see with_int8)

    @property
    def dtype(self) -> torch.dtype:
        """Activations, norms, embedding and KV cache."""
        return self.embed.dtype

    @property
    def matmul_dtype(self) -> torch.dtype:
        """Of the layers' and head's matmul weights (float32 for blocks: they rebuild the fp32 weights exactly)."""
        return self.weight_dtype or self.dtype

    @property
    def precision(self) -> str:
        """e.g. "torch.float32 on GGUF q4_1/q8_0 blocks" or "torch.float16 weights, torch.float32 activations"."""
        if self.gguf_blocks:
            kinds = sorted({w.kind for w in _matmul_weights(self) if isinstance(w, BlockWeight)})
            acts = ", int8 activations in the products" if self.int8 else ""
            if self.rounded:
                return f"{self.dtype} on {'/'.join(kinds)} blocks (its own weights rounded to {self.rounded}){acts}"
            return f"{self.dtype} on GGUF {'/'.join(kinds)} blocks (the file's weights, exactly){acts}"
        weights = self.matmul_dtype
        return str(weights) if weights == self.dtype else f"{weights} weights, {self.dtype} activations"


@dataclass(slots=True)
class KVCache:
    k: list[Tensor]  # per layer (1, H_kv, S, D)
    v: list[Tensor]  # per layer (1, H_kv, S, D)


# ---------------------------------------------------------------- building


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
    from .drafts.heads import ReducedHead
    return isinstance(head, ReducedHead)


def bf16_supported() -> bool:
    """Native bf16 dot products (AVX512-BF16, AMX or Arm BF16); elsewhere bf16 is emulated and slow."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return True  # no flags to read: trust oneDNN
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def fp16_supported() -> bool:
    """fbgemm's fp16-weight GEMM (x86 with AVX2 and F16C), what float16 weights run on."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def fastest_dtype() -> torch.dtype:
    """bf16 where the CPU computes it natively, else fp16 weights where fbgemm has them, else fp32."""
    if bf16_supported():
        return torch.bfloat16
    return torch.float16 if fp16_supported() else torch.float32


def resolve_dtype(dtype: torch.dtype | None) -> torch.dtype:
    """None -> fastest_dtype(); a bf16 request on a CPU without it falls back to fp32.
    float16 means fp16 weights with fp32 activations (pack_fp16), never fp16 arithmetic."""
    if dtype is None:
        return fastest_dtype()
    if dtype == torch.bfloat16 and not bf16_supported():
        warnings.warn("this CPU has no native bf16; the native forward runs in float32")
        return torch.float32
    if dtype == torch.float16 and not fp16_supported():
        raise ValueError("float16 weights need fbgemm's fp16 GEMM (x86 CPUs); use float32 or bfloat16")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"native forward runs in float32, bfloat16 or float16 (weights only), not {dtype}")
    return dtype


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
    cfg, inner = hf_model.config, hf_model.model
    attn = inner.layers[0].self_attn
    head_dim = attn.q_proj.weight.shape[0] // cfg.num_attention_heads
    config = NativeConfig(
        n_layers=len(inner.layers), dim=cfg.hidden_size, n_heads=cfg.num_attention_heads,
        n_kv_heads=cfg.num_key_value_heads, head_dim=head_dim, ffn_dim=inner.layers[0].mlp.up_proj.weight.shape[0],
        vocab_size=hf_model.lm_head.weight.shape[0], max_length=_context_length(cfg), norm_eps=inner.norm.variance_epsilon,
    )
    embed = _weight(inner.embed_tokens.weight, dtype)
    if weights == torch.float16:  # the lookup reads the rows a tied head packs: both fp16-rounded, stored fp32
        embed = embed.half().float()
    head, head_ids = _head(hf_model.lm_head, inner.embed_tokens, embed, dtype)
    cos, sin = rope_tables(inner.rotary_emb.inv_freq, inner.rotary_emb.attention_scaling, config.max_length, dtype)
    layers = [_layer(block, dtype) for block in inner.layers]
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


def _head(lm_head, embed_tokens, embed: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(head weight, kept ids or None); a head tied to the embedding reuses the converted embedding."""
    if _is_reduced_head(lm_head):
        return _weight(lm_head.sub_weight, dtype), lm_head.kept
    tied = lm_head.weight.data_ptr() == embed_tokens.weight.data_ptr()
    return (embed if tied else _weight(lm_head.weight, dtype)), None


def _context_length(cfg) -> int:
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


def _layer(block, dtype: torch.dtype) -> Layer:
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


def pack_weights(model: NativeModel, batch_hint: int = PACK_BATCH_HINT) -> NativeModel:
    """Every matmul weight reordered once into oneDNN's blocked layout (what inductor's freezing does).
    Plain bf16 F.linear re-derives that layout on each call; packed, a decode step was ~1.5x faster on an
    AVX512-BF16 CPU. In fp32, F.linear's one-row product ran on one core of the 2-core AVX2 CPU; packed, the
    big model's matmuls of a one-token step took 26 ms instead of 45 and of a 9-token verification 40 ms
    instead of 91 (benchmarks/native_forward.py measures both). Results are bitwise those of F.linear in
    bf16, and differ from it in the last bits in fp32. Norms, embedding and biases stay plain tensors."""
    def packed(w: Tensor | BlockWeight) -> Tensor | BlockWeight:
        return w if isinstance(w, BlockWeight) else onednn_weight(w, batch_hint)
    return _map_weights(model, packed)


def onednn_weight(w: Tensor, batch_hint: int = PACK_BATCH_HINT) -> Tensor:
    return w if w.is_mkldnn else torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)


def pack_fp16(model: NativeModel) -> NativeModel:
    """Weight-only fp16: every matmul weight rounded to fp16 and packed for fbgemm's fp16 GEMM, which widens it
    to fp32 in registers and accumulates in fp32. Half the bytes a step streams, on CPUs without native bf16:
    121 products of one SmolLM2 step took 12.9 ms instead of 27.2 packed fp32 on the 2-core AVX2 CPU
    (benchmarks/matmul_kernels.py). Activations, norms, embedding and KV cache stay fp32. Outputs are exact only
    relative to the fp16-rounded weights (a relative change of at most 2^-11 per weight)."""
    if model.dtype != torch.float32:
        raise ValueError(f"fp16 weights go with float32 activations, not {model.dtype}")
    return _map_weights(model, fp16_weight, weight_dtype=torch.float16)


def fp16_weight(w: Tensor | BlockWeight) -> torch.ScriptObject | BlockWeight:
    if isinstance(w, BlockWeight):  # a little model's head rows read as the big model's blocks (pack_like)
        return w
    with warnings.catch_warnings():  # fbgemm warns about values it saturates; SmolLM2's weights have none
        warnings.simplefilter("ignore")
        return torch.ops.quantized.linear_prepack_fp16(w.float(), None)


def pack_blocks(model: NativeModel) -> NativeModel:
    """Every float32 matmul weight that is a dequantised GGUF Q4_1 (layers) or Q8_0 (head) matrix, read as those
    blocks by bild/kernels: 6 and 9 bits a weight instead of 32, and the same fp32 values. SmolLM2-135M's GGUF
    is all Q4_1 and a Q8_0 embedding. Others stay as they are: when layer 0's first weight is not made of blocks
    (a trained draft's), no layer's is tried; a draft's head rows taken from the big model's are still found."""
    if model.dtype != torch.float32:
        return model

    def read(w: Tensor | BlockWeight, kind: str = "q4_1") -> Tensor | BlockWeight:
        return w if isinstance(w, BlockWeight) else kernels.to_blocks(w, kind) or w
    layers = model.layers
    if isinstance(read(layers[0].wqkv), BlockWeight):
        layers = [_fuse(dataclasses.replace(layer, wqkv=read(layer.wqkv), wo=read(layer.wo), w13=read(layer.w13),
                                            w2=read(layer.w2))) for layer in layers]
    head = read(model.head, "q8_0")
    found = layers is not model.layers or isinstance(head, BlockWeight)
    return dataclasses.replace(model, layers=layers, head=head, gguf_blocks=found) if found else model


def _map_weights(model: NativeModel, f, **fields) -> NativeModel:
    """The model with f applied to every layer's four matmul weights and to the head (layers re-fused), and
    `fields` replaced."""
    layers = [_fuse(dataclasses.replace(layer, wqkv=f(layer.wqkv), wo=f(layer.wo), w13=f(layer.w13), w2=f(layer.w2)))
              for layer in model.layers]
    return dataclasses.replace(model, layers=layers, head=f(model.head), **fields)


def _fuse(layer: Layer) -> Layer:
    pointers = kernels.layer_pointers([layer.wqkv, layer.wo, layer.w13, layer.w2],
                                      [layer.bqkv, layer.bo, layer.b13, layer.b2], layer.attn_norm, layer.mlp_norm)
    return dataclasses.replace(layer, fused=pointers)


def _matmul_weights(model: NativeModel) -> list:
    return [w for layer in model.layers for w in (layer.wqkv, layer.wo, layer.w13, layer.w2)] + [model.head]


def pack_like(model: NativeModel, like: NativeModel) -> NativeModel:
    """Pack `model` (plain tensors, like's activation dtype) the way `like` is packed, so both take one kernel;
    beside a big model on GGUF blocks, a little model's head rows taken from the big model stay its exact blocks
    and its own weights are rounded to q8_0 blocks (round_blocks)."""
    if like.gguf_blocks:
        model = round_blocks(pack_blocks(model))
        return with_int8(model) if like.int8 else model
    if like.matmul_dtype == torch.float16:
        return pack_fp16(model)
    return pack_weights(model) if like.layers[0].wqkv.is_mkldnn else model


def round_blocks(model: NativeModel) -> NativeModel:
    """A little model's float32 matmul weights that are not yet blocks, rounded to q8_0 blocks (kernels.quantise),
    so that whole layers run in blocks.c. Lossy, and harmless for a draft: a lossless policy's output depends only
    on the big model. Weights whose input width is not a multiple of 32 stay packed fp32."""
    def rounded(w: Tensor | BlockWeight) -> Tensor | BlockWeight:
        return w if isinstance(w, BlockWeight) else kernels.quantise(w) or onednn_weight(w)
    own = [w for w in _matmul_weights(model) if not isinstance(w, BlockWeight)]
    return _map_weights(model, rounded, gguf_blocks=True, rounded="q8_0" if own else None)


def with_int8(model: NativeModel) -> NativeModel:
    """The model with every block weight's products taking activations rounded to int8 per 32-value block, as
    llama.cpp computes (kernels.with_int8): lossy against the fp32 model, and faster. Outputs are then lossless
    relative to this model: ar and verification run the same batch-invariant products."""
    if not model.gguf_blocks:
        raise ValueError("int8 activations need matmul weights in GGUF blocks: a float32 model loaded from a GGUF "
                         "file of Q4_1/Q8_0 tensors, with the block kernels available")

    def int8(w):
        return kernels.with_int8(w) if isinstance(w, BlockWeight) else w
    return _map_weights(model, int8, int8=True)


def pack_weight_like(w: Tensor, like: NativeModel) -> Tensor | torch.ScriptObject | BlockWeight:
    """One extra matmul weight (a feature draft's fc) packed as `like`'s layers are."""
    if like.gguf_blocks:
        blocks = kernels.quantise(w)
        if blocks is None:
            return onednn_weight(w)
        return kernels.with_int8(blocks) if like.int8 else blocks
    if like.matmul_dtype == torch.float16:
        return fp16_weight(w)
    return onednn_weight(w) if like.layers[0].wqkv.is_mkldnn else w


def streamed_bytes(model: NativeModel) -> int:
    """Bytes one decode step must read: every layer's matmul weights and norms, the final norm and the head (not
    the embedding, of which a step reads one row). Biases are left out: at most a few kB."""
    c = model.config
    qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    shapes = [(qkv, c.dim), (c.dim, c.n_heads * c.head_dim), (2 * c.ffn_dim, c.dim), (c.dim, c.ffn_dim)] * c.n_layers
    shapes.append((c.vocab_size if model.head_ids is None else model.head_ids.shape[0], c.dim))
    weights = sum(w.nbytes if isinstance(w, BlockWeight) else rows * cols * model.matmul_dtype.itemsize
                  for w, (rows, cols) in zip(_matmul_weights(model), shapes))
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
    config = dataclasses.replace(model.config, n_layers=n_layers)
    return dataclasses.replace(model, config=config, layers=model.layers[:n_layers])


def allocate_cache(config: NativeConfig, max_length: int, dtype: torch.dtype) -> KVCache:
    """Uninitialised on purpose: nothing past the valid prefix is ever read, and untouched pages cost nothing."""
    shape = (1, config.n_kv_heads, max_length, config.head_dim)  # (B, H_kv, S, D)
    return KVCache([torch.empty(shape, dtype=dtype) for _ in range(config.n_layers)],
                   [torch.empty(shape, dtype=dtype) for _ in range(config.n_layers)])


# ---------------------------------------------------------------- forward


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


def attention(layer: Layer, x: Tensor, k_cache: Tensor, v_cache: Tensor, start: int,
              rope: tuple[Tensor, Tensor], mask: Tensor | None, c: NativeConfig) -> Tensor:
    """GQA by folding each kv head's G query heads into the query axis: one SDPA per kv head, no expanded K/V.
    At T = 1 this is also a mask-free SDPA, several times faster on CPU than enable_gqa."""
    T, H, Hkv, D = x.shape[0], c.n_heads, c.n_kv_heads, c.head_dim
    G, end = H // Hkv, start + T
    qkv = linear(x, layer.wqkv, layer.bqkv).view(T, H + 2 * Hkv, D)  # (T, H + 2 H_kv, D)
    qk = apply_rope(qkv[:, :H + Hkv], *rope)  # (T, H + H_kv, D)
    k_cache[0, :, start:end] = qk[:, H:].transpose(0, 1)  # (H_kv, T, D)
    v_cache[0, :, start:end] = qkv[:, H + Hkv:].transpose(0, 1)  # (H_kv, T, D)
    q = qk[:, :H].reshape(T, Hkv, G, D).permute(1, 2, 0, 3).reshape(1, Hkv, G * T, D)  # (1, H_kv, G * T, D)
    invariant = T <= STEP_TOKENS and x.dtype == torch.bfloat16  # fp32 SDPA differs only in rounding
    attend = step_attention if invariant else F.scaled_dot_product_attention
    y = attend(q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask)  # (1, H_kv, G * T, D)
    y = y.view(Hkv, G, T, D).permute(2, 0, 1, 3).reshape(T, H * D)  # (T, H * D), head h = kv * G + g
    return linear(y, layer.wo, layer.bo)  # (T, dim)


def mlp(layer: Layer, x: Tensor, c: NativeConfig) -> Tensor:
    gate_up = linear(x, layer.w13, layer.b13).view(x.shape[0], 2, c.ffn_dim)  # (T, 2, F)
    return linear(F.silu(gate_up[:, 0]) * gate_up[:, 1], layer.w2, layer.b2)  # (T, dim)


@torch.inference_mode()
def forward(model: NativeModel, cache: KVCache, ids: Tensor, start: int, keep: int,
            features: Tensor | None = None) -> Tensor:
    """ids (T,) at positions start..start+T-1 -> float32 logits (keep, V) of the last `keep` positions.
    features: an optional (S, dim) buffer that receives the final normed hidden state of every fed position
    (rows start..start+T-1), the input of a feature-conditioned little model (bild/drafts/feature.py)."""
    x = blocks(model, cache, F.embedding(ids, model.embed), start)  # (T, dim)
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
        x = x + attention(layer, rms_norm(x, layer.attn_norm, c.norm_eps), k_cache, v_cache, start, rope, mask, c)
        x = x + mlp(layer, rms_norm(x, layer.mlp_norm, c.norm_eps), c)
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


# ---------------------------------------------------------------- runner


class NativeRunner:
    """The decoding loop's runner interface over a NativeModel and its own static KV cache."""

    needs_big = False  # decodes on its own (policy "little")

    def __init__(self, model: NativeModel, max_length: int | None = None, source=None):
        limit = model.config.max_length
        self.model = model
        self.source = source  # the HF module it was converted from, if any (early exits of it share this runner)
        self.vocab_size = model.config.vocab_size
        self.max_length = min(max_length or limit, limit)
        self.cache = allocate_cache(model.config, self.max_length, model.dtype)
        self.length = 0
        self.features: Tensor | None = None  # (max_length, dim) once record_features() is called

    def record_features(self) -> Tensor:
        """From now on every forward writes its positions' final normed hidden states into self.features."""
        if self.features is None:
            self.features = torch.empty(self.max_length, self.model.config.dim, dtype=self.model.dtype)
        return self.features

    @classmethod
    def from_hf(cls, hf_model, dtype: torch.dtype | None = torch.bfloat16, max_length: int | None = None,
                pack: bool | None = None, gguf_blocks: bool | None = None, like: NativeModel | None = None,
                int8: bool = False):
        return cls(from_hf(hf_model, dtype, pack, gguf_blocks, like, int8), max_length, source=hf_model)

    def early_exit(self, n_layers: int) -> NativeRunner:
        """A runner over the first n_layers + final norm + head, sharing weights, with its own cache."""
        return NativeRunner(early_exit(self.model, n_layers), self.max_length)

    def start(self, prompt_ids: list[int]) -> list[int]:
        self.length = 0
        return list(prompt_ids)

    def forward(self, ids: list[int], keep: int = 1) -> Tensor:
        if not 1 <= keep <= len(ids):
            raise ValueError(f"keep must be in 1..{len(ids)}, got {keep}")
        if self.length + len(ids) > self.max_length:
            raise ValueError(f"sequence of {self.length + len(ids)} tokens exceeds the cache of {self.max_length}")
        logits = forward(self.model, self.cache, torch.tensor(ids), self.length, keep, self.features)  # (keep, V)
        self.length += len(ids)
        return logits

    def crop(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot crop to {n} tokens")
        self.length = min(n, self.length)


# ---------------------------------------------------------------- batched greedy decoding (teacher data)


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
    qkv = linear(x, layer.wqkv, layer.bqkv).view(B, H + 2 * Hkv, D)  # (B, H + 2 H_kv, D)
    qk = apply_rope(qkv[:, :H + Hkv], *rope)  # (B, H + H_kv, D)
    rows = torch.arange(B)
    k_cache[rows, :, pos] = qk[:, H:]  # (B, H_kv, D) into (B, H_kv, S, D) at (b, :, pos[b])
    v_cache[rows, :, pos] = qkv[:, H + Hkv:]
    end = mask.shape[-1]
    q = qk[:, :H].reshape(B, Hkv, H // Hkv, D)  # (B, H_kv, G, D), head h = kv * G + g
    y = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask)  # (B, H_kv, G, D)
    return linear(y.reshape(B, H * D), layer.wo, layer.bo)  # (B, dim)


@torch.inference_mode()
def batch_step(model: NativeModel, cache: KVCache, ids: Tensor, pos: Tensor) -> Tensor:
    """ids (B,) at per-row positions pos (B,) -> final normed hidden states (B, dim). Rows never see each other."""
    c = model.config
    end = int(pos.max()) + 1
    rope = (model.cos[pos].unsqueeze(1), model.sin[pos].unsqueeze(1))  # (B, 1, D) each
    mask = (torch.arange(end) <= pos.unsqueeze(1)).view(len(pos), 1, 1, end)  # (B, 1, 1, end)
    x = F.embedding(ids, model.embed)  # (B, dim)
    for layer, k_cache, v_cache in zip(model.layers, cache.k, cache.v):
        x = x + batch_attention(layer, rms_norm(x, layer.attn_norm, c.norm_eps), k_cache, v_cache, pos, rope, mask, c)
        x = x + mlp(layer, rms_norm(x, layer.mlp_norm, c.norm_eps), c)
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
