"""bild bench/sweep/tune: method specs, datasets, records and resume, metrics, Pareto fronts, budgets."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bild import BigLittle, BildError
from bild.bench import load_tuned
from bild.bench.datasets import load_items, read_jsonl_items
from bild.bench.methods import Method, hf_models, parse_method
from bild.bench.quality import (acceptance_by_position, corpus_bleu, extract_code, humaneval_completion,
                                humaneval_passed, nll_sum, perplexity, rouge_l)
from bild.bench.runner import RECORDS, read_records, run_bench, schedule
from bild.bench.summary import markdown, summarize
from bild.bench.sweep import choose, grid, parse_budget, pareto_front
from conftest import fp16_params

# --- method specs -----------------------------------------------------------------------------------------


def test_parse_method_specs():
    assert parse_method("ar") == Method("ar")
    assert parse_method("speculative:gamma=4").kwargs == {"gamma": 4}
    assert parse_method("speculative:adaptive").kwargs == {"adaptive": True}
    m = parse_method("bild:rollback=inf, fallback=0.5")
    assert m.kwargs == {"fallback": 0.5, "rollback": math.inf}
    assert m.label == "bild:fallback=0.5,rollback=inf"  # canonical order
    assert parse_method(m.label) == m
    assert parse_method("hf-prompt-lookup:prompt_lookup_num_tokens=3").kwargs == {"prompt_lookup_num_tokens": 3}


@pytest.mark.parametrize("spec, message", [
    ("beam", "unknown method"),
    ("bild:gamma=3", "no parameter 'gamma'"),
    ("speculative:gamma=2.5", "must be an integer"),
    ("bild:fallback=high", "must be a number"),
    ("bild:fallback=nan", "must be a number"),
    ("bild:fallback=1.5", "fallback must be in"),
    ("bild:fallback=0.5,fallback=0.6", "given twice"),
    ("speculative:", "empty parameter list"),
    ("speculative:gamma", "needs a value"),
    ("speculative:adaptive=maybe", "is a flag"),
    ("hf-generate:gamma=2", "parameters: none"),
])
def test_parse_method_errors(spec, message):
    with pytest.raises(BildError, match=message):
        parse_method(spec)


def test_tuned_config_fills_unset_parameters(tmp_path):
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"generate": {"policy": "bild", "fallback": 0.4, "rollback": 3.0}, "tuned": {}}))
    tuned = load_tuned(str(path))
    assert parse_method("bild").with_defaults(tuned).label == "bild:fallback=0.4,rollback=3"
    assert parse_method("bild:fallback=0.9").with_defaults(tuned).kwargs == {"fallback": 0.9, "rollback": 3.0}
    assert parse_method("ar").with_defaults(tuned) == Method("ar")
    path.write_text(json.dumps({"generate": {"temperature": 1.0}}))
    with pytest.raises(BildError, match="temperature"):
        load_tuned(str(path))


# --- datasets ---------------------------------------------------------------------------------------------


def test_read_jsonl_items(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "hello"}\n\n{"id": "x", "messages": [{"role": "user", "content": "hi"}]}\n')
    items = read_jsonl_items(str(path))
    assert [(i.id, i.prompt) for i in items] == [("0", "hello"), ("x", [{"role": "user", "content": "hi"}])]
    assert len(load_items(f"jsonl:{path}", limit=1)) == 1


@pytest.mark.parametrize("text, message", [
    ('{"prompt": "a"}\nnot json\n', "d.jsonl:2: not JSON"),
    ('{"text": "a"}\n', "needs a non-empty string"),
    ('{"messages": [{"content": "a"}]}\n', "needs a non-empty string"),
    ('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n', "duplicate id"),
    ("\n", "no prompts"),
])
def test_read_jsonl_errors(tmp_path, text, message):
    path = tmp_path / "d.jsonl"
    path.write_text(text)
    with pytest.raises(BildError, match=message):
        read_jsonl_items(str(path))


def test_unknown_dataset():
    with pytest.raises(BildError, match="unknown dataset"):
        load_items("squad")


# --- the loop: schedule, records, resume --------------------------------------------------------------------


def test_schedule_interleaves_methods_per_prompt_and_skips_done():
    assert schedule(["p0", "p1"], ["ar", "bild"], {("bild", "p0")}) == [("p0", "ar"), ("p1", "ar"), ("p1", "bild")]


@pytest.fixture(scope="module")
def pair_bl(llama_pair, tok):
    big, little = llama_pair
    return BigLittle(big, little, tok)


FIELDS = {"method", "params", "prompt_id", "prompt_tokens", "new_tokens", "seconds", "tokens_per_s", "big_calls",
          "little_calls", "fallbacks", "rollbacks", "accepted", "drafted", "finish_reason", "text", "token_ids",
          "big_nll", "passed", "time"}


def test_records_schema_order_and_resume(pair_bl, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(["abc", "xyz!", "hi"])))
    methods = [parse_method(s) for s in ("ar", "speculative:gamma=3", "bild:fallback=0.3", "hf-generate")]
    out = str(tmp_path / "run")
    records = run_bench(pair_bl, load_items(f"jsonl:{data}", 2), methods, out, 6, {"big": "tiny"}, progress=False)
    assert [(r["prompt_id"], r["method"]) for r in records] == [
        (p, m.label) for p in ("p0", "p1") for m in methods]
    for r in records:
        assert set(r) == FIELDS
        assert r["new_tokens"] == len(r["token_ids"]) > 0 and r["big_nll"] > 0 and r["passed"] is None
    spec = records[1]
    # one verification per round, plus the first big call: the prompt prefilled alone, as under ar
    assert spec["params"] == {"gamma": 3} and len(spec["accepted"]) == len(spec["drafted"]) == spec["big_calls"] - 1
    summary = summarize(records)
    assert summary["methods"]["speculative:gamma=3"]["identical_to_ar"] == 1.0  # greedy speculative is lossless
    assert summary["methods"]["ar"]["speedup_vs_ar"] == 1.0
    assert "| ar |" in markdown(summary)

    path = f"{out}/{RECORDS}"
    with open(path, "a") as f:
        f.write('{"method": "ar", "prompt_id": "p2", "tor')  # a kill mid-write
    assert read_records(path, repair=False) == records and open(path).read().endswith('"tor')
    again = run_bench(pair_bl, load_items(f"jsonl:{data}"), methods, out, 6, {"big": "tiny"}, progress=False,
                      warmup=False)
    assert again[:8] == records  # existing records kept, not re-run
    assert [(r["prompt_id"], r["method"]) for r in again[8:]] == [("p2", m.label) for m in methods]
    assert read_records(path) == again
    with pytest.raises(BildError, match="different settings"):
        run_bench(pair_bl, [], methods, out, 7, {"big": "tiny"}, progress=False)


def test_fp16_weights_bench_hf_baselines_in_fp32_on_the_same_rounded_weights(llama_pair, tok, tmp_path):
    bl = BigLittle(*(fp16_params(m) for m in llama_pair), tok, engine="native")
    assert bl.precision == "torch.float16 weights, torch.float32 activations"
    big, little = hf_models(bl)
    assert big.dtype == little.dtype == torch.float32 and hf_models(bl)[0] is big  # converted once
    assert torch.equal(big.lm_head.weight, bl.big.lm_head.weight.float())
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(["abc", "xyz!"])))
    methods = [parse_method(s) for s in ("ar", "speculative:gamma=3", "hf-generate", "hf-assisted")]
    records = run_bench(bl, load_items(f"jsonl:{data}"), methods, str(tmp_path / "run"), 8, {"big": "tiny"},
                        progress=False)
    by = {(r["prompt_id"], r["method"]): r for r in records}
    for p in ("p0", "p1"):  # the same function in fp32 maths: the same greedy tokens on these prompts
        assert {tuple(by[p, m.label]["token_ids"]) for m in methods} == {tuple(by[p, "ar"]["token_ids"])}
        assert by[p, "ar"]["big_nll"] > 0


# --- metrics ----------------------------------------------------------------------------------------------


def test_rouge_and_bleu_on_known_strings():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert rouge_l("the cat sat", "the dog sat") == pytest.approx(2 / 3)  # LCS "the sat": P = R = 2/3
    assert rouge_l("alpha beta", "gamma delta") == 0.0
    assert corpus_bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    assert corpus_bleu(["alpha beta gamma delta"], ["one two three four"]) == pytest.approx(0.0)
    assert 0 < corpus_bleu(["the cat sat on the red mat"], ["the cat sat on the mat"]) < 100


def test_perplexity_of_known_distributions():
    v = 7
    assert perplexity(nll_sum(torch.zeros(5, v), [0, 1, 2, 3, 4]), 5) == pytest.approx(v)  # uniform -> V
    logits = torch.tensor([0.5, 0.25, 0.25]).log().repeat(2, 1)  # (2, 3)
    assert nll_sum(logits, [0, 1]) == pytest.approx(math.log(2) + math.log(4))
    assert perplexity(nll_sum(logits, [0, 1]), 2) == pytest.approx(math.sqrt(8))
    assert math.isnan(perplexity(0.0, 0))


def test_acceptance_by_position():
    # two generations: rounds (kept, drafted) = (2 of 3), (0 of 2) and (1 of 1)
    assert acceptance_by_position([[2, 0], [1]], [[3, 2], [1]]) == [2 / 3, 1 / 2, 0.0]


def test_summary_speedup_identical_and_partial_prompts():
    def rec(method, pid, tps, ids, text):
        return {"method": method, "prompt_id": pid, "tokens_per_s": tps, "new_tokens": len(ids), "seconds": 1.0,
                "token_ids": ids, "text": text, "big_calls": len(ids), "accepted": None, "drafted": None,
                "big_nll": float(len(ids)), "passed": None}
    records = [rec("ar", "a", 2.0, [1, 2], "x y"), rec("bild", "a", 4.0, [1, 2], "x y"),
               rec("ar", "b", 2.0, [1], "x"), rec("bild", "b", 3.0, [3], "z"), rec("ar", "c", 9.0, [1], "x")]
    s = summarize(records)
    assert s["prompt_ids"] == ["a", "b"]  # c is not finished by bild
    row = s["methods"]["bild"]
    assert row["speedup_vs_ar"] == pytest.approx(3.5 / 2.0)
    assert row["identical_to_ar"] == 0.5
    assert row["rouge_l"] == pytest.approx(0.5)
    assert row["ppl"] == pytest.approx(math.e)
    assert row["speedup_vs_hf_generate"] is None


# --- sweeps, Pareto fronts, budgets -------------------------------------------------------------------------


def test_pareto_front():
    points = [(1.0, 0.5), (0.9, 1.2), (0.8, 1.1), (0.5, 2.0), (0.4, 1.9), (1.0, 0.4)]
    assert pareto_front(points) == [3, 1, 0]


def test_grid_has_ablations():
    labels = [m.label for m in grid([0.5, 0.9], [3.0], [2])]
    assert labels == ["ar", "bild:fallback=0.5,rollback=3", "bild:fallback=0.9,rollback=3",
                      "bild:fallback=0.5,rollback=inf", "bild:fallback=0.9,rollback=inf",
                      "bild:fallback=0,rollback=3", "speculative:gamma=2"]


def test_budgets_and_choice():
    assert parse_budget("rouge_l>=0.9").ok({"rouge_l": 0.95}, {})
    ppl = parse_budget("ppl<=+3%")
    assert ppl.relative and ppl.ok({"ppl": 10.2}, {"ppl": 10.0}) and not ppl.ok({"ppl": 10.4}, {"ppl": 10.0})
    assert parse_budget("identical >= 0.5").metric == "identical_to_ar"
    for bad, message in [("rouge_l<=0.9", "lower bound"), ("ppl>=3", "upper bound"), ("speed>=2", "unknown"),
                         ("rouge_l>=90%", "for ppl and pass@1, not rouge_l"), ("rouge_l>0.9", "cannot parse"),
                         ("ppl<=+3", "written ppl<=\\+N%"), ("pass@1>=-1%", "written pass@1>=-Npt"),
                         ("pass@1<=0.5", "lower bound")]:
        with pytest.raises(BildError, match=message):
            parse_budget(bad)
    points = parse_budget("pass@1>=-1pt")  # at most one point (of 100) below ar's pass@1
    assert str(points) == "pass@1>=-1pt" and points.metric == "pass_at_1"
    assert points.ok({"pass_at_1": 0.5}, {"pass_at_1": 0.505}) and not points.ok({"pass_at_1": 0.49}, {"pass_at_1": 0.505})
    assert parse_budget("pass@1>=0.6").ok({"pass_at_1": 0.6}, {}) and not parse_budget("pass@1>=0.6").relative
    rows = {"ar": {"rouge_l": 1.0, "speedup_vs_ar": 1.0, "ppl": 5.0},
            "bild:fallback=0.9,rollback=2": {"rouge_l": 0.97, "speedup_vs_ar": 1.2},
            "bild:fallback=0.5,rollback=5": {"rouge_l": 0.85, "speedup_vs_ar": 1.9},
            "speculative:gamma=4": {"rouge_l": 1.0, "speedup_vs_ar": 1.5}}
    assert choose(rows, parse_budget("rouge_l>=0.9")) == "bild:fallback=0.9,rollback=2"
    assert choose(rows, parse_budget("rouge_l>=0.99")) is None


# --- HumanEval --------------------------------------------------------------------------------------------

PROBLEM = {"task_id": "t/0", "entry_point": "add", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n",
           "test": "def check(f):\n    assert f(1, 2) == 3\n"}


def test_humaneval_completion_extraction():
    assert extract_code("Sure:\n```python\nx = 1\n```\nDone.") == "x = 1\n"
    assert extract_code("```py\ny = 2\n") == "y = 2\n"  # cut off before the closing fence
    assert humaneval_completion("```python\ndef add(a, b):\n    return a + b\n```", PROBLEM).startswith("\ndef add")
    assert humaneval_completion("    return a + b\n", PROBLEM) == "    return a + b\n"


def test_humaneval_pass_at_1_runs_the_tests():
    assert humaneval_passed(PROBLEM, "```python\ndef add(a, b):\n    return a + b\n```", timeout=5)
    assert not humaneval_passed(PROBLEM, "    return a - b\n", timeout=5)


# --- the commands, end to end on a tiny model ---------------------------------------------------------------


def _jsonl(tmp_path, prompts):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def test_sweep_command_writes_records_summary_and_plot(llama_dir, tmp_path):
    from bild.cli import main

    out = tmp_path / "sweep"
    argv = ["sweep", "--big", llama_dir, "--little", "early-exit:1", "--engine", "hf", "--dataset",
            f"jsonl:{_jsonl(tmp_path, ['abc', 'hello'])}", "--max-new-tokens", "4", "-o", str(out),
            "--fallback", "0.5", "--rollback", "3", "--gamma", "2", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["methods"]) == ["ar", "bild:fallback=0.5,rollback=3", "bild:fallback=0.5,rollback=inf",
                                        "bild:fallback=0,rollback=3", "speculative:gamma=2"]
    assert (out / "pareto.png").stat().st_size > 0 and (out / "commands.txt").exists()


def test_tune_command_uses_calibration_prompts_and_writes_config(llama_dir, tmp_path, monkeypatch):
    from bild.bench import datasets
    from bild.cli import main

    seen = []

    def fake_items(spec, limit=None):
        seen.append(spec)
        return [datasets.Item("c0", "abc"), datasets.Item("c1", "hello")]

    monkeypatch.setattr(datasets, "load_items", fake_items)
    out, config = tmp_path / "tune", tmp_path / "tuned.json"
    argv = ["tune", "--big", llama_dir, "--little", "early-exit:1", "--engine", "hf", "--max-new-tokens", "4",
            "-o", str(out), "--fallback", "0,0.99", "--rollback", "0,50", "--budget", "rouge_l>=0",
            "--write", str(config), "--no-progress"]
    assert main(argv) == 0
    assert seen == ["sharegpt-calibration"]
    tuned = json.loads(config.read_text())
    assert tuned["generate"]["policy"] == "bild" and set(tuned["generate"]) == {"policy", "fallback", "rollback"}
    assert tuned["tuned"]["budget"] == "rouge_l>=0"
    assert main(argv[:-5] + ["--budget", "rouge_l>=1.01", "--write", str(config), "--no-progress"]) == 1
    pair = tmp_path / "pair.json"  # a pair's file keeps its other settings; only the tuned ones change
    pair.write_text(json.dumps({"generate": {"lookup": 3, "fallback": 0.1}}))
    again = [str(tmp_path / "tune-he") if a == str(out) else a for a in argv[:-2]]
    assert main(again + [str(pair), "--no-progress", "--dataset", "humaneval-calibration"]) == 0
    assert seen[-1] == "humaneval-calibration"
    tuned = json.loads(pair.read_text())
    assert tuned["generate"]["lookup"] == 3 and tuned["generate"]["fallback"] in (0, 0.99)
    with pytest.raises(SystemExit):  # tuning never reads a held-out set
        main(argv + ["--dataset", "humaneval-heldout"])


def test_llamacpp_is_skipped_with_a_message_when_missing(monkeypatch):
    from types import SimpleNamespace

    from bild.bench import methods

    pair = SimpleNamespace(big=None, big_file="/x/big.gguf", little_file=None)
    monkeypatch.setattr(methods, "llamacpp_bin", lambda: None)
    assert "benchmarks/llamacpp.sh" in methods.available(parse_method("llamacpp"), pair)
    assert methods.available(parse_method("ar"), pair) is None
    assert "transformers model" in methods.available(parse_method("hf-generate"), pair)
    monkeypatch.setattr(methods, "llamacpp_bin", lambda: "/x/bin")
    assert methods.available(parse_method("llamacpp"), pair) is None
    assert "big and little model as a GGUF file" in methods.available(parse_method("llamacpp-spec"), pair)


def test_llamacpp_timing_lines_parse():
    """Lines as llama.cpp 0.3.36's tools print them (llama-completion, llama-speculative-simple)."""
    from bild.bench.methods import SPEC, TIMING

    completion = ("0.44.155.166 I common_perf_print: prompt eval time =    2289.80 ms /    38 tokens (   60.26 ms per "
                  "token,    16.60 tokens per second)\n0.44.155.181 I common_perf_print:        eval time =   39800.06 ms"
                  " /    63 runs   (  631.75 ms per token,     1.58 tokens per second)\n")
    assert TIMING.findall(completion) == [("prompt eval", "2289.80", "38"), ("eval", "39800.06", "63")]
    spec = ("0.05.270.023 I encoded   38 tokens in    0.558 seconds, speed:   68.161 t/s\n"
            "0.05.270.024 I decoded   36 tokens in    1.879 seconds, speed:   19.156 t/s\n")
    assert SPEC.findall(spec) == [("encoded", "38", "0.558"), ("decoded", "36", "1.879")]
