"""Losslessness: greedy equality with `ar`, self-drafting, and exact sampling distributions."""

from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import chisquare

from bild import BigLittle, native
from bild.config import GenerationConfig
from bild.policies import probs, speculative_accept, target
from conftest import fp16_params, gguf_params, perturbed, tiny_llama, tiny_t5


def random_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 96) for _ in range(rng.randrange(1, 12))] for _ in range(n)]


@pytest.fixture(scope="module", params=["llama-hf", "llama-native", "llama-native_fp16", "llama-native_blocks",
                                        "t5-hf"])
def pair(request, llama_pair, t5_pair, tok):
    return make_pair(request.param, llama_pair if request.param.startswith("llama") else t5_pair, tok)


def make_pair(name: str, models: tuple, tok) -> BigLittle:
    """arch-engine, where engine native_fp16 is the native engine with fp16 weights (fp32 activations) and
    native_blocks the native engine on weights that are GGUF blocks (bild/kernels)."""
    engine = name.split("-")[1]
    if engine == "native_fp16":
        engine, models = "native", tuple(fp16_params(m) for m in models)
    if engine == "native_blocks":
        engine, models = "native", tuple(gguf_params(m) for m in models)
    return BigLittle(*models, tok, engine=engine)


@pytest.fixture(scope="module")
def ar_outputs(pair):
    return [pair.generate(p, policy="ar", max_new_tokens=24).token_ids for p in random_prompts(50)]


@pytest.mark.parametrize("gamma", [1, 4, 8])
def test_greedy_speculative_equals_ar(pair, ar_outputs, gamma):
    accepted = 0
    for prompt, expected in zip(random_prompts(50), ar_outputs):
        res = pair.generate(prompt, policy="speculative", gamma=gamma, fallback=0.0, max_new_tokens=24)
        assert res.token_ids == expected
        accepted += sum(res.stats.accepted)
    assert accepted > 0  # the drafts were really used, not all rejected


def test_greedy_speculative_with_fallback_and_adaptive_gamma_equals_ar(pair, ar_outputs):
    for prompt, expected in zip(random_prompts(50), ar_outputs):
        res = pair.generate(prompt, policy="speculative", gamma=2, adaptive=True, fallback=0.6, max_new_tokens=24)
        assert res.token_ids == expected


def test_greedy_bild_with_zero_rollback_equals_ar(pair, ar_outputs):
    rollbacks = 0
    for prompt, expected in zip(random_prompts(50), ar_outputs):
        res = pair.generate(prompt, policy="bild", rollback=0.0, max_new_tokens=24)
        assert res.token_ids == expected
        rollbacks += res.stats.rollbacks
    assert rollbacks > 0  # disagreements did happen and were rolled back


def little_greedy(runner, prompt: list[int], prefix: list[int], n: int) -> list[int]:
    """The little model's own greedy continuation after prompt + generated prefix (decoder side for T5)."""
    logits, out = runner.forward(runner.start(prompt) + prefix), []
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = runner.forward(out[-1:])
    return out


def test_bild_without_rollback_keeps_every_little_token(pair):
    """fallback=0 and rollback=inf: after the big model's first token (the prompt's prefill, as under ar) the
    little model writes everything and the big model adds every 11th token."""
    res = pair.generate([1, 5, 6], policy="bild", fallback=0.0, rollback=float("inf"), max_new_tokens=23)
    assert res.token_ids[1:11] == little_greedy(pair.little_runner, [1, 5, 6], res.token_ids[:1], 10)
    assert res.stats.rollbacks == 0 and res.stats.fallbacks == 0
    assert res.stats.accepted == [10, 10]


@pytest.mark.parametrize("make,engine", [(tiny_llama, "hf"), (tiny_llama, "native"), (tiny_t5, "hf")])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_self_draft_accepts_every_draft(make, engine, temperature, tok):
    big = make(0)
    bl = BigLittle(big, big, tok, engine=engine)
    for prompt in random_prompts(5):
        res = bl.generate(prompt, policy="speculative", gamma=4, fallback=0.0, temperature=temperature,
                          seed=1, max_new_tokens=20)
        assert sum(res.stats.accepted) == sum(res.stats.drafted) > 0


def test_same_seed_same_sample(pair):
    kwargs = dict(policy="speculative", temperature=1.5, top_p=0.95, max_new_tokens=16)  # tiny models are peaked
    a = pair.generate([1, 9, 9], seed=7, **kwargs).token_ids
    assert a == pair.generate([1, 9, 9], seed=7, **kwargs).token_ids
    assert any(pair.generate([1, 9, 9], seed=s, **kwargs).token_ids != a for s in range(8, 12))


# ---- sampling is distribution-exact -------------------------------------------------------------

V_SMALL = 8
SAMPLING = dict(temperature=0.7, top_k=6, top_p=0.9)


@pytest.fixture(scope="module")
def small_pair(tok):
    big = tiny_llama(3, vocab=V_SMALL, head_scale=0.15)
    return big, perturbed(big, 0.4)


def exact_two_token_distribution(big, prompt: list[int]) -> torch.Tensor:
    """P(x1, x2) under the big model's processed distribution, as a (V, V) table."""
    cfg = GenerationConfig(**SAMPLING)
    with torch.no_grad():
        p1 = probs(big(torch.tensor([prompt])).logits[0, -1], cfg)  # (V,)
        seqs = torch.tensor([prompt + [x] for x in range(V_SMALL)])  # (V, T+1)
        p2 = probs(big(seqs).logits[:, -1], cfg)  # (V, V)
    return p1[:, None] * p2


