"""Feature drafts (EAGLE-style, bild/drafts/feature.py): lossless decoding, the native forward matches the trained
module, provisional cache entries are re-read after verification, training and saving work, misuse fails clearly."""

from __future__ import annotations

import pytest
import torch

from bild import BigLittle, BildError
from bild import native
from bild.drafts.recipe import DraftRecipe, build_draft, load_draft, save_draft, trainable_parameters
from bild.drafts.feature import FeatureDraft, FeatureRunner, shifted
from bild.drafts.feature import to_native as feature_to_native
from bild.training.evaluate import agreement
from bild.training.teacher import TeacherConfig, teacher_generator
from bild.training.trainer import TrainConfig, param_groups, train
from conftest import tiny_llama
from test_lossless import (SAMPLING, assert_matches, empirical, exact_two_token_distribution, random_prompts)


@pytest.fixture(scope="module")
def big():
    return tiny_llama(0, layers=2)


def teacher_examples(big, tok, tmp, n: int, seed: int, features: bool = True) -> list[dict]:
    generate = teacher_generator(big, tok, TeacherConfig(out_dir=str(tmp), max_new_tokens=16, top_k=16,
                                                         features=features, dtype=torch.float32))
    return generate(random_prompts(n, seed=seed))


def train_tiny(big, tok, tmp, draft_steps: int = 1):
    """A feature draft trained for a few seconds on the tiny big model's own greedy outputs and features."""
    examples, heldout = teacher_examples(big, tok, tmp, 96, seed=11), teacher_examples(big, tok, tmp, 16, seed=12)
    (tmp / "heldout").mkdir()
    torch.save(heldout, tmp / "heldout" / "shard_0000.pt")
    recipe = DraftRecipe(kind="feature", n_layers=1)
    torch.manual_seed(0)
    draft = build_draft(big, recipe)
    save_draft(draft, big, recipe, str(tmp / "run" / "draft_init"))  # the layout `bild draft export` reads
    before = agreement(draft, heldout, pad_id=0)["alpha"]
    train(draft, big, TrainConfig(out_dir=str(tmp / "run"), lr=3e-3, max_steps=600, batch_size=8, warmup_steps=5,
                                  autocast=False, threads=1, max_minutes=5, eval_every_minutes=100,
                                  draft_steps=draft_steps), examples=examples, heldout=heldout, pad_id=0)
    return draft, before, agreement(draft, heldout, pad_id=0), tmp


@pytest.fixture(scope="module")
def trained(big, tok, tmp_path_factory):
    draft, before, after, tmp = train_tiny(big, tok, tmp_path_factory.mktemp("feature-draft"))
    return draft, before, after["alpha"], tmp


def test_training_raises_held_out_agreement(trained):
    _, before, after, _ = trained
    assert after > before + 0.2 and after > 0.5


def test_unrolled_training_raises_the_later_draft_tokens_agreement(big, tok, trained, tmp_path):
    """draft_steps = 3 trains the 2nd and 3rd draft tokens on the draft's own features (FeatureDraft.unroll):
    their held-out agreement rises above the plain run's, and the best checkpoint is chosen by accept_est."""
    plain = agreement(trained[0], torch.load(trained[3] / "heldout" / "shard_0000.pt"), pad_id=0)
    _, _, unrolled, tmp = train_tiny(big, tok, tmp_path, draft_steps=3)
    assert unrolled["alpha_by_step"][2] > plain["alpha_by_step"][2] + 0.05
    assert unrolled["accept_est"] > plain["accept_est"]
    state = torch.load(tmp / "run" / "best.pt", weights_only=False)["state"]
    assert state["best_key"] == "accept_est" and state["best_score"] == pytest.approx(unrolled["accept_est"])


def test_draft_steps_are_refused_for_drafts_without_features(big, tok, tmp_path):
    with pytest.raises(ValueError, match="draft_steps"):
        TrainConfig(out_dir=str(tmp_path), draft_steps=0)
    shallow = build_draft(big, DraftRecipe(n_layers=1))
    with pytest.raises(ValueError, match="feature drafts only"):
        train(shallow, big, TrainConfig(out_dir=str(tmp_path), draft_steps=2, max_steps=1, autocast=False, threads=1),
              examples=teacher_examples(big, tok, tmp_path, 2, seed=3, features=False), pad_id=0)


