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
    assert all(isinstance(w, kernels.BlockWeight) for w in native.matmul_weights(model))
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


@pytest.mark.parametrize("heads, kv_heads", [(8, 4), (1, 1)])  # head_dim 4 (scalar scores) and 32 (four lanes)
def test_blocks_attention_over_other_head_widths(heads, kv_heads):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64)
    hf = gguf_params(LlamaForCausalLM(cfg).eval())
    runner = NativeRunner.from_hf(hf, dtype=torch.float32)
    ids = [1, 5, 9, 30, 4, 77, 12, 3, 8]
    runner.start(ids)
    got = runner.forward(ids, keep=len(ids))  # (9, V)
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
    assert (got - want).abs().max() < 1e-5 * want.abs().max().clamp(min=1.0)
    runner.crop(5)
    assert torch.equal(torch.cat([runner.forward([t]) for t in ids[5:]]), got[5:])  # steps == one forward


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


def test_a_separate_little_model_beside_blocks_runs_on_q8_0_blocks_with_the_big_head(gguf_llama, tok):
    little = tiny_llama(seed=4, layers=1)
    with torch.no_grad():  # its head rows are the big model's, as a trained draft's are
        little.lm_head.weight.copy_(gguf_llama.lm_head.weight)
    bl = BigLittle(gguf_llama, little, tok, engine="native")
    m = bl.little_runner.model
    assert torch.equal(m.head.data, bl.big_runner.model.head.data)  # the big model's exact q8_0 head
    assert all(w.kind == "q8_0" for w in native.matmul_weights(m)[:4])  # its own layers rounded
    assert all(layer.fused is not None for layer in m.layers) and "rounded to q8_0" in m.precision
    ar = bl.generate([1, 7, 9], policy="ar", max_new_tokens=16).token_ids
    assert bl.generate([1, 7, 9], policy="speculative", gamma=3, fallback=0.0, max_new_tokens=16).token_ids == ar
    for policy in ("speculative", "bild"):  # sampling runs on the rounded draft too
        out = bl.generate([1, 7, 9], policy=policy, temperature=1.0, seed=3, max_new_tokens=16).token_ids
        assert len(out) == 16


def test_quantise_rounds_to_q8_0_as_gguf_does():
    torch.manual_seed(0)
    w = torch.randn(6, 64)
    w[0, :32] = 0.0  # an all-zero block has d = 0 and rebuilds exactly
    b = kernels.quantise(w)
    back = kernels.dequantise(b)
    d = (w.reshape(6, 2, 32).abs().amax(-1) / 127).half().float()  # (6, 2)
    assert torch.equal(back[0, :32], torch.zeros(32))
    assert ((back - w).abs().reshape(6, 2, 32) <= d[..., None] / 2 * (1 + 1e-3)).all()  # half a step at most
    assert kernels.to_blocks(back, "q8_0") is not None  # what it rounds to is a GGUF q8_0 weight
    x = torch.randn(3, 64)
    assert torch.allclose(kernels.linear(x, b), x @ back.T, atol=1e-5)
    assert kernels.quantise(torch.randn(4, 48)) is None  # not whole blocks
    with pytest.raises(ValueError, match="q8_0"):
        kernels.quantise(w, "q4_1")


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


