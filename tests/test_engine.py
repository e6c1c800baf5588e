"""Caches, rollback, early exits, stopping rules, streaming and prompts."""

from __future__ import annotations

import pytest
import torch

from bild import BigLittle, BildError
from bild.cache import make_runner
from bild.models import early_exit
from conftest import tiny_llama, tiny_t5

POLICIES = ["ar", "speculative", "bild"]


@pytest.mark.parametrize("make,engine", [(tiny_llama, "hf"), (tiny_llama, "native"), (tiny_t5, "hf")])
def test_rollback_then_continue_matches_fresh_forward(make, engine):
    model = make(0)
    tokens = [1, 10, 20, 30, 40, 50, 60, 70]
    runner = make_runner(model, engine)
    seq = runner.start([1, 5, 6])
    full = seq + tokens
    runner.forward(full[:4], keep=1)
    runner.forward(full[4:], keep=1)       # cache everything
    runner.crop(6)                          # roll back the last tokens
    rolled = runner.forward([90, 91, 92], keep=3)
    fresh_runner = make_runner(model, engine)
    fresh_runner.start([1, 5, 6])
    fresh = fresh_runner.forward(full[:6] + [90, 91, 92], keep=3)
    assert runner.length == 9
    torch.testing.assert_close(rolled, fresh, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("engine", ["hf", "native"])
def test_crop_never_grows(engine):
    runner = make_runner(tiny_llama(0), engine)
    runner.start([1, 2, 3])
    runner.forward([1, 2, 3])
    runner.crop(10)
    assert runner.length == 3


@pytest.mark.parametrize("make,n", [(tiny_llama, 1), (tiny_t5, 1)])
def test_early_exit_shares_weights_and_equals_truncated_model(make, n):
    big = make(0, layers=3)
    little = early_exit(big, n)
    shared = {p.data_ptr() for p in big.parameters()}
    assert all(p.data_ptr() in shared for p in little.parameters())
    truncated = make(0, layers=3)
    layers = truncated.model.layers if hasattr(truncated, "model") else truncated.decoder.block
    del layers[n:]
    for cfg_name in ("num_hidden_layers", "num_decoder_layers"):
        if hasattr(truncated.config, cfg_name):
            setattr(truncated.config, cfg_name, n)
    a, b = make_runner(little), make_runner(truncated)
    a.start([1, 5, 6]), b.start([1, 5, 6])
    ids = [1, 5, 6] if not big.config.is_encoder_decoder else [0, 7, 8]
    torch.testing.assert_close(a.forward(ids, keep=3), b.forward(ids, keep=3))
    assert len(big.model.layers if hasattr(big, "model") else big.decoder.block) == 3  # big is untouched


def test_native_early_exit_shares_the_big_runners_weights(tok):
    big = tiny_llama(0, layers=3)
    bl = BigLittle(big, early_exit(big, 1), tok, engine="native")
    assert bl.little_runner.model.layers[0] is bl.big_runner.model.layers[0]
    assert bl.little_runner.model.embed is bl.big_runner.model.embed
    assert bl.little_runner.model.config.n_layers == 1


def test_engines_agree_and_unknown_engine_is_an_error(llama_pair, tok):
    hf = BigLittle(*llama_pair, tok, engine="hf").generate([1, 7, 8], policy="speculative", max_new_tokens=20)
    nat = BigLittle(*llama_pair, tok, engine="native").generate([1, 7, 8], policy="speculative", max_new_tokens=20)
    assert hf.token_ids == nat.token_ids
    with pytest.raises(BildError, match="unknown engine 'fast'"):
        BigLittle(*llama_pair, tok, engine="fast")
    with pytest.raises(BildError, match="native engine does not handle T5ForConditionalGeneration"):
        BigLittle(tiny_t5(0), tiny_t5(1), tok, engine="native")


@pytest.fixture(scope="module")
def bl(llama_pair, tok):
    return BigLittle(*llama_pair, tok)


def eos_prone_pair(tok):
    """A pair whose big model emits EOS early for some prompts."""
    big = tiny_llama(5)
    with torch.no_grad():
        big.lm_head.weight[2] *= 6.0
    return BigLittle(big, big, tok)


def test_eos_ends_generation_identically(tok):
    bl = eos_prone_pair(tok)
    ended = 0
    for start in range(3, 40):
        ar = bl.generate([1, start], policy="ar", max_new_tokens=30)
        for policy in POLICIES[1:]:
            res = bl.generate([1, start], policy=policy, max_new_tokens=30, fallback=0.0, rollback=0.0)
            assert res.token_ids == ar.token_ids and res.finish_reason == ar.finish_reason
        if ar.finish_reason == "stop":
            ended += 1
            assert ar.token_ids[-1] == 2 and 2 not in ar.token_ids[:-1]
    assert ended > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_max_new_tokens_is_exact(bl, policy):
    res = bl.generate([1, 7], policy=policy, max_new_tokens=13, fallback=0.0)
    assert len(res.token_ids) == 13 == res.stats.new_tokens and res.finish_reason == "length"


def test_stop_string_stops_every_policy_at_the_same_token(bl):
    ar = bl.generate([1, 7, 8], policy="ar", max_new_tokens=30)
    stop = ar.text[10:13]
    cut = ar.text.index(stop)
    for policy in POLICIES:
        res = bl.generate([1, 7, 8], policy=policy, max_new_tokens=30, stop=[stop], fallback=0.0, rollback=0.0)
        assert res.text == ar.text[:cut] and res.finish_reason == "stop"
        assert res.token_ids == ar.token_ids[: len(res.token_ids)]
        assert stop in bl.tokenizer.decode(res.token_ids) and stop not in bl.tokenizer.decode(res.token_ids[:-1])


@pytest.mark.parametrize("policy", POLICIES)
def test_stream_pieces_join_to_the_text(bl, policy):
    ar = bl.generate([1, 7, 8], policy="ar", max_new_tokens=30)
    stop = ar.text[20:22]
    stream = bl.stream([1, 7, 8], policy=policy, max_new_tokens=30, stop=[stop], fallback=0.0, rollback=0.0)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == stream.result.text == ar.text[: ar.text.index(stop)]


def test_string_and_chat_prompts(bl, tok):
    assert bl.encode("ab") == tok("ab").input_ids == [tok.convert_tokens_to_ids(c) for c in "ab"]
    chat = bl.encode([{"role": "user", "content": "hi"}])
    assert tok.decode(chat, skip_special_tokens=True) == "[user]hi>"
    res = bl.generate([{"role": "user", "content": "hi"}], policy="speculative", max_new_tokens=5)
    assert res.stats.prompt_tokens == len(chat) and len(res.token_ids) == 5


def test_encoder_decoder_prompt_is_the_encoder_input(t5_pair, tok):
    bl = BigLittle(*t5_pair, tok)
    a = bl.generate("abc", policy="ar", max_new_tokens=8).token_ids
    b = bl.generate("xyz", policy="ar", max_new_tokens=8).token_ids
    assert a != b and bl.generate("abc", policy="bild", rollback=0.0, max_new_tokens=8).token_ids == a


def test_stats_add_up(bl):
    res = bl.generate([1, 7, 8], policy="speculative", gamma=4, fallback=0.0, max_new_tokens=20)
    s = res.stats
    assert s.big_calls - 1 == len(s.accepted) == len(s.drafted)  # first big call: the prompt alone, as under ar
    assert sum(s.accepted) + s.big_calls == s.new_tokens == 20
    assert s.seconds > 0 and s.tokens_per_s > 0
    assert all(a <= d <= 4 for a, d in zip(s.accepted, s.drafted))


def test_cancel_event_stops_the_stream_after_the_current_round(bl):
    import threading

    cancel = threading.Event()
    stream = bl.stream([1, 7, 8], policy="ar", max_new_tokens=50, cancel=cancel)
    for _ in stream:
        cancel.set()
    assert stream.result.finish_reason == "cancelled" and len(stream.result.token_ids) == 1


@pytest.mark.parametrize("engine", ["hf", "native"])
def test_reduced_vocabulary_draft_is_lossless_and_native_matches_hf(engine, llama_pair, tok):
    from bild.drafts import recipe as D

    big = llama_pair[0]
    kept = torch.arange(3, 60)  # a 57-token head: the draft can never propose the other 39 tokens
    little = D.build_draft(big, D.DraftRecipe(n_layers=1, init="first"), kept)
    hf, nat = make_runner(little, "hf"), make_runner(little, "native")
    for r in (hf, nat):
        r.start([1, 5, 6])
    a, b = hf.forward([1, 5, 6, 7], keep=4), nat.forward([1, 5, 6, 7], keep=4)
    outside = torch.ones(a.shape[-1], dtype=torch.bool)
    outside[kept] = False
    assert torch.isneginf(b[:, outside]).all()
    torch.testing.assert_close(a[:, kept], b[:, kept], atol=1e-4, rtol=1e-4)
    bl = BigLittle(big, little, tok, engine=engine)
    for start in range(3, 13):
        ar = bl.generate([1, start], policy="ar", max_new_tokens=16).token_ids
        assert bl.generate([1, start], policy="speculative", fallback=0.0, max_new_tokens=16).token_ids == ar


def test_a_saved_draft_directory_loads_as_the_little_model(llama_pair, tmp_path):
    from bild.drafts import recipe as D
    from bild.models import describe_little, load_little

    big = llama_pair[0]
    recipe = D.DraftRecipe(n_layers=1, init="first")
    D.save_draft(D.build_draft(big, recipe), big, recipe, str(tmp_path))
    little = load_little(str(tmp_path), big)
    assert little.model.embed_tokens is big.model.embed_tokens  # referenced, not copied
    assert describe_little(str(tmp_path)).startswith("trained draft")
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(BildError, match="could not load the draft"):
        load_little(str(tmp_path), big)