def test_export_measures_the_best_checkpoint_on_the_native_engine(big, trained, tok):
    from bild.cli.draft import export
    draft, _, after, tmp = trained
    metrics = export(big, tok, str(tmp / "run"), str(tmp / "exported"), str(tmp / "heldout"))
    assert metrics["alpha"] == pytest.approx(after)  # training ends with an evaluation that saves the best
    assert metrics["speed_engine"].startswith("native") and metrics["draft_ms_per_token"] > 0
    assert isinstance(load_draft(str(tmp / "exported"), big), FeatureDraft)


@pytest.fixture(scope="module")
def pair(big, trained, tok):
    return BigLittle(big, trained[0], tok, engine="native")


@pytest.fixture(scope="module")
def ar_outputs(pair):
    return [pair.generate(p, policy="ar", max_new_tokens=24).token_ids for p in random_prompts(40)]


@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_greedy_speculative_equals_ar(pair, ar_outputs, gamma):
    accepted = drafted = 0
    for prompt, expected in zip(random_prompts(40), ar_outputs):
        res = pair.generate(prompt, policy="speculative", gamma=gamma, fallback=0.0, max_new_tokens=24)
        assert res.token_ids == expected
        accepted, drafted = accepted + sum(res.stats.accepted), drafted + sum(res.stats.drafted)
    assert accepted > 0  # the drafts were really used, not all rejected


def test_greedy_bild_with_zero_rollback_equals_ar(pair, ar_outputs):
    for prompt, expected in zip(random_prompts(40), ar_outputs):
        assert pair.generate(prompt, policy="bild", rollback=0.0, max_new_tokens=24).token_ids == expected


@pytest.mark.parametrize("policy,extra", [("speculative", dict(gamma=3, fallback=0.0)),
                                          ("bild", dict(rollback=0.0, fallback=0.0))])
def test_sampling_matches_big_distribution(tok, policy, extra):
    big = tiny_llama(3, vocab=8, head_scale=0.15)
    bl = BigLittle(big, build_draft(big, DraftRecipe(kind="feature", n_layers=1)), tok, engine="native")
    bl.eos_ids = set()  # token 2 is an ordinary token in this 8-token vocabulary
    prompt = [1, 4, 5]
    samples = [tuple(bl.generate(prompt, policy=policy, max_new_tokens=2, seed=s, **SAMPLING, **extra).token_ids)
               for s in range(4000)]
    assert_matches(empirical(samples), exact_two_token_distribution(big, prompt))


