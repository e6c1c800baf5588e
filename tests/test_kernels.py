"""GGUF block weights (bild/kernels): exact recovery, the C kernel's products, and the native engine on them."""

from __future__ import annotations

import pytest
import torch

from bild import kernels, native
from bild.api import BigLittle
from bild.native import NativeRunner
from conftest import gguf_params, gguf_rounded, tiny_llama

pytestmark = pytest.mark.skipif(kernels.unavailable() is not None, reason=f"{kernels.unavailable()}")
KINDS = ("q4_1", "q8_0")


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_rebuild_a_gguf_weight_exactly(kind):
    torch.manual_seed(0)
    w = gguf_rounded(torch.randn(40, 96) * 0.05, kind)
    blocks = kernels.to_blocks(w, kind)
    assert blocks is not None and blocks.shape == (40, 96)
    assert torch.equal(kernels.dequantise(blocks), w)
    assert blocks.nbytes == 40 * 3 * (24 if kind == "q4_1" else 36)


@pytest.mark.parametrize("kind", KINDS)
def test_other_weights_are_not_taken_for_blocks(kind):
    torch.manual_seed(0)
    assert kernels.to_blocks(torch.randn(8, 64), kind) is None  # plain fp32
    assert kernels.to_blocks(torch.randn(8, 48), kind) is None  # not a multiple of 32
    assert kernels.to_blocks(gguf_rounded(torch.randn(8, 64), kind).double(), kind) is None  # not float32


def test_q8_blocks_are_not_q4():
    torch.manual_seed(0)
    assert kernels.to_blocks(gguf_rounded(torch.randn(8, 64), "q8_0"), "q4_1") is None


@pytest.mark.parametrize("kind", KINDS)
def test_linear_is_an_fp32_product_and_batch_invariant(kind):
    torch.manual_seed(1)
    w = gguf_rounded(torch.randn(50, 128), kind)
    blocks = kernels.to_blocks(w, kind)
    x = torch.randn(21, 128)
    y = kernels.linear(x, blocks)  # (21, 50)
    exact = (x.double() @ w.double().T)  # (21, 50)
    assert (y.double() - exact).abs().max() < 1e-5 * exact.abs().max()
    for T in (1, 2, 3, 4, 5, 8, 9, 16):  # every tile shape: a row's result never depends on its neighbours
        assert torch.equal(kernels.linear(x[:T], blocks), y[:T])
    assert torch.equal(kernels.linear(x[11:12], blocks), y[11:12])


def test_linear_refuses_bad_inputs():
    blocks = kernels.to_blocks(gguf_rounded(torch.randn(8, 64), "q4_1"), "q4_1")
    with pytest.raises(ValueError, match="float32"):
        kernels.linear(torch.randn(2, 64).double(), blocks)
    with pytest.raises(ValueError, match=r"\(T, 64\)"):
        kernels.linear(torch.randn(2, 32), blocks)


@pytest.fixture(scope="module")
def gguf_llama():
    return gguf_params(tiny_llama(seed=3, layers=3))


def test_native_engine_reads_gguf_weights_as_blocks(gguf_llama):
    runner = NativeRunner.from_hf(gguf_llama, dtype=torch.float32)
    model = runner.model
    assert model.gguf_blocks and "q4_1/q8_0 blocks" in model.precision
    assert all(isinstance(w, kernels.BlockWeight) for w in native._matmul_weights(model))
    assert all(layer.fused is not None for layer in model.layers)  # whole layers run in blocks.c
    plain = NativeRunner.from_hf(tiny_llama(seed=3, layers=3), dtype=torch.float32).model
    assert not plain.gguf_blocks and not isinstance(plain.layers[0].wqkv, kernels.BlockWeight)
    assert native.streamed_bytes(model) < native.streamed_bytes(plain) / 4


def test_blocks_logits_match_hf_fp32(gguf_llama):
    runner = NativeRunner.from_hf(gguf_llama, dtype=torch.float32)
    ids = [1, 5, 9, 30, 4, 77, 12, 3, 8]
    got = runner.forward(ids, keep=len(ids))
    with torch.inference_mode():
        want = gguf_llama(torch.tensor([ids])).logits[0]
    assert (got - want).abs().max() < 1e-5 * want.abs().max().clamp(min=1.0)


def test_blocks_greedy_equals_hf_fp32_and_speculative_equals_ar(gguf_llama, tok):
    prompts = [[1] + [3 + (7 * i + 5 * j) % 90 for j in range(1 + i % 6)] for i in range(12)]
    little = _exit(gguf_llama)
    hf = BigLittle(gguf_llama, little, tok, engine="hf")
    bl = BigLittle(gguf_llama, little, tok, engine="native")
    assert "blocks" in bl.precision and bl.little_runner.model.gguf_blocks  # the exit shares the blocks
    for p in prompts:
        ar = bl.generate(p, policy="ar", max_new_tokens=20).token_ids
        assert ar == hf.generate(p, policy="ar", max_new_tokens=20).token_ids
        assert bl.generate(p, policy="speculative", gamma=4, fallback=0.0, max_new_tokens=20).token_ids == ar


def test_a_separate_little_model_beside_blocks_gets_fp16_weights_and_block_head(gguf_llama, tok):
    little = tiny_llama(seed=4, layers=1)
    with torch.no_grad():  # its head rows are the big model's, as a trained draft's are
        little.lm_head.weight.copy_(gguf_llama.lm_head.weight)
    bl = BigLittle(gguf_llama, little, tok, engine="native")
    m = bl.little_runner.model
    assert isinstance(m.head, kernels.BlockWeight)
    assert m.matmul_dtype == (torch.float16 if native.fp16_supported() else torch.float32)
    ar = bl.generate([1, 7, 9], policy="ar", max_new_tokens=16).token_ids
    assert bl.generate([1, 7, 9], policy="speculative", gamma=3, fallback=0.0, max_new_tokens=16).token_ids == ar


def _exit(model):
    from bild.models import early_exit
    return early_exit(model, 1)


def test_blocks_verification_logits_are_bitwise_those_of_one_token_steps(gguf_llama):
    """Every product and the attention are row-invariant in blocks.c: a k-token forward gives each position the
    very bits one-token steps give, so greedy `speculative` equals `ar` by construction, not by luck."""
    runner = NativeRunner.from_hf(gguf_llama, dtype=torch.float32)
    prompt, tail = [1, 5, 9, 30, 4], [77, 12, 3, 8, 40, 41, 42, 43, 44]
    runner.start(prompt)
    runner.forward(prompt)
    together = runner.forward(tail, keep=len(tail))  # (9, V)
    runner.crop(len(prompt))
    alone = torch.cat([runner.forward([t]) for t in tail])  # (9, V)
    assert torch.equal(together, alone)
