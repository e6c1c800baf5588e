"""The little-model sweep for a pair read straight from GGUF files: for each little model beside one big model, its
size, cost and agreement, and the speedups it gives, measured side by side in one run.

Per little model q beside big model p (designs.py defines c, v, E and the prediction):
    bytes        what one step of q reads (native.streamed_bytes)
    c, v         q's step over p's step; p's γ+1-token verification over its step (interleaved rounds)
    α_i          the rate at which q's i-th drafted token is kept, from `speculative:lookup=0` (q alone drafts)
    α needed     the α (every position) at which q's c and v predict the first little's speedup (none: unreachable)
    measured     tokens/s of speculative (q alone, and with the pair's prompt lookup) and bild, over ar; every
                 greedy speculative output must equal ar's, token for token
    pass@1       HumanEval problems: ar's and bild's completions run against the problems' tests
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from . import designs as D
from . import methods as M
from .quality import acceptance_by_position, humaneval_passed


@dataclass(slots=True)
class Little:
    name: str
    spec: str  # what api.gguf_little_runner loads: a GGUF alias or path, a little model directory, early-exit:K


def pairs(big: str, littles: list[Little]) -> dict:
    """One BigLittle per little model, all on one big runner (loaded once), with the big model's pair settings."""
    from .. import models
    from ..api import BigLittle, gguf_little_runner

    loaded = BigLittle.load(big, little="early-exit:1")  # the big model and its tokenizer; the exit is not used
    out = {}
    for d in littles:
        runner, path = gguf_little_runner(d.spec, loaded.big_runner, loaded.big_runner.model.int8)
        bl = BigLittle.from_runners(loaded.big_runner, runner, loaded.tokenizer, loaded.eos_ids,
                                    models.describe_little(d.spec), loaded.big_file, path)
        bl.defaults = models.pair_settings(big)
        out[d.name] = bl
    return out


def _size(model) -> dict:
    from ..native.model import matmul_shapes, streamed_bytes
    shapes = matmul_shapes(model)
    return {"layers": model.config.n_layers, "head_tokens": shapes[-1][0],
            "params": sum(rows * cols for rows, cols in shapes), "bytes_per_token": streamed_bytes(model)}


