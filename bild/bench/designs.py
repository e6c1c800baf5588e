"""The draft design sweep: each little model's size, cost, agreement, and speedup against the big model.

For little model q beside big model p, with γ drafted tokens per big call:

    c        = q's ms per token / p's ms per token          (single-token cached steps, same engine)
    v        = p's ms for γ + 1 tokens / p's ms for 1 token  (the verification step)
    α        = top-1 agreement of q with p's greedy tokens on held-out prompts (teacher-forced)
    E        = (1 - α^(γ+1)) / (1 - α)                       tokens per big call (Leviathan et al.)
    predicted speedup = E / (γ c + v)

and the measured speedups of `speculative:gamma=γ` and `bild` over `ar`, run interleaved per prompt.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import dataclass

import torch

from . import methods as M


@dataclass(slots=True)
class Design:
    name: str
    little: str  # a spec models.load_little understands: a draft directory or early-exit:K


def stepper(runner, prompt_ids: list[int], width: int = 1):
    """A closure: one cached forward of `width` tokens after the prompt, with the logits of all of them as a
    verification needs, returning its seconds; the cache is cropped back to the prompt each time, so every call
    sees the same length."""
    runner.start(prompt_ids)
    runner.forward(prompt_ids)
    base, token = len(prompt_ids), prompt_ids[-1]

    def step() -> float:
        t0 = time.perf_counter()
        runner.forward([token] * width, keep=width)
        seconds = time.perf_counter() - t0
        runner.crop(base)
        return seconds
    return step


def step_ms(runner, prompt_ids: list[int], width: int = 1, steps: int = 24) -> float:
    """Median ms of a cached forward of `width` tokens after the prompt."""
    step = stepper(runner, prompt_ids, width)
    return statistics.median(step() for _ in range(steps)) * 1000


def predicted_speedup(alpha: float | list[float], gamma: int, c: float, verify_ratio: float) -> float:
    """Tokens per big call over the cost of a round, in big one-token steps. alpha: one agreement for every draft
    step (Leviathan: E = (1 − α^(γ+1)) / (1 − α)), or a feature draft's alpha_by_step (the last repeats beyond it):
    E = 1 + Σ_n Π_{j<=n} α_j, which is Leviathan's E when all are equal."""
    alphas = [alpha] if isinstance(alpha, float | int) else list(alpha)
    alphas = (alphas + alphas[-1:] * gamma)[:gamma]
    expected = 1 + sum(math.prod(alphas[:n + 1]) for n in range(gamma))
    return expected / (gamma * c + verify_ratio)


def alpha_needed(target: float, gamma: int, c: float, verify_ratio: float) -> float | None:
    """The smallest α (one for every draft step) at which predicted_speedup reaches `target`, or None when even
    α = 1, every draft accepted, falls short: then no little model reaches it at this γ, c and verification cost."""
    if predicted_speedup(1.0, gamma, c, verify_ratio) < target:
        return None
    lo, hi = 0.0, 1.0  # predicted_speedup rises with α
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if predicted_speedup(mid, gamma, c, verify_ratio) < target else (lo, mid)
    return hi


def costs(bl, prompt_ids: list[int], gamma: int, rounds: int = 24) -> dict:
    """Median ms of the big model's step, its (γ+1)-token verification and the little model's step, timed in
    interleaved rounds, so load drift on a shared CPU hits all three alike (timed one after the other, a noisy
    host once gave a verification 0.89x a step)."""
    big, verify = stepper(bl.big_runner, prompt_ids), stepper(bl.big_runner, prompt_ids, gamma + 1)
    little = stepper(bl.little_runner, prompt_ids)
    times = [(big(), verify(), little()) for _ in range(rounds)]  # big and verify share a cropped cache
    big_ms, verify_ms, little_ms = (statistics.median(column) * 1000 for column in zip(*times))
    return {"big_ms": big_ms, "little_ms": little_ms, "c": little_ms / big_ms, "verify_ratio": verify_ms / big_ms}


