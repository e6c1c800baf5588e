"""Little models made from a GGUF file without new weights: a reduced-vocabulary head, kept layers, their directory
format, and the ranking of the head's ids (bild.drafts.gguf, bild.native.reduced_head/keep_layers,
bild.training.vocab)."""

from __future__ import annotations

import json

import pytest
import torch
from test_gguf import IDS, LIKE_0_5B, VOCAB, native_logits, tiny_qwen2, write_gguf

from bild import BigLittle, BildError, native
from bild.drafts import gguf as gguf_little
from bild.native import gguf as G
from bild.training import vocab

KEPT = torch.tensor([2, 5, 8, 19, 40, 64, 77, 100, 250, 300, 319])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("little-files")
    write_gguf(tiny_qwen2(0), d / "big.gguf")
    write_gguf(tiny_qwen2(1, layers=3, tied=True), d / "little.gguf", types=LIKE_0_5B)
    return d


@pytest.mark.parametrize("int8", [False, True])
def test_a_reduced_head_keeps_the_kept_logits_bitwise_and_masks_the_rest(files, int8):
    model = G.load(str(files / "little.gguf"), int8=int8)
    full = native_logits(model, IDS)
    reduced = native_logits(native.reduced_head(model, KEPT[torch.randperm(len(KEPT))]), IDS)  # any order
    assert torch.equal(reduced[:, KEPT], full[:, KEPT])
    rest = torch.ones(VOCAB, dtype=torch.bool)
    rest[KEPT] = False
    assert torch.isneginf(reduced[:, rest]).all()
    assert native.streamed_bytes(native.reduced_head(model, KEPT)) < native.streamed_bytes(model)


def test_reduced_head_and_kept_layers_refuse_bad_ids(files):
    model = G.load(str(files / "little.gguf"))
    for bad in ([], [0, 0], [-1], [VOCAB]):
        with pytest.raises(ValueError, match="distinct token ids"):
            native.reduced_head(model, torch.tensor(bad, dtype=torch.long))
    with pytest.raises(ValueError, match="already reduced"):
        native.reduced_head(native.reduced_head(model, KEPT), KEPT)
    for bad in ([], [0, 0], [2, 1], [3]):
        with pytest.raises(ValueError, match="kept layers"):
            native.keep_layers(model, bad)


def test_kept_layers_are_those_layers(files):
    model = G.load(str(files / "little.gguf"))
    assert torch.equal(native_logits(native.keep_layers(model, [0, 1, 2]), IDS), native_logits(model, IDS))
    assert torch.equal(native_logits(native.keep_layers(model, [0, 1]), IDS),
                       native_logits(native.early_exit(model, 2), IDS))
    assert native.keep_layers(model, [0, 2]).config.n_layers == 2


def test_greedy_decoding_with_a_reduced_head_little_equals_ar(files, tmp_path, tok):
    d = tmp_path / "little"
    gguf_little.save(str(d), gguf_little.GGUFLittle(model=str(files / "little.gguf"), vocab_size=len(KEPT), layers=[0, 2]), KEPT.tolist())
    big = native.NativeRunner(G.load(str(files / "big.gguf")))
    from bild.api import gguf_little_runner
    little, path = gguf_little_runner(str(d), big, int8=True)
    assert path == str(files / "little.gguf") and little.model.head_ids is not None
    assert not isinstance(little, gguf_little.PromptHeadRunner)
    assert little.model.config.n_layers == 2
    bl = BigLittle.from_runners(big, little, tok, {2}, "reduced")
    ar = bl.generate([1, 7, 8], policy="ar", max_new_tokens=24)
    for policy in ("speculative", "bild"):
        out = bl.generate([1, 7, 8], policy=policy, max_new_tokens=24, rollback=0.0)
        assert out.token_ids == ar.token_ids
    proposals = bl.generate([1, 7, 8], policy="little", max_new_tokens=12).token_ids
    assert set(proposals) <= set(KEPT.tolist())  # the little model proposes kept tokens only


def test_a_head_that_takes_the_prompts_tokens_is_rebuilt_per_prompt_and_stays_lossless(files, tmp_path, tok):
    d = tmp_path / "prompt-head"
    gguf_little.save(str(d), gguf_little.GGUFLittle(model=str(files / "little.gguf"), vocab_size=len(KEPT), prompt_tokens=True),
                     KEPT.tolist())
    little = gguf_little.load(str(d))
    big = native.NativeRunner(G.load(str(files / "big.gguf")))
    bl = BigLittle.from_runners(big, little, tok, {2}, "prompt head")
    for prompt in ([1, 7, 8], [3, 9, 11, 12]):
        ar = bl.generate(prompt, policy="ar", max_new_tokens=16)
        assert bl.generate(prompt, policy="speculative", max_new_tokens=16).token_ids == ar.token_ids
        assert little.model.head_ids.tolist() == sorted(set(KEPT.tolist()) | set(prompt))
        full = native.NativeRunner(G.load(str(files / "little.gguf")))
        full.start(prompt)
        little.start(prompt)
        mine = little.forward(prompt, keep=len(prompt))
        assert torch.equal(mine[:, little.model.head_ids], full.forward(prompt, keep=len(prompt))[:, little.model.head_ids])