def sweep(bls: dict, items: list, gamma: int, max_new_tokens: int, trained: dict | None = None,
          log=print) -> list[dict]:
    """bls: name -> BigLittle (see pairs), all on one big runner; items: bench items (HumanEval ones: with pass@1);
    trained: name -> its trained parameters (the deltas a little model directory adds)."""
    first = next(iter(bls.values()))
    rows = {}
    for name, bl in bls.items():
        rows[name] = {"design": name, "little": bl.little_description, **_size(bl.little_runner.model),
                      "trained": (trained or {}).get(name, 0),
                      **D.costs(bl, bl.encode(items[0].prompt), gamma), "gamma": gamma}
        log(f"{name}: c {rows[name]['c']:.3f}, verify {rows[name]['verify_ratio']:.2f}x")
    methods = {"spec_alone": M.parse_method(f"speculative:gamma={gamma},lookup=0"),
               "spec": M.parse_method("speculative"), "bild": M.parse_method("bild")}
    runs = {(n, m): [] for n in bls for m in methods} | {("ar", "ar"): []}
    M.run(first, M.parse_method("ar"), items[0].prompt, 8)  # warm-up, untimed
    for k, item in enumerate(items):
        runs["ar", "ar"].append(M.run(first, M.parse_method("ar"), item.prompt, max_new_tokens))
        for name, bl in bls.items():
            for key, method in methods.items():
                runs[name, key].append(M.run(bl, method.with_defaults(bl.defaults), item.prompt, max_new_tokens))
        log(f"prompt {k + 1}/{len(items)} done")
    ar = runs["ar", "ar"]
    ar_speed = statistics.mean(r["tokens_per_s"] for r in ar)
    emitted = [t for r in ar for t in r["token_ids"]]
    for name, row in rows.items():
        ids = bls[name].little_runner.model.head_ids
        if ids is not None and emitted:  # the share of the big model's held-out tokens the head can propose
            kept = set(ids.tolist())
            row["head_coverage"] = sum(t in kept for t in emitted) / len(emitted)
        alone = runs[name, "spec_alone"]
        alpha = acceptance_by_position([r["accepted"] for r in alone], [r["drafted"] for r in alone])
        row.update(alpha_by_position=alpha, alpha=alpha[0] if alpha else 0.0,
                   tokens_per_call=sum(r["new_tokens"] for r in alone) / max(1, sum(r["big_calls"] for r in alone)),
                   predicted_speedup=D.predicted_speedup(alpha or [0.0], gamma, row["c"], row["verify_ratio"]),
                   ar_tok_s=ar_speed,
                   identical=all(r["token_ids"] == a["token_ids"] for key in ("spec_alone", "spec")
                                 for r, a in zip(runs[name, key], ar)))
        for key in methods:
            speed = statistics.mean(r["tokens_per_s"] for r in runs[name, key])
            row[f"{key}_tok_s"], row[f"{key}_speedup"] = speed, speed / ar_speed
        if all(item.problem for item in items):
            row["ar_pass@1"] = statistics.mean(humaneval_passed(i.problem, r["text"]) for i, r in zip(items, ar))
            row["bild_pass@1"] = statistics.mean(humaneval_passed(i.problem, r["text"])
                                                 for i, r in zip(items, runs[name, "bild"]))
    ref = next(iter(rows.values()))["predicted_speedup"]
    for row in rows.values():  # what agreement this little's cost needs to predict the first little's speedup
        row["alpha_needed"] = D.alpha_needed(ref, gamma, row["c"], row["verify_ratio"])
    return list(rows.values())


COLUMNS = [("design", "little", "{}"), ("layers", "layers", "{}"), ("params", "matmul params (M)", "{:,.1f}", 1e-6),
           ("trained", "trained (M)", "{:,.1f}", 1e-6), ("head_tokens", "head tokens", "{:,}"),
           ("head_coverage", "of ar's tokens", "{:.2%}"),
           ("bytes_per_token", "MB read a token", "{:,.0f}", 1e-6), ("little_ms", "ms a token", "{:.2f}"),
           ("c", "c", "{:.3f}"), ("alpha", "α₁", "{:.3f}"), ("tokens_per_call", "tokens per big call", "{:.2f}"),
           ("predicted_speedup", "predicted × ar", "{:.2f}"), ("alpha_needed", "α to match the first", "{:.3f}"),
           ("spec_alone_speedup", "speculative × ar", "{:.2f}"),
           ("spec_speedup", "speculative + lookup × ar", "{:.2f}"), ("bild_speedup", "bild × ar", "{:.2f}"),
           ("bild_pass@1", "bild pass@1", "{:.3f}")]


def markdown(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]

    def cell(r, c):
        if c[0] not in r:
            return "–"
        return "none" if r[c[0]] is None else c[2].format(r[c[0]] * (c[3] if len(c) > 3 else 1))
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    first = rows[0]
    note = (f"\nγ = {first['gamma']} (speculative alone); big model {first['big_ms']:.1f} ms a token, verifying γ+1 "
            f"tokens {first['verify_ratio']:.2f}x that; ar {first['ar_tok_s']:.1f} tokens/s"
            + (f", ar pass@1 {first['ar_pass@1']:.3f}" if "ar_pass@1" in first else "")
            + "; α by draft position: " + "; ".join(
                f"{r['design']} " + " ".join(f"{a:.2f}" for a in r["alpha_by_position"]) for r in rows)
            + "; greedy speculative identical to ar: "
            + ", ".join(f"{r['design']} {'yes' if r['identical'] else 'NO'}" for r in rows) + ".\n")
    return "\n".join(lines) + "\n" + note
