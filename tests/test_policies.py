"""The policy functions on hand-made distributions."""

from __future__ import annotations

import math

import torch

from bild.config import GenerationConfig
from bild.policies import argmax, bild_rollback, next_gamma, probs, sample, target

LOGITS = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])  # (1, V)


def test_probs_applies_temperature_top_k_and_top_p():
    pr = probs(LOGITS, GenerationConfig(temperature=0.5))
    torch.testing.assert_close(pr, torch.softmax(LOGITS / 0.5, -1))
    pr = probs(LOGITS, GenerationConfig(temperature=1.0, top_k=2))
    assert (pr[0, 2:] == 0).all() and math.isclose(float(pr.sum()), 1.0, rel_tol=1e-6)
    full = torch.softmax(LOGITS, -1)[0]
    pr = probs(LOGITS, GenerationConfig(temperature=1.0, top_p=float(full[0] + 0.01)))
    assert (pr[0, :2] > 0).all() and (pr[0, 2:] == 0).all()  # the smallest set reaching top_p


def test_extreme_settings_stay_finite():
    for cfg in (GenerationConfig(temperature=1e-38), GenerationConfig(temperature=1.0, top_p=1e-46),
                GenerationConfig(temperature=1e-30, top_k=1, top_p=1e-40),
                GenerationConfig(temperature=2.4e-260)):  # below float32's range: found by the server fuzz test
        pr = probs(LOGITS, cfg)
        assert torch.isfinite(pr).all() and float(pr[0, 0]) == 1.0


def test_greedy_target_is_one_hot_argmax():
    t = target(probs(LOGITS, GenerationConfig()), GenerationConfig())
    assert t.tolist() == [[1.0, 0.0, 0.0, 0.0, 0.0]]


def test_bild_rollback_finds_the_first_implausible_disagreement():
    cfg = GenerationConfig()
    p = torch.softmax(torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [5.0, 0, 0]]), -1)  # (k+1, V)
    pt = target(p, cfg)
    # draft 0 agrees, draft 1 disagrees with −log p ≈ 5.01 nats, draft 2 disagrees too
    kept, token, rolled = bild_rollback(p, pt, torch.tensor([0, 0, 1]), 5.0, None)
    assert (kept, token, rolled) == (1, 1, True)
    kept, token, rolled = bild_rollback(p, pt, torch.tensor([0, 0, 1]), 6.0, None)  # nothing is that implausible
    assert (kept, token, rolled) == (3, 0, False)
    kept, token, rolled = bild_rollback(p, pt, torch.tensor([0, 1, 2]), 0.0, None)  # full agreement
    assert (kept, token, rolled) == (3, 0, False)


def test_adaptive_gamma():
    assert next_gamma(5, 5, 5) == 7 and next_gamma(5, 2, 5) == 4 and next_gamma(1, 0, 1) == 1
    assert next_gamma(32, 32, 32) == 32


def test_argmax_is_torchs_first_maximum():
    g = torch.Generator().manual_seed(0)
    for shape in [(7,), (3, 49152), (2, 1, 5)]:
        for _ in range(20):
            x = torch.randint(0, 4, shape, generator=g).float()  # many ties
            x[..., -1] = float("-inf")
            assert torch.equal(argmax(x), x.argmax(-1, keepdim=True))
    x = torch.tensor([[0.5, 2.0, 2.0, -1.0]], dtype=torch.bfloat16)
    assert argmax(x).tolist() == [[1]] and sample(x[0], None) == 1
    assert target(x.float(), GenerationConfig()).tolist() == [[0.0, 1.0, 0.0, 0.0]]
