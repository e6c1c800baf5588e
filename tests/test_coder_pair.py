"""Integration tests on the default pair: Qwen2.5-Coder-1.5B with its 0.5B, read straight from their GGUF files."""

from __future__ import annotations

import pytest

from bild import BigLittle, model_files, models

pytestmark = pytest.mark.skipif(model_files.installed_file(model_files.MODELS["qwen2.5-coder-0.5b"].parts[0]) is None,
                                reason="the coder pair's parts are not installed (scripts/install.sh)")
PROMPT = [{"role": "user", "content": "Write a Python function that returns the sum of the squares of a list."}]


@pytest.fixture(scope="module")
def bl():
    return BigLittle.load()


def test_the_default_pair_is_the_coder_pair_on_its_own_blocks(bl):
    big, little = bl.big_runner.model, bl.little_runner.model
    assert (big.config.n_layers, big.config.dim, big.config.n_kv_heads) == (28, 1536, 2)
    assert (little.config.n_layers, little.config.dim) == (24, 896)
    assert (big.head.kind, little.head.kind) == ("gguf_q6_k", "gguf_q8_0")  # each file's own output tensor
    assert bl.big is None and bl.engine == "NativeRunner"
    # the shipped little: the 0.5B's file with its 32k-token head plus the prompt's tokens
    assert bl.little_description.startswith(models.default_little("qwen2.5-coder-1.5b") + ": qwen2.5-coder-0.5b (")
    assert little.head_ids is not None and len(little.head_ids) >= 32768
    assert bl.little_file == models.gguf_file("qwen2.5-coder-0.5b")  # llama.cpp's draft: the plain file
    assert "q4_k" in bl.precision and "int8 activations" in bl.precision
    assert bl.defaults.get("lookup", 0) > 0  # the pair's measured defaults


def test_greedy_speculative_and_bild_equal_ar(bl):
    ar = bl.generate(PROMPT, policy="ar", max_new_tokens=32)
    assert "def " in ar.text
    for kwargs in (dict(policy="speculative", lookup=0), dict(policy="speculative", gamma=8),
                   dict(policy="bild", rollback=0.0)):
        res = bl.generate(PROMPT, max_new_tokens=32, **kwargs)
        assert res.token_ids == ar.token_ids, kwargs
        assert res.stats.big_calls < len(ar.token_ids)  # the little model's drafts were used
