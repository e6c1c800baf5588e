"""GGUF files read directly by the native engine (bild/native/gguf.py): tiny random Qwen2 models written to GGUF
in the test, compared with transformers' forward on the same (dequantised) weights; bad files refused clearly."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from bild import BigLittle, BildError, kernels, native
from bild.native import gguf as G

T = gguf.GGMLQuantizationType
DIM, FFN, VOCAB = 256, 512, 320  # K-quant rows need multiples of 256


def tiny_qwen2(seed: int, layers: int = 2, tied: bool = False) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6,
                      rms_norm_eps=1e-6, tie_word_embeddings=tied)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # random biases, so a forward that dropped them would show
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
        for p in model.parameters():
            if p.dim() == 1 and p is not None and p.shape[0] == DIM:
                p.add_(torch.rand_like(p) * 0.2)  # norms that are not all ones
    return model


def random_blocks(kind: T, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random blocks of `kind` for a (rows, cols) matrix, with fp16 scales of a sane size."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale = lambda n: rng.uniform(0.002, 0.01, size=(rows, cols // block, n)).astype(np.float16).view(np.uint8)  # noqa: E731
    if kind in (T.Q8_0, T.Q5_0):
        raw[..., 0:2] = scale(1)
    elif kind == T.Q4_K:
        raw[..., 0:4] = scale(2)  # d and dmin
    elif kind == T.Q6_K:
        raw[..., 208:210] = scale(1)
    elif kind == T.Q2_K:
        raw[..., 80:84] = scale(2)  # d and dmin
    return raw.reshape(rows, -1)


# llama.cpp's Qwen2 names; q and k rows are not permuted for this architecture
NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}


def write_gguf(model: Qwen2ForCausalLM, path, types: dict[str, T] | None = None, arch: str = "qwen2",
               drop: str | None = None, seed: int = 0) -> None:
    """Write `model` as a GGUF file. types: GGUF tensor name suffix -> quantised type (random blocks, which are
    then copied, dequantised, into `model` so both hold the same weights); everything else is F32."""
    types, rng, cfg = types or {}, np.random.default_rng(seed), model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_eos_token_id(2)

    def put(name: str, param: torch.nn.Parameter) -> None:
        if name == drop:
            return
        kind = next((k for suffix, k in types.items() if name.endswith(suffix + ".weight")), None)
        if kind is None or param.dim() == 1:
            w.add_tensor(name, param.detach().float().numpy())
            return
        raw = random_blocks(kind, *param.shape, rng)
        with torch.no_grad():
            param.copy_(torch.from_numpy(gguf.quants.dequantize(raw, kind).reshape(param.shape).copy()))
        w.add_tensor(name, raw, raw_dtype=kind)

    put("token_embd.weight", model.model.embed_tokens.weight)
    for i, layer in enumerate(model.model.layers):
        put(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight)
        put(f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight)
        for short, long in NAMES.items():
            mod = layer.get_submodule(long)
            put(f"blk.{i}.{short}.weight", mod.weight)
            if mod.bias is not None:
                put(f"blk.{i}.{short}.bias", mod.bias)
    put("output_norm.weight", model.model.norm.weight)
    if not cfg.tie_word_embeddings:
        put("output.weight", model.lm_head.weight)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # (T, V)


def native_logits(model: native.NativeModel, ids: list[int]) -> torch.Tensor:
    runner = native.NativeRunner(model)
    runner.start(ids)
    return runner.forward(ids, keep=len(ids))  # (T, V)


IDS = [5, 77, 3, 250, 19, 64, 300, 8]
# the types llama.cpp's Q4_K_M gives the 1.5B (K-quants) and the 0.5B (rows of 896 are not whole 256-blocks)
LIKE_1_5B = {"attn_q": T.Q4_K, "attn_k": T.Q4_K, "attn_v": T.Q6_K, "attn_output": T.Q4_K, "ffn_gate": T.Q4_K,
             "ffn_up": T.Q4_K, "ffn_down": T.Q6_K, "token_embd": T.Q4_K, "output": T.Q6_K}
LIKE_0_5B = {"attn_q": T.Q5_0, "attn_k": T.Q5_0, "attn_v": T.Q8_0, "attn_output": T.Q5_0, "ffn_gate": T.Q5_0,
             "ffn_up": T.Q5_0, "ffn_down": T.Q6_K, "token_embd": T.Q8_0}


@pytest.mark.parametrize("tied", [False, True])
def test_float32_file_matches_transformers(tmp_path, tied):
    model = tiny_qwen2(0, tied=tied)
    write_gguf(model, tmp_path / "m.gguf")
    m = G.load(str(tmp_path / "m.gguf"), int8=False)
    assert m.config.n_layers == 2 and m.config.n_kv_heads == 2 and m.config.head_dim == 64
    assert (m.head is m.embed) == tied
    torch.testing.assert_close(native_logits(m, IDS), hf_logits(model, IDS), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("types,tied", [(LIKE_1_5B, False), (LIKE_0_5B, True)], ids=["1.5B-like", "0.5B-like"])
def test_quantised_file_matches_transformers_on_the_same_weights(tmp_path, types, tied):
    model = tiny_qwen2(0, tied=tied)
    write_gguf(model, tmp_path / "m.gguf", types=types)  # model now holds the dequantised blocks
    want = hf_logits(model, IDS)
    exact = G.load(str(tmp_path / "m.gguf"), int8=False)
    assert all(isinstance(w, kernels.BlockWeight) for w in native.matmul_weights(exact))
    assert all(layer.fused is not None for layer in exact.layers)  # whole layers run in the C kernels
    torch.testing.assert_close(native_logits(exact, IDS), want, atol=2e-3, rtol=1e-3)
    fast = native_logits(G.load(str(tmp_path / "m.gguf"), int8=True), IDS)  # activations rounded to int8
    assert (fast - want).norm() < 0.1 * want.norm()  # rounding x to int8 per block: measured 3-5% here
    assert not torch.equal(fast, native_logits(exact, IDS))


@pytest.mark.parametrize("int8", [False, True])
def test_verifying_k_tokens_equals_k_steps_bitwise(tmp_path, int8):
    write_gguf(tiny_qwen2(0), tmp_path / "m.gguf", types=LIKE_1_5B)
    runner = native.NativeRunner(G.load(str(tmp_path / "m.gguf"), int8=int8))
    runner.start(IDS)
    runner.forward(IDS[:3])
    steps = torch.cat([runner.forward([t]) for t in IDS[3:]])  # (5, V), one token at a time
    runner.crop(3)
    assert torch.equal(runner.forward(IDS[3:], keep=5), steps)


def test_truncated_file_is_refused_before_any_kernel(tmp_path):
    path = tmp_path / "m.gguf"
    write_gguf(tiny_qwen2(0), path)
    data = path.read_bytes()
    for cut in (len(data) - 1000, 64):
        short = tmp_path / f"short{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(BildError, match="truncated|not a readable GGUF"):
            G.load(str(short))


def test_unsupported_type_architecture_and_missing_tensor(tmp_path):
    model = tiny_qwen2(0)
    write_gguf(model, tmp_path / "q2.gguf", types={"ffn_up": T.Q2_K})
    with pytest.raises(BildError, match=r"blk\.0\.ffn_up\.weight is Q2_K.*--engine hf"):
        G.load(str(tmp_path / "q2.gguf"))
    write_gguf(model, tmp_path / "gemma.gguf", arch="gemma")
    with pytest.raises(BildError, match="architecture gemma.*--engine hf"):
        G.load(str(tmp_path / "gemma.gguf"))
    write_gguf(model, tmp_path / "hole.gguf", drop="blk.1.ffn_down.weight")
    with pytest.raises(BildError, match=r"blk\.1\.ffn_down\.weight is missing"):
        G.load(str(tmp_path / "hole.gguf"))


def test_greedy_speculative_equals_ar_on_a_file_pair(tmp_path, tok):
    write_gguf(tiny_qwen2(0), tmp_path / "big.gguf")
    write_gguf(tiny_qwen2(1, layers=1), tmp_path / "little.gguf")
    big = native.NativeRunner(G.load(str(tmp_path / "big.gguf"), int8=False))
    little = native.NativeRunner(G.load(str(tmp_path / "little.gguf"), int8=False))
    bl = BigLittle.from_runners(big, little, tok, {2}, "a tiny file")
    ar = bl.generate([1, 7, 8], policy="ar", max_new_tokens=24)
    for policy in ("speculative", "bild"):
        out = bl.generate([1, 7, 8], policy=policy, max_new_tokens=24, rollback=0.0)
        assert out.token_ids == ar.token_ids  # rollback 0 makes bild check every little token too
    assert bl.big is None and bl.engine == "NativeRunner"


def test_a_files_index_is_read_once_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("BILD_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "m.gguf"
    write_gguf(tiny_qwen2(0), path, types=LIKE_1_5B)
    first = G.index(str(path))
    monkeypatch.setattr(gguf, "GGUFReader", None)  # a later index or load must not parse the header again
    G._read.cache_clear()
    assert G.index(str(path)) == first and first["architecture"] == "qwen2" and "Q4_K" in first["types"]
    assert G.load(str(path)).config.n_layers == 2