def empirical(samples: list[tuple[int, int]]) -> torch.Tensor:
    counts = torch.zeros(V_SMALL, V_SMALL)
    for a, b in samples:
        counts[a, b] += 1
    return counts


def assert_matches(counts: torch.Tensor, expected: torch.Tensor) -> None:
    n = counts.sum()
    support = expected.flatten() > 0
    assert counts.flatten()[~support].sum() == 0, "sampled a token the big model gives zero probability"
    obs, exp = counts.flatten()[support], expected.flatten()[support] * n
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3
    assert 0.5 * (counts / n - expected).abs().sum() < 0.04  # total variation


@pytest.mark.parametrize("policy,extra,engine", [("speculative", dict(gamma=2, fallback=0.0), "hf"),
                                                 ("speculative", dict(gamma=3, fallback=0.5), "native"),
                                                 ("speculative", dict(gamma=3, fallback=0.0), "native_fp16"),
                                                 ("speculative", dict(gamma=3, fallback=0.0), "native_blocks"),
                                                 ("speculative", dict(gamma=3, fallback=0.0, lookup=2), "native"),
                                                 ("bild", dict(rollback=0.0, fallback=0.0), "native")])
def test_sampling_matches_big_distribution(small_pair, tok, policy, extra, engine):
    """Catches q taken from raw logits (transformers #47932): temperature, top-k and top-p reshape q here."""
    bl = make_pair(f"llama-{engine}", small_pair, tok)
    big = bl.big.float()  # the fp16 pair's reference: its own fp16-rounded weights, computed in fp32 (its runners are built)
    bl.eos_ids = set()  # token 2 is an ordinary token in this 8-token vocabulary
    prompt = [1, 4, 5]
    # three tokens, so that the second can come from a draft (the first is the prompt's prefill, as under ar)
    samples = [tuple(bl.generate(prompt, policy=policy, max_new_tokens=3, seed=s, **SAMPLING, **extra).token_ids[:2])
               for s in range(4000)]
    assert_matches(empirical(samples), exact_two_token_distribution(big, prompt))


def test_greedy_draft_is_verified_against_its_one_hot_choice():
    """Catches a greedy draft checked against its full softmax (transformers #32867).

    The draft picks argmax q; the rule must use q = one-hot(argmax). The test first shows it has the power to
    catch the bug: the buggy rule, with q = softmax, gives a visibly wrong distribution."""
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(2, V_SMALL), -1)            # (2, V) target(p), sampling
    q_soft = torch.softmax(torch.randn(1, V_SMALL) * 2, -1)   # (1, V) the draft's softmax
    draft = q_soft.argmax(-1)                                  # (1,) a greedy draft
    q_greedy = target(q_soft, GenerationConfig(temperature=0.0))

    def first_tokens(q, n=20000):
        gen = torch.Generator().manual_seed(1)
        out = torch.zeros(V_SMALL)
        for _ in range(n):
            kept, token = speculative_accept(p, q, draft, gen)
            out[int(draft[0]) if kept else token] += 1
        return out / n

    assert 0.5 * (first_tokens(q_greedy) - p[0]).abs().sum() < 0.02
    assert 0.5 * (first_tokens(q_soft) - p[0]).abs().sum() > 0.05  # the bug would be caught


def test_a_looked_up_draft_is_accepted_exactly():
    """A looked-up token has q = one-hot: accepting it with p[x] and else resampling from p without x gives p
    (the little model checks lookup proposals this way, so its kept tokens are distributed as its own)."""
    p = torch.tensor([[0.05, 0.4, 0.25, 0.3], [0.25, 0.25, 0.25, 0.25]])  # (k + 1, V), k = 1
    q = torch.tensor([[0.0, 0.0, 1.0, 0.0]])  # the looked-up token 2, proposed with certainty
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(20000):
        kept, token = speculative_accept(p, q, torch.tensor([2]), gen)
        counts[2 if kept else token] += 1
    assert chisquare(counts.numpy(), (p[0] * 20000).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("policy", ["speculative", "bild"])
def test_greedy_with_prompt_lookup_equals_ar(pair, policy):
    copied = 0
    for prompt in random_prompts(50):
        prompt = prompt + prompt  # a repeated prompt: lookup has something to copy
        expected = pair.generate(prompt, policy="ar", max_new_tokens=24).token_ids
        res = pair.generate(prompt, policy=policy, gamma=4, lookup=3, rollback=0.0, max_new_tokens=24)
        assert res.token_ids == expected
        copied += res.stats.lookup_drafted
        assert 0 <= res.stats.lookup_accepted <= res.stats.lookup_drafted
    assert copied > 0


def test_sampling_with_a_reduced_head_little_matches_big_distribution(small_pair, tok):
    """A little whose head lacks tokens has q = 0 there: those come only from the residual norm(max(p − q, 0))."""
    big, little = small_pair
    big_runner = native.NativeRunner.from_hf(big, dtype=torch.float32)
    with pytest.raises(ValueError, match="reduce it before packing"):
        native.reduced_head(native.from_hf(little, torch.float32, pack=True), torch.tensor([0, 1]))
    reduced = native.reduced_head(native.from_hf(little, torch.float32, pack=False), torch.tensor([0, 1, 3, 4, 6]))
    bl = BigLittle.from_runners(big_runner, native.NativeRunner(reduced), tok, set())
    prompt = [1, 4, 5]
    samples = [tuple(bl.generate(prompt, policy="speculative", max_new_tokens=3, seed=s, gamma=3, fallback=0.0,
                                 **SAMPLING).token_ids[:2]) for s in range(4000)]
    assert_matches(empirical(samples), exact_two_token_distribution(big, prompt))
