"""Tiny random-initialised models built from configs, and a character-level tokenizer for them."""

from __future__ import annotations

import copy

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

VOCAB = 96
torch.set_num_threads(1)  # tiny models: thread hand-offs cost more than they save, and CI has 2 shared cores


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A real fast tokenizer, one token per printable ASCII character; 0 pad, 1 bos, 2 eos."""
    chars = [chr(i) for i in range(32, 32 + VOCAB - 3)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    return fast


def tiny_llama(seed: int, layers: int = 2, vocab: int = VOCAB, head_scale: float = 8.0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    _sharpen(model.lm_head.weight, head_scale)
    return model


def tiny_t5(seed: int, layers: int = 2, vocab: int = VOCAB) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_heads=4,
                   decoder_start_token_id=0, eos_token_id=2, pad_token_id=0)
    model = T5ForConditionalGeneration(cfg).eval()
    model.lm_head = torch.nn.Linear(32, vocab, bias=False)  # untied: a tied random head echoes its input
    _sharpen(model.lm_head.weight)
    return model


def _sharpen(weight: torch.Tensor, scale: float = 8.0) -> None:
    """Random heads give near-uniform distributions; scale them so outputs have structure and rare EOS."""
    with torch.no_grad():
        weight.mul_(scale / weight.std())
        weight[2] = weight[2] * 0.25


def perturbed(model, noise: float, seed: int = 123):
    """A little model that agrees with `model` on many tokens but not all: its weights plus Gaussian noise."""
    torch.manual_seed(seed)
    little = copy.deepcopy(model)
    with torch.no_grad():
        for w in little.parameters():
            w.add_(torch.randn_like(w) * noise * w.std())
    return little


def fp16_params(model):
    """A copy with fp16 parameters and fp32 buffers (RoPE's inv_freq), as from_pretrained(dtype=float16) loads it:
    the native engine then runs it with fp16 weights and fp32 activations."""
    half = copy.deepcopy(model)
    for w in half.parameters():
        w.data = w.data.half()
    return half


@pytest.fixture(scope="session")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    """A tiny LLaMA saved with its tokenizer, loadable by path like any Hugging Face model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(0, layers=2).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def llama_pair():
    big = tiny_llama(0, layers=2)
    return big, perturbed(big, 0.1)


@pytest.fixture(scope="session")
def t5_pair():
    big = tiny_t5(0, layers=2)
    return big, perturbed(big, 0.02)  # T5 is more sensitive: this gives about half acceptance


def gguf_rounded(w: torch.Tensor, kind: str) -> torch.Tensor:
    """w (N, K) rounded the way llama.cpp quantises to Q4_1 (w = d q + m, q in 0..15) or Q8_0 (w = d q, q in
    -127..127), blocks of 32 along K, d and m stored in fp16, then dequantised as gguf does: a GGUF model's
    weights as transformers loads them."""
    N, K = w.shape
    v = w.detach().float().reshape(N, K // 32, 32)  # (N, nb, 32)
    if kind == "q4_1":
        lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)  # (N, nb, 1)
        d, m = ((hi - lo) / 15).half().float(), lo.half().float()
        q = torch.round((v - lo) / torch.where(d == 0, 1.0, d)).clamp(0, 15)
        return (d * q + m).reshape(N, K)
    d = (v.abs().amax(-1, keepdim=True) / 127).half().float()  # (N, nb, 1)
    return (d * torch.round(v / torch.where(d == 0, 1.0, d)).clamp(-127, 127)).reshape(N, K)


def gguf_params(model):
    """A copy whose 2-D weights are GGUF blocks, dequantised: Q8_0 for the embedding and head, Q4_1 for the rest."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in rounded.named_parameters():
            if w.dim() == 2:
                w.copy_(gguf_rounded(w, "q8_0" if "embed" in name or "lm_head" in name else "q4_1"))
    return rounded
