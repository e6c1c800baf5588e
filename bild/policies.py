"""Decoding policies: small pure functions over logits and probabilities.

Notation, used everywhere in bild (as in Leviathan et al. and the BiLD paper):
    p  the big (target) model's next-token distribution
    q  the little (draft) model's next-token distribution
Rows are positions: p[i] is the big model's distribution for the token at draft position i.

Each model has two views of a distribution:
    probs(logits)  its soft distribution under the sampling settings: softmax(logits / τ) with top-k and
                   top-p applied (τ = temperature, or 1 when greedy). Confidence and rollback read this.
    target(probs)  what the model actually samples from: `probs` itself, or the one-hot argmax when greedy.
Speculative verification compares target(p) with target(q). A greedy draft is therefore checked against
its one-hot choice, never against its full softmax, and q is never taken from raw logits.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .config import GenerationConfig


def probs(logits: Tensor, cfg: GenerationConfig) -> Tensor:
    """(T, V) logits -> (T, V) probabilities after temperature, top-k and top-p."""
    logits = logits.float()
    # shift before dividing: (logits - max) / τ stays in [-inf, 0], so even a tiny τ cannot overflow; a τ below
    # float32's smallest normal would become 0 in the division (0 / 0 = NaN at the max), so it is raised to it
    logits = logits - logits.amax(dim=-1, keepdim=True)
    if not cfg.greedy:
        logits = logits / max(cfg.temperature, torch.finfo(torch.float32).tiny)
    if not cfg.greedy and cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]  # (T, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    out = torch.softmax(logits, dim=-1)
    if not cfg.greedy and cfg.top_p is not None and cfg.top_p < 1:
        out = _top_p(out, cfg.top_p)
    return out


def _top_p(pr: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p, renormalised."""
    sorted_pr, order = torch.sort(pr, dim=-1, descending=True)   # (T, V)
    mass_before = torch.cumsum(sorted_pr, dim=-1) - sorted_pr     # (T, V)
    drop_sorted = mass_before >= top_p
    drop_sorted[..., 0] = False  # the top token always stays, however small top_p is
    drop = torch.zeros_like(pr, dtype=torch.bool).scatter(-1, order, drop_sorted)
    pr = pr.masked_fill(drop, 0.0)
    return pr / pr.sum(dim=-1, keepdim=True)


def target(pr: Tensor, cfg: GenerationConfig) -> Tensor:
    """The distribution a model samples from: one-hot argmax when greedy, else pr itself."""
    if not cfg.greedy:
        return pr
    return torch.zeros_like(pr).scatter_(-1, argmax(pr), 1.0)  # one-hot, in pr's dtype


def argmax(x: Tensor) -> Tensor:
    """x.argmax(-1, keepdim=True), the first maximum on ties, computed by NumPy: torch's CPU argmax is not
    vectorised and took about 70 µs on one 49,152-entry row on this CPU, NumPy's about 7 (it runs on every token)."""
    return torch.from_numpy(np.argmax(x.detach().float().numpy(), axis=-1, keepdims=True))  # (..., 1) int64


def sample(pr: Tensor, gen: torch.Generator | None) -> int:
    """One token from a (V,) distribution; argmax when there is no generator (greedy)."""
    if gen is None:
        return int(argmax(pr))
    return int(torch.multinomial(pr, 1, generator=gen))


def speculative_accept(p: Tensor, q: Tensor, drafts: Tensor, gen: torch.Generator | None) -> tuple[int, int]:
    """Lossless rejection sampling (Leviathan et al., Chen et al.).

    p: (k+1, V) target(p) at the k draft positions and the one after; q: (k, V) target(q); drafts: (k,).
    Accept draft i with probability min(1, p[i, x] / q[i, x]); at the first rejection sample from
    norm(max(p[i] - q[i], 0)); if all k are accepted, sample a bonus token from p[k].
    Returns (number of drafts accepted, the next token). Greedy (gen None) reduces to prefix matching.
    """
    k = drafts.numel()
    idx = torch.arange(k)
    ratio = p[idx, drafts] / q[idx, drafts]                               # (k,)
    u = torch.rand(k, generator=gen) if gen is not None else torch.zeros(k)
    rejected = torch.nonzero(u >= ratio).flatten()
    if rejected.numel() == 0:
        return k, sample(p[k], gen)
    i = int(rejected[0])
    residual = (p[i] - q[i]).clamp_min(0)
    if residual.sum() <= 0:  # p[i] == q[i] up to rounding: nothing to correct
        residual = p[i]
    return i, sample(residual / residual.sum(), gen)


def bild_rollback(p: Tensor, p_target: Tensor, drafts: Tensor, threshold: float,
                  gen: torch.Generator | None) -> tuple[int, int, bool]:
    """BiLD's rollback policy.

    p: (k+1, V) the big model's soft distributions; p_target: (k+1, V) what it samples from; drafts: (k,).
    A little token x_i is suspect when −log p[i, x_i] > threshold (α_RB). At the first suspect position where
    the big model's own choice y ~ p_target[i] differs from x_i, drop x_i and everything after it and put y
    there. (Where y equals x_i the big model agrees, so nothing is rolled back.) Otherwise keep all drafts and
    append the big model's next token. Returns (drafts kept, next token, rolled back?).
    With threshold 0 every little token is re-chosen by the big model: output equals the big model's.
    """
    k = drafts.numel()
    nll = -torch.log(p[torch.arange(k), drafts])                          # (k,)
    for i in torch.nonzero(nll > threshold).flatten().tolist():
        y = sample(p_target[i], gen)
        if y != int(drafts[i]):
            return i, y, True
    return k, sample(p_target[k], gen), False


def next_gamma(gamma: int, accepted: int, drafted: int, max_gamma: int = 32) -> int:
    """Adaptive draft length, as in transformers' heuristic: +2 after a fully accepted draft, else −1."""
    if drafted > 0 and accepted == drafted:
        return min(gamma + 2, max_gamma)
    return max(gamma - 1, 1)