def measure(pairs: dict[str, object], prompts: list, gamma: int, max_new_tokens: int) -> dict[str, dict]:
    """Interleaved per prompt: ar once (on the first pair), then speculative and bild for every design."""
    first = next(iter(pairs.values()))
    speed = {"ar": []} | {f"{n}/{m}": [] for n in pairs for m in ("speculative", "bild")}
    calls = {n: [0, 0] for n in pairs}  # new tokens, big calls of speculative
    spec, bild = M.parse_method(f"speculative:gamma={gamma}"), M.parse_method("bild")
    M.run(first, M.parse_method("ar"), prompts[0], 8)  # warm-up, untimed
    for prompt in prompts:
        speed["ar"].append(M.run(first, M.parse_method("ar"), prompt, max_new_tokens)["tokens_per_s"])
        for name, bl in pairs.items():
            s = M.run(bl, spec, prompt, max_new_tokens)
            speed[f"{name}/speculative"].append(s["tokens_per_s"])
            calls[name][0] += s["new_tokens"]
            calls[name][1] += s["big_calls"]
            speed[f"{name}/bild"].append(M.run(bl, bild, prompt, max_new_tokens)["tokens_per_s"])
    ar = statistics.mean(speed["ar"])
    return {name: {"ar_tok_s": ar,
                   "spec_tok_s": statistics.mean(speed[f"{name}/speculative"]),
                   "bild_tok_s": statistics.mean(speed[f"{name}/bild"]),
                   "spec_speedup": statistics.mean(speed[f"{name}/speculative"]) / ar,
                   "bild_speedup": statistics.mean(speed[f"{name}/bild"]) / ar,
                   "tokens_per_call": calls[name][0] / max(calls[name][1], 1)} for name in pairs}


def sweep(big: str, designs: list[Design], heldout: list[dict], prompts: list, gamma: int = 3,
          max_new_tokens: int = 128, dtype=None) -> list[dict]:
    """One row per design. `heldout`: a teacher cache of held-out prompts (α); `prompts`: held-out prompts.
    α is measured in fp32 (as `draft export` does); speed with the engine's dtype (None: what `bild` picks)."""
    from .. import models
    from ..api import BigLittle
    from ..drafts.recipe import parameter_counts
    from ..training.evaluate import agreement
    reference, tokenizer = models.load(big)  # fp32 HF model: α
    big_model, _ = models.load(big, dtype=dtype, engine="auto")  # the model the pairs decode with
    pairs, rows = {}, {}
    for d in designs:
        with torch.inference_mode():
            agreed = agreement(models.load_little(d.little, reference), heldout, tokenizer.eos_token_id)
        little = models.load_little(d.little, big_model, dtype=big_model.dtype)
        bl = pairs[d.name] = BigLittle(big_model, little, tokenizer, models.describe_little(d.little))
        rows[d.name] = {"design": d.name, "little": d.little, "dtype": str(big_model.dtype).replace("torch.", ""),
                        **parameter_counts(little, big_model),
                        **costs(bl, bl.encode(prompts[0]), gamma), "gamma": gamma,
                        "alpha": agreed["alpha"], "alpha_by_step": agreed.get("alpha_by_step")}
        rows[d.name]["predicted_speedup"] = predicted_speedup(agreed.get("alpha_by_step", agreed["alpha"]), gamma,
                                                              rows[d.name]["c"], rows[d.name]["verify_ratio"])
    for name, measured in measure(pairs, prompts, gamma, max_new_tokens).items():
        rows[name].update(measured)
    return list(rows.values())


COLUMNS = [("design", "design", "{}"), ("unique", "unique params", "{:,}"), ("total", "total params", "{:,}"),
           ("little_ms", "ms/token", "{:.2f}"), ("c", "c", "{:.3f}"), ("alpha", "α", "{:.3f}"),
           ("tokens_per_call", "tokens per big call", "{:.2f}"), ("spec_speedup", "speculative × ar", "{:.2f}"),
           ("bild_speedup", "bild × ar", "{:.2f}"), ("predicted_speedup", "predicted × ar", "{:.2f}")]


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt.format(r[key]) for key, _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out_dir: str, settings: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "designs.json"), "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=2)
    first = rows[0]
    note = (f"\nγ = {first['gamma']}; engine dtype {first['dtype']}; big model {first['big_ms']:.1f} ms/token; "
            f"verifying γ+1 tokens costs "
            f"{first['verify_ratio']:.2f}x one token. Measured speedups: mean tokens/s over "
            f"{settings['prompts']} held-out prompts x {settings['max_new_tokens']} new tokens, interleaved, "
            f"ar = {first['ar_tok_s']:.1f} tokens/s.\n")
    with open(os.path.join(out_dir, "designs.md"), "w") as f:
        f.write(markdown(rows) + note)


def as_designs(specs: list[str]) -> list[Design]:
    """'name=spec' or 'spec' (named by its last path component)."""
    out = []
    for s in specs:
        name, eq, little = s.partition("=")
        out.append(Design(name, little) if eq else Design(os.path.basename(s.rstrip("/")), s))
    return out