def test_little_directories_round_trip_and_refuse_bad_ones(files, tmp_path):
    d = tmp_path / "ok"
    recipe = gguf_little.GGUFLittle(model=str(files / "little.gguf"), vocab_size=4, metrics={"alpha": 0.9})
    gguf_little.save(str(d), recipe, [300, 5, 2, 77, 8, 19])
    assert gguf_little.is_gguf_little(str(d)) and not gguf_little.is_gguf_little(str(tmp_path))
    assert gguf_little.read(str(d)) == recipe
    assert gguf_little.kept_ids(str(d), recipe).tolist() == [2, 5, 77, 300]  # the first 4 ranked, sorted
    assert "4 of its tokens" in recipe.describe() and "0.90" in recipe.describe()
    with pytest.raises(ValueError, match="ranked ids"):
        gguf_little.save(str(tmp_path / "short"), recipe, [1, 2])
    with pytest.raises(BildError, match="vocab_size must be >= 1"):
        gguf_little.GGUFLittle(model="x", vocab_size=0)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / gguf_little.RECIPE_FILE).write_text("{not json")
    with pytest.raises(BildError, match="not a readable little model recipe"):
        gguf_little.read(str(bad))
    (bad / gguf_little.RECIPE_FILE).write_text(json.dumps({"model": str(files / "little.gguf"), "vocab_size": 9}))
    (bad / gguf_little.VOCAB_FILE).write_text(json.dumps([1, 2, 3]))
    with pytest.raises(BildError, match="fewer than vocab_size 9"):
        gguf_little.load(str(bad))
    (bad / gguf_little.RECIPE_FILE).write_text(json.dumps({"model": str(files / "little.gguf"), "layers": [7]}))
    with pytest.raises(BildError, match="kept layers"):
        gguf_little.load(str(bad))


def test_ranking_puts_always_then_emitted_then_text_then_id():
    ranked = vocab.rank([[5, 5, 3], [3, 5, 9]], text=[7, 7, 4, 9], vocab_size=10, always=[2, 2])
    assert ranked == [2, 5, 3, 9, 7, 4, 0, 1, 6, 8]
    assert vocab.coverage([[5, 5, 3], [3, 5, 9]], ranked, [1, 2, 3, 4]) == {1: 0.0, 2: 0.5, 3: 5 / 6, 4: 1.0}


def test_big_outputs_are_cut_at_eos_and_cached(files, tmp_path, monkeypatch, tok):
    model = G.load(str(files / "big.gguf"))
    prompts = [("a", [1, 7, 8]), ("b", [4, 5, 6, 9])]
    path = str(tmp_path / "outputs.jsonl")
    first = vocab.big_outputs(model, list, prompts, path, 12, eos={2}, stop=2, batch=2, log=lambda s: None)
    for pid, ids in prompts:  # each row is what greedy decoding of that prompt alone gives
        alone = BigLittle.from_runners(native.NativeRunner(model), native.NativeRunner(model), tok, {2})
        expect = alone.generate(ids, policy="ar", max_new_tokens=12).token_ids
        assert first[[p for p, _ in prompts].index(pid)] == expect
    monkeypatch.setattr(native, "greedy_batch", None)  # a rerun decodes nothing
    assert vocab.big_outputs(model, list, prompts, path, 12, eos={2}, stop=2, log=lambda s: None) == first


