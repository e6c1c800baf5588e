"""Matmul weights in the form the forward multiplies fastest: oneDNN-packed, fp16, GGUF blocks, int8 activations."""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor

from .. import kernels
from ..kernels import BlockWeight
from .model import PACK_BATCH_HINT, Layer, NativeModel, Precision, matmul_weights


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
    return _map_weights(model, fp16_weight, numerics=Precision("fp16"))


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
    return dataclasses.replace(model, layers=layers, head=head, numerics=Precision("blocks")) if found else model


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
    own = [w for w in matmul_weights(model) if not isinstance(w, BlockWeight)]
    weights = "rounded" if own or model.numerics.weights == "rounded" else "blocks"
    return _map_weights(model, rounded, numerics=dataclasses.replace(model.numerics, weights=weights))


def with_int8(model: NativeModel) -> NativeModel:
    """The model with every block weight's products taking activations rounded to int8 per 32-value block, as
    llama.cpp computes (kernels.with_int8): lossy against the fp32 model, and faster. Outputs are then lossless
    relative to this model: ar and verification run the same batch-invariant products."""
    if not model.gguf_blocks:
        raise ValueError("int8 activations need matmul weights in GGUF blocks: a float32 model loaded from a GGUF "
                         "file of Q4_1/Q8_0 tensors, with the block kernels available")

    def int8(w):
        return kernels.with_int8(w) if isinstance(w, BlockWeight) else w
    return _map_weights(model, int8, numerics=dataclasses.replace(model.numerics, int8=True))


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
