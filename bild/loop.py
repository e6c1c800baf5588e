"""The decoding loop: the only code that mutates decoding state.

State is the token sequence `seq` plus each runner's cache length. Invariant at the top of every round:
each runner has cached a strict prefix of `seq`, so it always has at least one unseen token to feed.

One round of `bild` or `speculative`:
  1. Draft   the little model proposes tokens (bild: until its top probability falls below α_FB or
             max_little tokens; speculative: gamma tokens, ending early after one below α_FB). With
             `lookup`, each little step also checks the tokens that followed the last n tokens where they
             stood before (bild/lookup.py) and keeps those it agrees with, so one step drafts several.
  2. Verify  the big model runs once, non-autoregressively, over every token it has not seen.
  3. Decide  a policy (policies.py) says how many drafts to keep and which token the big model adds.
  4. Commit  append the kept drafts and that token, crop both caches to the kept prefix, yield them.
`ar` and `little` are one model sampling one token per round. So is the first round of `bild` and
`speculative`: the big model prefills the prompt alone, exactly as under `ar`, so every position it caches is
computed in a forward of the same shape as under `ar` (with the native engine's batch-invariant steps this
makes greedy output bitwise-identical to `ar` in bf16 too, not only up to rounding).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .config import GenerationConfig
from .errors import BildError
from .lookup import lookup
from .metrics import Stats
from .policies import bild_rollback, next_gamma, probs, sample, speculative_accept, target


def decode(big, little, prompt_ids: list[int], cfg: GenerationConfig, eos_ids: set[int],
           stats: Stats) -> Iterator[list[int]]:
    """Yield the new tokens of each round until EOS, max_new_tokens or the context end."""
    if cfg.policy == "little" and little.needs_big:
        raise BildError("this little model reads the big model's features and cannot decode alone; "
                        "use policy ar, bild or speculative")
    runners = [r for r in (big, little) if r is not None]
    seq = [r.start(prompt_ids) for r in runners][0]
    start = len(seq)
    budget = min(cfg.max_new_tokens, min(r.max_length for r in runners) - start)
    gen = _generator(cfg)
    gamma = cfg.gamma
    while (left := budget - (len(seq) - start)) > 0:
        if cfg.policy in ("ar", "little") or big.length == 0:
            runner = little if cfg.policy == "little" else big
            new = [_sample_next(runner, seq, cfg, gen)]
            _count(stats, runner is big)
        else:
            limit = min(cfg.max_little if cfg.policy == "bild" else gamma, left - 1)
            drafts, qs, copied, fell_back = _draft(little, seq, cfg, gen, limit, stats)  # 1. draft
            p = probs(big.forward(_unseen(big, seq, drafts), keep=len(drafts) + 1), cfg)  # 2. verify
            stats.big_calls += 1
            kept, token = _decide(p, qs, drafts, cfg, gen, stats)               # 3. decide
            stats.fallbacks += fell_back
            stats.accepted.append(kept)
            stats.lookup_accepted += sum(copied[:kept])
            stats.drafted.append(len(drafts))
            if cfg.adaptive and cfg.policy == "speculative":
                gamma = next_gamma(gamma, kept, len(drafts))
            for r in runners:                                                   # 4. commit
                r.crop(len(seq) + kept)
            new = drafts[:kept] + [token]
        new = _until_eos(new[:left], eos_ids)
        seq.extend(new)
        stats.new_tokens += len(new)
        yield new
        if new[-1] in eos_ids:
            stats.finish_reason = "stop"
            return
    stats.finish_reason = "length"


def _generator(cfg: GenerationConfig) -> torch.Generator | None:
    if cfg.greedy:
        return None
    gen = torch.Generator()
    if cfg.seed is None:
        gen.seed()
    else:
        gen.manual_seed(cfg.seed)
    return gen


def _unseen(runner, seq: list[int], drafts: list[int]) -> list[int]:
    """The tokens of seq + drafts that runner has not cached yet."""
    n = runner.length
    return seq[n:] + drafts if n <= len(seq) else drafts[n - len(seq):]


def _sample_next(runner, seq: list[int], cfg: GenerationConfig, gen) -> int:
    logits = runner.forward(_unseen(runner, seq, []))  # (1, V)
    return sample(target(probs(logits, cfg), cfg)[-1], gen)


def _count(stats: Stats, big: bool) -> None:
    if big:
        stats.big_calls += 1
    else:
        stats.little_calls += 1


def _draft(little, seq, cfg, gen, limit, stats) -> tuple[list[int], list[torch.Tensor], list[bool], bool]:
    """The little model's proposals, their target(q) rows, which of them prompt lookup proposed, and whether bild
    fell back. With lookup, a little forward also reads the continuation copied from the context and keeps the
    prefix of it that the little model accepts (speculative acceptance against its own q, so every kept token is
    distributed as the little model's), then adds its own next token: several drafts for one little step."""
    drafts, qs, copied = [], [], []
    sizes = () if little.needs_big else cfg.lookup_sizes  # a feature draft runs one token ahead at most
    while len(drafts) < limit:
        found = lookup(seq + drafts, sizes, limit - len(drafts) - 1)  # room for the little model's own token
        q_soft = probs(little.forward(_unseen(little, seq, drafts) + found, keep=len(found) + 1), cfg)  # (k+1, V)
        stats.little_calls += 1
        q = target(q_soft, cfg)
        if found:
            kept, token = speculative_accept(q, _one_hots(found, q.shape[-1]), torch.tensor(found), gen)
            little.crop(len(seq) + len(drafts) + kept)  # the looked-up tokens it did not keep leave its cache
        else:
            kept, token = 0, sample(q[0], gen)
        stats.lookup_drafted += kept
        for i, t in enumerate(found[:kept] + [token]):
            confident = float(q_soft[i].max()) >= cfg.fallback
            if cfg.policy == "bild" and not confident:
                return drafts, qs, copied, True  # the uncertain token is not kept
            drafts.append(t)
            qs.append(q[i])
            copied.append(i < kept)
            if not confident:  # speculative: fallback ends the draft after this token
                return drafts, qs, copied, False
    return drafts, qs, copied, False


def _one_hots(tokens: list[int], vocab_size: int) -> torch.Tensor:
    """(k, V): a looked-up token is proposed with certainty."""
    return torch.zeros(len(tokens), vocab_size).scatter_(1, torch.tensor(tokens)[:, None], 1.0)


def _decide(p, qs, drafts, cfg, gen, stats) -> tuple[int, int]:
    """Apply the policy to the big model's (k+1, V) soft distributions p."""
    x = torch.tensor(drafts, dtype=torch.long)  # (k,)
    p_target = target(p, cfg)
    if cfg.policy == "speculative":
        q = torch.stack(qs) if qs else p_target[:0]  # (k, V)
        return speculative_accept(p_target, q, x, gen)
    kept, token, rolled_back = bild_rollback(p, p_target, x, cfg.rollback, gen)
    stats.rollbacks += rolled_back
    return kept, token


def _until_eos(tokens: list[int], eos_ids: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: i + 1]
    return tokens