# ---- int8 activations (lossy, llama.cpp's arithmetic)

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K", [96, 128])  # an odd number of blocks, and an even one
def test_int8_linear_stays_within_its_rounding_bound_and_is_batch_invariant(kind, K):
    torch.manual_seed(2)
    w = gguf_rounded(torch.randn(50, K), kind)
    blocks = kernels.with_int8(kernels.to_blocks(w, kind))
    x = torch.randn(21, K)
    x[3, :32] = 0.0  # an all-zero block of x rounds to scale 0
    y = kernels.linear(x, blocks)  # (21, 50)
    exact = x.double() @ w.double().T  # (21, 50)
    step = x.reshape(21, K // 32, 32).abs().amax(-1) / 127  # (21, nb): int8 step of each block of x
    half_step = step.repeat_interleave(32, dim=1).double() / 2  # (21, K): the most rounding moves an element
    bound = half_step @ w.double().abs().T  # (21, 50)
    assert ((y.double() - exact).abs() <= bound * 1.001 + 1e-5 * exact.abs().max()).all()
    assert (y.double() - exact).abs().max() > 1e-4  # it did round: not the fp32 product
    for T in (1, 2, 3, 4, 5, 8, 9, 16):  # every tile shape: a row's result never depends on its neighbours
        assert torch.equal(kernels.linear(x[:T], blocks), y[:T])
    assert torch.equal(kernels.linear(x[11:12], blocks), y[11:12])


def test_int8_linear_over_more_rows_than_an_l2_chunk():
    torch.manual_seed(3)
    w = kernels.with_int8(kernels.to_blocks(gguf_rounded(torch.randn(8, 2048), "q4_1"), "q4_1"))
    x = torch.randn(100, 2048)  # 100 rows of 2048 int8 values: more than one 192 kB chunk
    y = kernels.linear(x, w)  # (100, 8)
    for t in (0, 95, 96, 99):
        assert torch.equal(kernels.linear(x[t:t + 1], w), y[t:t + 1])


def test_int8_runner_steps_equal_one_forward_and_stay_near_fp32(gguf_llama):
    exact = NativeRunner.from_hf(gguf_llama, dtype=torch.float32)
    runner = NativeRunner.from_hf(gguf_llama, dtype=torch.float32, int8=True)
    assert runner.model.int8 and "int8 activations" in runner.model.precision
    assert all(w.int8 for w in native.matmul_weights(runner.model))
    assert all(layer.fused is not None and layer.fused.int8 for layer in runner.model.layers)
    prompt, tail = [1, 5, 9, 30, 4], [77, 12, 3, 8, 40, 41, 42, 43, 44]
    for r in (exact, runner):
        r.start(prompt + tail)
    want = exact.forward(prompt + tail, keep=len(tail))  # (9, V)
    together = runner.forward(prompt + tail, keep=len(tail))  # (9, V)
    assert (together - want).abs().max() < 0.05 * want.abs().max()
    runner.crop(len(prompt))
    assert torch.equal(torch.cat([runner.forward([t]) for t in tail]), together)  # batch-invariant


def test_int8_speculative_equals_int8_ar_with_an_exit_and_a_separate_draft(gguf_llama, tok):
    separate = tiny_llama(seed=4, layers=1)
    with torch.no_grad():
        separate.lm_head.weight.copy_(gguf_llama.lm_head.weight)
    for little in (_exit(gguf_llama), separate):
        bl = BigLittle(gguf_llama, little, tok, engine="native", activations="int8")
        assert bl.big_runner.model.int8 and bl.little_runner.model.int8  # the draft runs like the big model
        for p in ([1, 7, 9], [1, 30, 2, 5, 61]):
            ar = bl.generate(p, policy="ar", max_new_tokens=16).token_ids
            assert bl.generate(p, policy="speculative", gamma=4, fallback=0.0, max_new_tokens=16).token_ids == ar


def test_int8_activations_are_refused_without_blocks(gguf_llama, tok):
    from bild.errors import BildError
    plain = tiny_llama(seed=3, layers=2)
    with pytest.raises(ValueError, match="GGUF blocks"):
        NativeRunner.from_hf(plain, dtype=torch.float32, int8=True)
    with pytest.raises(BildError, match="GGUF blocks"):
        BigLittle(plain, _exit(plain), tok, engine="native", activations="int8")
    with pytest.raises(BildError, match="native engine"):
        BigLittle(gguf_llama, _exit(gguf_llama), tok, engine="hf", activations="int8")
    with pytest.raises(BildError, match="activations"):
        BigLittle(gguf_llama, _exit(gguf_llama), tok, activations="int4")
