"""Fast tests of draft building, saving, the ShareGPT reader, the split and training, on tiny random models."""

import json

import pytest
import torch

from bild import data
from bild.drafts import recipe as D
from bild.training import evaluate, losses, teacher, trainer

VOCAB = 96


@pytest.fixture(scope="module")
def big():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _examples(big, n=12, length=20, seed=0):
    """Aligned examples from the tiny big model itself (its greedy token is the label, as in real data)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (length,), generator=g)
        with torch.no_grad():
            logits = big(input_ids=ids[None]).logits[0]                  # (L, V)
        start = 5
        topv, topi = logits[start:-1].topk(8, dim=-1)
        out.append({"ids": ids, "start": start, "topv": topv.half(), "topi": topi.int()})
    return out


def _forward(model, ids, k):
    from transformers import DynamicCache
    return model(input_ids=ids, cache=DynamicCache(), use_cache=True, logits_to_keep=k).logits


@pytest.mark.parametrize("kind", ["shallow", "early_exit"])
def test_build_save_load_references_big(big, kind, tmp_path):
    recipe = D.DraftRecipe(kind=kind, big="tiny", n_layers=2, init="spread")
    little = D.build_draft(big, recipe)
    assert little.model.embed_tokens.weight.data_ptr() == big.model.embed_tokens.weight.data_ptr()
    assert little.lm_head is big.lm_head and little.model.rotary_emb is big.model.rotary_emb
    with torch.no_grad():
        for p in D.trainable_parameters(little, big):
            p.add_(0.01 * torch.randn_like(p))
    D.save_draft(little, big, recipe, str(tmp_path))
    assert D.is_draft_dir(str(tmp_path)) and not D.is_draft_dir(str(tmp_path / "nope"))
    saved = json.load(open(tmp_path / D.RECIPE_FILE))
    assert saved["kind"] == kind
    from safetensors.torch import load_file
    names = set(load_file(str(tmp_path / D.WEIGHTS_FILE)))
    assert not any("embed_tokens" in n or "lm_head" in n for n in names)
    if kind == "early_exit":   # shared big layers are not saved
        assert not any(n.startswith(("model.layers.0.", "model.layers.1.")) for n in names)
    loaded = D.load_draft(str(tmp_path), big)
    assert loaded.model.embed_tokens.weight.data_ptr() == big.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, VOCAB, (1, 7))
    out = _forward(loaded, ids, 3)
    assert out.shape == (1, 3, VOCAB)
    torch.testing.assert_close(out, _forward(little, ids, 3))


def test_layer_choice():
    assert D.resolve_layers(D.DraftRecipe(n_layers=2, init="spread"), 30) == [0, 29]
    assert D.resolve_layers(D.DraftRecipe(n_layers=3, init="first"), 30) == [0, 1, 2]
    assert D.resolve_layers(D.DraftRecipe(kind="early_exit", n_layers=4), 30) == [0, 1, 2, 3]


def test_reduced_vocab_head_zero_outside(big, tmp_path):
    kept = D.frequent_tokens([torch.tensor([5, 5, 5, 7, 7, 9, 11])], n=3, always=[2])
    assert kept.tolist() == [2, 5, 7]
    recipe = D.DraftRecipe(n_layers=1, init="first")
    little = D.build_draft(big, recipe, kept)
    probs = torch.softmax(_forward(little, torch.randint(0, VOCAB, (1, 6)), 6), -1)   # (1, 6, V)
    outside = torch.ones(VOCAB, dtype=torch.bool)
    outside[kept] = False
    assert probs[..., outside].abs().max() == 0
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 6))
    D.save_draft(little, big, recipe, str(tmp_path))
    assert D.load_draft(str(tmp_path), big).lm_head.kept.tolist() == [2, 5, 7]


def test_sharegpt_reader_truncated(tmp_path):
    records = [{"id": f"c{i}_0", "conversations": [{"from": "human", "value": f"q{i}"},
                                                 {"from": "gpt", "value": "a"}]} for i in range(5)]
    text = json.dumps(records + [{"not": "a record"}], indent=2)
    cut = text[: text.index('"q4"') + 2]              # the file ends inside the fifth record
    path = tmp_path / "sharegpt.json"
    path.write_text(cut)
    report = data.ReadReport()
    got = list(data.iter_sharegpt(str(path), report))
    assert [r["id"] for r in got] == ["c0_0", "c1_0", "c2_0", "c3_0"]
    assert report.whole == 4 and report.truncated_bytes > 0
    whole = tmp_path / "whole.json"
    whole.write_text(text)
    report = data.ReadReport()
    assert len(list(data.iter_sharegpt(str(whole), report))) == 5 and report.malformed == 1


def test_split_deterministic_and_disjoint():
    ids = [f"conv{i}_{j}" for i in range(2000) for j in range(2)]
    first = [data.is_heldout(i) for i in ids]
    assert first == [data.is_heldout(i) for i in ids]
    held = {i.rsplit("_", 1)[0] for i, h in zip(ids, first) if h}
    cal = {i.rsplit("_", 1)[0] for i, h in zip(ids, first) if not h}
    assert held and cal and not held & cal             # parts of one conversation stay on one side
    assert 0.02 < len(held) / 2000 < 0.09


def test_later_turns_are_calibration_prompts_only(tmp_path):
    long = "please explain the second point in much more detail"
    held = next(f"h{i}" for i in range(10_000) if data.is_heldout(f"h{i}_0"))
    turns = [{"from": "human", "value": "first question"}, {"from": "gpt", "value": "an answer"},
             {"from": "human", "value": "continue"}, {"from": "gpt", "value": "more"},
             {"from": "human", "value": long}]
    records = [{"id": f"c{i}_0", "conversations": turns} for i in range(3) if not data.is_heldout(f"c{i}_0")]
    records.append({"id": f"{held}_0", "conversations": turns})
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(records))
    later = data.calibration_prompts(path=str(path), turns="later")
    assert later == [[{"role": "user", "content": long}]] * (len(records) - 1)  # "continue" is too short
    assert data.calibration_prompts(path=str(path))[0] == [{"role": "user", "content": "first question"}]
    assert len(data.heldout_prompts(path=str(path))) == 1
    with pytest.raises(ValueError, match="turns"):
        data.calibration_prompts(path=str(path), turns="all")


def test_teacher_caches_read_together_and_turns_checked(tmp_path):
    for d, n in (("a", 2), ("b", 1)):
        (tmp_path / d).mkdir()
        for s in range(n):
            torch.save([{"shard": f"{d}{s}"}], tmp_path / d / f"shard_{s:04d}.pt")
    both = f"{tmp_path / 'a'},{tmp_path / 'b'}"
    assert [e["shard"] for e in teacher.load_teacher_cache(both)] == ["a0", "a1", "b0"]
    assert [e["shard"] for e in teacher.load_teacher_cache(both, max_shards=2)] == ["a0", "a1"]
    with pytest.raises(ValueError, match="turns"):
        teacher.TeacherConfig("unused", split="heldout", turns="later")
    with pytest.raises(ValueError, match="turns"):
        teacher.TeacherConfig("unused", turns="every")


def _train_cfg(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path), lr=3e-3, warmup_steps=1, batch_size=4, max_minutes=5,
                eval_every_minutes=100, ckpt_every_minutes=100, threads=1, autocast=False)
    return trainer.TrainConfig(**{**base, **kw})


def test_training_reduces_loss(big, tmp_path):
    little = D.build_draft(big, D.DraftRecipe(n_layers=1, init="first"))
    examples = _examples(big)
    batch = losses.pad_batch(examples, 0)

    def loss():
        with torch.no_grad():
            logits = losses.student_logits(little, batch["ids"], batch["positions"])
            return losses.topk_kd_loss(logits, batch["topv"], batch["topi"], batch["topi"][:, 0], None, 1, 1)[0].item()
    before = loss()
    trainer.train(little, big, _train_cfg(tmp_path, max_steps=15), examples=examples)
    assert loss() < before
    assert any(json.loads(line).get("event") == "step" for line in open(tmp_path / "log.jsonl"))


def test_checkpoint_resume_continues(big, tmp_path):
    examples, heldout = _examples(big), _examples(big, n=4, seed=1)
    little = D.build_draft(big, D.DraftRecipe(n_layers=1, init="first"))
    state = trainer.train(little, big, _train_cfg(tmp_path, max_steps=3), examples=examples, heldout=heldout)
    assert state.step == 3 and (tmp_path / "ckpt.pt").exists()
    fresh = D.build_draft(big, D.DraftRecipe(n_layers=1, init="first"))
    state = trainer.train(fresh, big, _train_cfg(tmp_path, max_steps=5, autocast=True), examples=examples,
                    heldout=heldout)
    assert state.step == 5
    starts = [json.loads(line) for line in open(tmp_path / "log.jsonl") if '"start"' in line]
    assert [s["step"] for s in starts] == [0, 3]


def test_text_kd_with_reduced_head_trains(big, tmp_path):
    kept = torch.arange(0, VOCAB, 2)
    little = D.build_draft(big, D.DraftRecipe(n_layers=1, init="first"), kept)
    g = torch.Generator().manual_seed(0)
    batches = lambda step: torch.randint(0, VOCAB, (2, 12), generator=g)  # noqa: E731
    state = trainer.train(little, big, _train_cfg(tmp_path, max_steps=4, autocast=True), text_batches=batches)
    assert state.step == 4 and state.tokens == 4 * 2 * 11
    alpha = evaluate.agreement(little, _examples(big, n=3), pad_id=0)["alpha"]
    assert 0.0 <= alpha <= 1.0


def test_teacher_native_batched_equals_hf_loop(big):
    """The fast batched native teacher writes the same examples as the HF loop (fp32, mixed prompt lengths)."""
    from types import SimpleNamespace
    tokenizer = SimpleNamespace(eos_token_id=2)
    prompts = [[5, 9, 3, 7, 11, 4], [8, 6], [40, 41, 42, 43]]
    hf_cfg = teacher.TeacherConfig("unused", max_new_tokens=7, top_k=4, engine="hf")
    nat_cfg = teacher.TeacherConfig("unused", max_new_tokens=7, top_k=4, engine="native", dtype=torch.float32)
    expected = teacher.generate_batch(big, tokenizer, prompts, hf_cfg)
    got = teacher.teacher_generator(big, tokenizer, nat_cfg)(prompts)
    for e, g in zip(expected, got):
        assert g["ids"].tolist() == e["ids"].tolist() and g["start"] == e["start"]
        assert g["topi"].tolist() == e["topi"].tolist()
        torch.testing.assert_close(g["topv"].float(), e["topv"].float(), atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="engine"):
        teacher.TeacherConfig("unused", engine="gpu")


def test_predicted_speedup_is_leviathans_formula():
    from bild.bench.designs import predicted_speedup
    assert predicted_speedup(0.0, 3, 0.1, 1.2) == pytest.approx(1 / 1.5)
    assert predicted_speedup(0.5, 3, 0.1, 1.2) == pytest.approx((1 - 0.5 ** 4) / 0.5 / 1.5)
    assert predicted_speedup(1.0, 3, 0.0, 1.0) == pytest.approx(4.0)
    assert predicted_speedup([0.5, 0.5, 0.5], 3, 0.1, 1.2) == pytest.approx(predicted_speedup(0.5, 3, 0.1, 1.2))
    assert predicted_speedup([0.6, 0.4], 3, 0.1, 1.2) == pytest.approx((1 + 0.6 + 0.24 + 0.096) / 1.5)  # last repeats


def test_alpha_needed_inverts_the_prediction():
    from bild.bench.designs import alpha_needed, predicted_speedup
    a = alpha_needed(1.3, 3, 0.1, 1.2)
    assert 0 < a < 1 and predicted_speedup(a, 3, 0.1, 1.2) == pytest.approx(1.3, abs=1e-9)
    assert alpha_needed(0.5, 3, 0.1, 1.2) == pytest.approx(0.0, abs=1e-9)  # reached with no draft kept at all
    ceiling = predicted_speedup(1.0, 3, 0.1, 1.2)  # 4 / 1.5: every draft kept
    assert alpha_needed(ceiling, 3, 0.1, 1.2) == pytest.approx(1.0, abs=1e-6)
    assert alpha_needed(ceiling + 0.01, 3, 0.1, 1.2) is None  # above it no little model helps


def test_design_sweep_measures_every_design(llama_dir, tmp_path):
    """Trained-draft directory and early exit, side by side: one full row each, markdown and JSON written."""
    from bild import models
    from bild.bench import designs as DS
    big, tokenizer = models.load(llama_dir, dtype=torch.float32)
    recipe = D.DraftRecipe(kind="shallow", big=llama_dir, n_layers=1, init="first")
    D.save_draft(D.build_draft(big, recipe), big, recipe, str(tmp_path / "d1"))
    heldout = teacher.generate_batch(big, tokenizer, [[5, 6, 7, 8], [9, 10]], teacher.TeacherConfig("unused", max_new_tokens=6,
                                                                                        top_k=4, engine="hf"))
    designs = DS.as_designs([f"one={tmp_path / 'd1'}", "early-exit:1"])
    assert [d.name for d in designs] == ["one", "early-exit:1"]
    rows = DS.sweep(llama_dir, designs, heldout, ["hello world", "abc"], gamma=2, max_new_tokens=6)
    assert [r["design"] for r in rows] == ["one", "early-exit:1"]
    for r in rows:
        assert 0 <= r["alpha"] <= 1 and r["c"] > 0 and r["verify_ratio"] > 0 and r["tokens_per_call"] >= 1
        assert r["spec_speedup"] > 0 and r["bild_speedup"] > 0 and r["predicted_speedup"] > 0
    assert rows[0]["unique"] > 0 and rows[1]["unique"] == 0
    DS.write(rows, str(tmp_path / "out"), {"prompts": 2, "max_new_tokens": 6})
    lines = (tmp_path / "out" / "designs.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in lines) == 3  # header + one row per design
    assert len(json.load(open(tmp_path / "out" / "designs.json"))["rows"]) == 2