def test_native_forward_matches_the_trained_module(big, trained):
    """Runner logits over a prompt (big-model features) equal the module's on the same inputs (fp32)."""
    draft = trained[0]
    big_runner = native.NativeRunner.from_hf(big, dtype=torch.float32)
    little = FeatureRunner.attach(draft, big_runner)
    prompt = [1, 7, 9, 30, 4, 55, 6]
    big_runner.start(prompt)
    big_runner.forward(prompt)
    little.start(prompt)
    got = little.forward(prompt, keep=len(prompt))  # (T, V)
    feats = big_runner.features[:len(prompt)].unsqueeze(0)  # (1, T, dim)
    with torch.no_grad():
        want = draft.logits(draft(torch.tensor([prompt]), shifted(feats)))[0]  # (T, V)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_entries_built_from_own_features_are_reread_after_verification(big, trained):
    """Drafting ahead uses the draft's own f̂; after the big model verifies those positions, crop drops them and
    the next forward re-reads them with the big model's features: logits equal a fresh runner's."""
    big_runner = native.NativeRunner.from_hf(big, dtype=torch.float32)
    little = FeatureRunner.attach(trained[0], big_runner)
    prompt, drafts = [1, 7, 9, 30], [40, 41, 42]
    big_runner.start(prompt)
    little.start(prompt)
    big_runner.forward(prompt)
    little.forward(prompt + drafts[:1])
    for t in drafts[1:]:
        little.forward([t])  # ahead of the big model: own features
    assert little.exact == len(prompt) + 1
    big_runner.forward(drafts)  # verification over the drafts
    little.crop(len(prompt) + len(drafts))
    assert little.length == len(prompt) + 1
    after = little.forward(drafts[1:] + [43])  # (1, V)

    fresh_big = native.NativeRunner.from_hf(big, dtype=torch.float32)
    fresh = FeatureRunner.attach(trained[0], fresh_big)
    fresh_big.start(prompt)
    fresh_big.forward(prompt + drafts)
    fresh.start(prompt)
    torch.testing.assert_close(after, fresh.forward(prompt + drafts + [43]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_unroll_pass_n_is_the_runners_nth_draft_token(big, layers):
    """Training's unroll (FeatureDraft.unroll) computes, at every position t and pass n, what the runner computes
    for the n-th draft token of a round that starts at t - n + 1: big-model features up to there, own f̂ after."""
    torch.manual_seed(3)
    draft = build_draft(big, DraftRecipe(kind="feature", n_layers=layers))
    with torch.no_grad():
        for p in draft.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)  # off the pass-through start, so own f̂ differs from f
    ids = [1, 7, 9, 30, 4, 55, 6, 12]
    big_runner = native.NativeRunner.from_hf(big, dtype=torch.float32)
    big_runner.record_features()
    big_runner.start(ids)
    big_runner.forward(ids)
    feats = big_runner.features[:len(ids)].unsqueeze(0)  # (1, T, dim)
    with torch.no_grad():
        passes = draft.unroll(torch.tensor([ids]), shifted(feats), 3)  # 3 x (1, T, dim)
    steps = [draft.logits(f)[0] for f in passes]  # 3 x (T, V)
    for start in range(1, len(ids) - 2):
        runner = FeatureRunner(feature_to_native(draft, big_runner.model), big_runner)
        big_runner.length = start  # the big model has run over positions < start
        runner.start(ids)
        got = [runner.forward(ids[:start + 1])[0]]  # the round's first draft token reads the big model's f_{start-1}
        for n in (1, 2):
            got.append(runner.forward([ids[start + n]])[0])  # then the draft's own f̂
        for n, logits in enumerate(got):
            torch.testing.assert_close(logits, steps[n][start + n], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(steps[0], steps[1], atol=1e-3)  # the passes do differ


def test_save_and_load_round_trip(big, trained, tmp_path):
    draft = trained[0]
    save_draft(draft, big, DraftRecipe(kind="feature", n_layers=1, init_layers=[1]), str(tmp_path))
    loaded = load_draft(str(tmp_path), big)
    assert isinstance(loaded, FeatureDraft)
    for (name, a), b in zip(draft.named_parameters(), loaded.parameters()):
        assert torch.equal(a, b), name


def test_feature_draft_cannot_decode_alone_or_without_the_native_engine(big, trained, tok, pair):
    with pytest.raises(BildError, match="cannot decode alone"):
        pair.generate([1, 5, 6], policy="little", max_new_tokens=4)
    with pytest.raises(BildError, match="native engine"):
        BigLittle(big, trained[0], tok, engine="hf")


def test_running_ahead_by_more_than_one_token_is_refused(big, trained):
    big_runner = native.NativeRunner.from_hf(big, dtype=torch.float32)
    little = FeatureRunner.attach(trained[0], big_runner)
    big_runner.start([1, 5])
    big_runner.forward([1, 5])
    little.start([1, 5])
    little.forward([1, 5, 9])  # position 2 reads f_1, which the big model has
    with pytest.raises(BildError, match="one token at a time"):
        little.forward([10, 11])  # position 4 would need f̂_3, not computed yet


def test_initialised_from_a_shallow_draft_it_computes_that_drafts_logits(big, tmp_path):
    """fc = [I; 0]: whatever the features, the feature draft starts as the shallow draft (module and native runner),
    so training starts from the shallow draft's agreement."""
    from bild.cli.draft import build_from_shallow
    shallow = build_draft(big, DraftRecipe(kind="shallow", n_layers=2, init="first"))
    with torch.no_grad():
        for p in shallow.model.layers.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # a "trained" draft that differs from the big model's layers
    save_draft(shallow, big, DraftRecipe(kind="shallow", n_layers=2, init="first"), str(tmp_path / "shallow"))
    draft, recipe = build_from_shallow(big, DraftRecipe(kind="feature"), str(tmp_path / "shallow"),
                                       str(tmp_path / "feature"))
    assert recipe.n_layers == 2 and recipe.init_draft == str(tmp_path / "shallow")
    ids = torch.tensor([[1, 7, 9, 30, 4, 55]])
    with torch.no_grad():
        want = shallow(input_ids=ids).logits[0]  # (T, V)
        got = draft.logits(draft(ids, torch.randn(1, 6, big.config.hidden_size)))[0]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    big_runner = native.NativeRunner.from_hf(big, dtype=torch.float32)
    little = FeatureRunner.attach(load_draft(str(tmp_path / "feature"), big), big_runner)
    big_runner.start(ids[0].tolist())
    big_runner.forward(ids[0].tolist())
    little.start(ids[0].tolist())
    torch.testing.assert_close(little.forward(ids[0].tolist(), keep=6), want, atol=1e-4, rtol=1e-4)


def test_text_teacher_gives_the_big_models_predictions_and_features(big):
    """Text caches: one prefill per chunk; targets are the big model's top-k at every position (not the text's
    next token), features are its final normed hidden states."""
    from bild.training.teacher import text_teacher
    chunk = [1, 7, 9, 30, 4, 55, 6, 21]
    (example,) = text_teacher(big, TeacherConfig(out_dir="unused", top_k=3, features=True, dtype=torch.float32,
                                                 source="text", max_prompt_tokens=16))([chunk])
    runner = native.NativeRunner.from_hf(big, dtype=torch.float32)
    runner.record_features()
    runner.start(chunk)
    logits = runner.forward(chunk, keep=len(chunk))  # (T, V)
    assert example["start"] == 0 and example["ids"].tolist() == chunk
    assert example["topi"].shape == (len(chunk) - 1, 3)
    assert example["topi"][:, 0].tolist() == logits[:-1].argmax(-1).tolist()
    torch.testing.assert_close(example["feats"], runner.features[:len(chunk) - 1].bfloat16())


def test_aligned_teacher_features_match_single_sequence_decoding(big, tok, tmp_path):
    """Batched greedy teacher (rows of different lengths): features of prompt and continuation equal those of
    one sequence run alone (fp32, up to batched-attention rounding)."""
    examples = teacher_examples(big, tok, tmp_path, 3, seed=21)
    runner = native.NativeRunner.from_hf(big, dtype=torch.float32)
    runner.record_features()
    for e in examples:
        ids = e["ids"].tolist()
        runner.start(ids)
        runner.forward(ids[:-1])
        assert e["feats"].shape == (len(ids) - 1, big.config.hidden_size)
        torch.testing.assert_close(e["feats"].float(), runner.features[:len(ids) - 1].bfloat16().float())


def test_teacher_config_refuses_what_only_the_native_engine_makes():
    for kwargs in (dict(features=True), dict(source="text")):
        with pytest.raises(ValueError, match="native engine"):
            TeacherConfig(out_dir="unused", engine="hf", **kwargs)
    with pytest.raises(ValueError, match="aligned or text"):
        TeacherConfig(out_dir="unused", source="web")


def test_teacher_caches_without_features_are_refused_clearly(big, trained, tok, tmp_path):
    with pytest.raises(BildError, match="--features"):
        agreement(trained[0], teacher_examples(big, tok, tmp_path, 2, seed=31, features=False), pad_id=0)


def test_fc_learning_rate_scale_gives_the_fc_its_own_group(big, tok, tmp_path):
    draft = build_draft(big, DraftRecipe(kind="feature", n_layers=1))
    params = trainable_parameters(draft, big)
    rest, fc = param_groups(draft, params, TrainConfig(out_dir=str(tmp_path), fc_lr_scale=0.01))
    assert {id(p) for p in fc["params"]} == {id(p) for p in draft.fc.parameters()} and fc["lr_scale"] == 0.01
    assert len(rest["params"]) + len(fc["params"]) == len(params)
    assert param_groups(draft, params, TrainConfig(out_dir=str(tmp_path))) == [{"params": params}]
    with pytest.raises(ValueError, match="fc_lr_scale"):
        TrainConfig(out_dir=str(tmp_path), fc_lr_scale=0.0)
    shallow = build_draft(big, DraftRecipe(n_layers=1))
    with pytest.raises(ValueError, match="feature drafts only"):
        param_groups(shallow, trainable_parameters(shallow, big), TrainConfig(out_dir=str(tmp_path), fc_lr_scale=0.1))
    examples = teacher_examples(big, tok, tmp_path, 8, seed=3)
    train(draft, big, TrainConfig(out_dir=str(tmp_path / "run"), lr=1e-3, fc_lr_scale=0.01, max_steps=2,
                                  warmup_steps=1, autocast=False, threads=1, max_minutes=5), examples=examples,
          pad_id=0)
    groups = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-5])
