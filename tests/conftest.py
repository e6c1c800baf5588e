"""Tiny random-initialised models built from configs, and a character-level tokenizer for them."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

VOCAB = 96


class CharTokenizer:
    """Token id = byte value offset by 3; 0 pad, 1 bos, 2 eos. Enough of the HF tokenizer API for bild."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"

    def __call__(self, text):
        return type("Enc", (), {"input_ids": [self.bos_token_id] + [3 + (ord(c) % (VOCAB - 3)) for c in text]})

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i - 3 + 32) if i >= 3 else ("" if skip_special_tokens else f"<{i}>") for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return self("".join(m["content"] for m in messages)).input_ids


def tiny_llama(seed: int, layers: int = 2, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    _sharpen(model.lm_head.weight)
    return model


def tiny_t5(seed: int, layers: int = 2, vocab: int = VOCAB) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=layers, num_heads=4,
                   decoder_start_token_id=0, eos_token_id=2, pad_token_id=0)
    model = T5ForConditionalGeneration(cfg).eval()
    model.lm_head = torch.nn.Linear(32, vocab, bias=False)  # untied: a tied random head echoes its input
    _sharpen(model.lm_head.weight)
    return model


def _sharpen(weight: torch.Tensor) -> None:
    """Random heads give near-uniform distributions; scale them so outputs have structure and rare EOS."""
    with torch.no_grad():
        weight.mul_(8.0 / weight.std())
        weight[2] = weight[2] * 0.25


def perturbed(model, noise: float, seed: int = 123):
    """A little model that agrees with `model` on many tokens but not all: its weights plus Gaussian noise."""
    torch.manual_seed(seed)
    little = copy.deepcopy(model)
    with torch.no_grad():
        for w in little.parameters():
            w.add_(torch.randn_like(w) * noise * w.std())
    return little


@pytest.fixture(scope="session")
def tok():
    return CharTokenizer()


@pytest.fixture(scope="session")
def llama_pair():
    big = tiny_llama(0, layers=2)
    return big, perturbed(big, 0.1)


@pytest.fixture(scope="session")
def t5_pair():
    big = tiny_t5(0, layers=2)
    return big, perturbed(big, 0.02)  # T5 is more sensitive: this gives about half acceptance