def test_the_little_sweep_measures_every_little_side_by_side(files, tmp_path, tok):
    from bild.bench import littles
    from bild.bench.datasets import Item
    d = tmp_path / "reduced"
    gguf_little.save(str(d), gguf_little.GGUFLittle(model=str(files / "little.gguf"), vocab_size=len(KEPT)), KEPT.tolist())
    big = native.NativeRunner(G.load(str(files / "big.gguf")))
    from bild.api import gguf_little_runner
    bls = {}
    for name, spec in (("plain", str(files / "little.gguf")), ("reduced", str(d)), ("exit", "early-exit:1")):
        runner, path = gguf_little_runner(spec, big, int8=True)
        bls[name] = BigLittle.from_runners(big, runner, tok, {2}, name, None, path)
    items = [Item("a", [1, 7, 8]), Item("b", [4, 5, 6, 9])]
    rows = littles.sweep(bls, items, gamma=3, max_new_tokens=10, log=lambda s: None)
    assert [r["design"] for r in rows] == ["plain", "reduced", "exit"]
    assert all(r["identical"] for r in rows)  # greedy speculative equals ar on every prompt
    by = {r["design"]: r for r in rows}
    assert by["reduced"]["head_tokens"] == len(KEPT) and by["plain"]["head_tokens"] == VOCAB
    assert by["reduced"]["bytes_per_token"] < by["plain"]["bytes_per_token"]
    assert by["exit"]["layers"] == 1
    for r in rows:
        assert 0 <= r["alpha"] <= 1 and len(r["alpha_by_position"]) <= 3 and r["tokens_per_call"] >= 1
        need, ref = r["alpha_needed"], rows[0]["predicted_speedup"]  # the α at which r's costs predict ref
        predicted = lambda a: littles.D.predicted_speedup(a, 3, r["c"], r["verify_ratio"])  # noqa: E731
        assert need is None or predicted(need) >= ref - 1e-9 and (need < 1e-6 or predicted(need - 1e-6) < ref)
    text = littles.markdown(rows)
    assert by["reduced"]["head_coverage"] <= 1 and "head_coverage" not in by["plain"]
    assert "| reduced |" in text and "identical to ar: plain yes, reduced yes, exit yes" in text


def test_block_influence_ranks_a_layer_that_does_nothing_last(files):
    import dataclasses

    from bild.training import layers
    model = G.load(str(files / "big.gguf"), int8=False)  # float32 weights
    idle = model.layers[1]  # adds nothing to the residual stream: its input is its output
    model.layers[1] = dataclasses.replace(idle, wo=torch.zeros_like(idle.wo), w2=torch.zeros_like(idle.w2), fused=None)
    influence = layers.block_influence(model, [IDS, IDS[:5]])
    assert len(influence) == 2 and influence[1] < 1e-9 < influence[0]
    assert layers.most_influential(influence, 1) == [0]
    assert layers.most_influential([0.3, 0.1, 0.2], 2) == [0, 2]
    with pytest.raises(ValueError, match="keep 1..3"):
        layers.most_influential([0.3, 0.1, 0.2], 4)


def test_the_shipped_coder_little_is_the_pairs_default_and_its_ids_are_sound():
    from bild import models
    path = models.default_little("qwen2.5-coder-1.5b")
    assert path.endswith("drafts/qwen2.5-coder-1.5b") and gguf_little.is_gguf_little(path)
    recipe = gguf_little.read(path)
    assert recipe.model == "qwen2.5-coder-0.5b" and recipe.prompt_tokens and recipe.layers is None
    ids = gguf_little.kept_ids(path, recipe)
    assert len(ids) == recipe.vocab_size and len(set(ids.tolist())) == len(ids) and 0 <= ids.min() <= ids.max() < 151936
    assert {151643, 151644, 151645} <= set(ids.tolist())  # <|endoftext|>, <|im_start|>, <|im_end|>
    assert models.default_little("smollm2-135m").endswith("drafts/smollm2-135m")  # its trained draft, as before


def test_draft_layers_writes_early_exits_of_any_file_with_the_big_models_ranked_head(files, tmp_path):
    """`bild draft layers --select first`: directories of the first N layers (an early exit, here of the big
    file), whose head takes the ranked ids of any head of that size in the vocab directory."""
    from bild.cli import main
    vocab_dir = tmp_path / "vocab"
    gguf_little.save(str(vocab_dir / "other-little-vocab4"), gguf_little.GGUFLittle(model="x", vocab_size=4),
                     [300, 5, 2, 77])
    (vocab_dir / "big_outputs.jsonl").write_text(json.dumps({"id": "a", "tokens": [5, 2, 77]}) + "\n")
    big = str(files / "big.gguf")
    out = tmp_path / "layers"
    assert main(["draft", "layers", str(out), "--from", str(vocab_dir), "--little", big, "--keep", "1,2",
                 "--select", "first", "--vocab", "4", "--no-prompt-tokens"]) == 0
    one = gguf_little.read(str(out / "big-first1-vocab4"))
    assert one.layers == [0] and one.vocab_size == 4 and one.model == big and not one.prompt_tokens
    assert gguf_little.kept_ids(str(out / "big-first2-vocab4"), one).tolist() == [2, 5, 77, 300]
    assert gguf_little.load(str(out / "big-first2-vocab4")).model.config.n_layers == 2
    assert main(["draft", "layers", str(out), "--from", str(vocab_dir), "--little", big, "--keep", "3",
                 "--select", "first"]) == 2  # the tiny big file has 2 layers
    assert main(["draft", "layers", str(out), "--from", str(vocab_dir), "--little", big, "--keep", "1",
                 "--vocab", "8"]) == 2  # no head of 8 tokens
