"""Bad input: one-line errors from the API, exit code 2 and no traceback from the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bild import BigLittle, BildError
from bild.cli import main
from conftest import tiny_llama


@pytest.fixture(scope="module")
def bl(llama_pair, tok):
    return BigLittle(*llama_pair, tok)


@pytest.mark.parametrize("kwargs,message", [
    (dict(fallback=1.5), "fallback must be in [0, 1]"),
    (dict(fallback=-0.1), "fallback must be in [0, 1]"),
    (dict(rollback=-1.0), "rollback must be >= 0"),
    (dict(gamma=0), "gamma must be an integer >= 1"),
    (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
    (dict(policy="beam"), "unknown policy 'beam'"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1]"),
    (dict(top_k=0), "top_k must be an integer >= 1"),
    (dict(max_little=0), "max_little must be an integer >= 1"),
    (dict(seed=2**64), "seed must be an integer in"),
])
def test_bad_settings(bl, kwargs, message):
    with pytest.raises(BildError, match=message.replace("[", r"\[").replace("(", r"\(")):
        bl.generate("hello", **kwargs)


@pytest.mark.parametrize("prompt", ["", [], [{"role": "user", "content": ""}]])
def test_empty_prompt(bl, prompt):
    with pytest.raises(BildError, match="the prompt is empty"):
        bl.generate(prompt)


def test_prompt_longer_than_context(bl):
    with pytest.raises(BildError, match="the prompt is 300 tokens; the model's context is 256 tokens"):
        bl.generate([5] * 300)


@pytest.mark.parametrize("prompt,message", [([5, 500], "token id 500 is outside the vocabulary"),
                                            (42, "a prompt is a string"),
                                            ([1, "a"], "only token ids or only chat messages")])
def test_malformed_prompts(bl, prompt, message):
    with pytest.raises(BildError, match=message):
        bl.generate(prompt)


def test_mismatched_vocabularies(tok):
    with pytest.raises(BildError, match="vocabularies differ: big model has 96 tokens, little model has 64"):
        BigLittle(tiny_llama(0), tiny_llama(1, vocab=64), tok)


def test_missing_and_corrupt_model_files(tmp_path):
    with pytest.raises(BildError, match="model file not found"):
        BigLittle.load(big=str(tmp_path / "nope.gguf"))
    with pytest.raises(BildError, match="model directory not found"):
        BigLittle.load(big=str(tmp_path / "no" / "such" / "dir"))
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 100)
    with pytest.raises(BildError, match="could not load model"):
        BigLittle.load(big=str(bad))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bild.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["--policy", "beam"], "unknown policy"),
    (["--fallback", "2"], "fallback must be in [0, 1]"),
    (["--rollback", "-1"], "rollback must be >= 0"),
    (["--gamma", "0"], "gamma must be an integer >= 1"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["--big", "/no/such/model.gguf"], "model file not found"),
])
def test_cli_errors_are_one_line_with_exit_code_2(args, message):
    proc = run_cli("generate", "hello", *args)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_errors_on_a_loaded_tiny_model(llama_dir, capsys):
    assert main(["generate", "", "--big", llama_dir, "--little", "early-exit:1"]) == 2
    assert "error: the prompt is empty" in capsys.readouterr().err
    assert main(["generate", "x" * 400, "--big", llama_dir]) == 2
    assert "the model's context is 256 tokens" in capsys.readouterr().err


def test_cli_generate_compare_on_a_tiny_model(llama_dir, capsys):
    assert main(["generate", "hello", "--big", llama_dir, "--little", "early-exit:1", "--policy", "speculative",
                 "--max-new-tokens", "12", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "speedup speculative vs ar:" in out and "outputs identical: yes" in out


def test_cli_prepare_loads_the_pair_once_and_reports_a_bad_one(llama_dir, tmp_path, capsys):
    assert main(["prepare", "--big", llama_dir, "--little", "early-exit:1"]) == 0
    assert f"prepared {llama_dir} in" in capsys.readouterr().out
    assert main(["prepare", "--big", str(tmp_path / "missing.gguf")]) == 2
    assert "error: model file not found" in capsys.readouterr().err


def test_cli_config_file_supplies_defaults_and_flags_win(llama_dir, tmp_path, capsys):
    import json

    config = tmp_path / "tuned.json"
    config.write_text(json.dumps({"policy": "speculative", "max_new_tokens": 3, "gamma": 2}))
    assert main(["generate", "hi", "--big", llama_dir, "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stats"]["policy"] == "speculative" and len(report["token_ids"]) == 3
    assert main(["generate", "hi", "--big", llama_dir, "--config", str(config), "--json",
                 "--max-new-tokens", "5"]) == 0
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 5
    config.write_text(json.dumps({"fallbak": 0.5}))
    assert main(["generate", "hi", "--big", llama_dir, "--config", str(config)]) == 2
    assert "unknown settings: fallbak" in capsys.readouterr().err
