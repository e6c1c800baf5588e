"""Per-method summary of benchmark records, as JSON and a markdown table. Needs no models."""

from __future__ import annotations

import math
from statistics import mean

from .quality import acceptance_by_position, corpus_bleu, perplexity, rouge_l

REFERENCE, HF_REFERENCE = "ar", "hf-generate"


def common_prompts(records: list[dict], labels: list[str]) -> list[str]:
    """Prompt ids that every method has a record for, in first-seen order (a partial run compares fairly)."""
    have: dict[str, set[str]] = {}
    order: list[str] = []
    for r in records:
        have.setdefault(r["method"], set()).add(r["prompt_id"])
        if r["prompt_id"] not in order:
            order.append(r["prompt_id"])
    return [p for p in order if all(p in have.get(m, ()) for m in labels)]


def summarize(records: list[dict], labels: list[str] | None = None) -> dict:
    """{"prompts": n, "methods": {label: row}} over the prompts every method finished."""
    labels = labels or list(dict.fromkeys(r["method"] for r in records))
    prompts = common_prompts(records, labels)
    keep = set(prompts)
    table = {m: {r["prompt_id"]: r for r in records if r["method"] == m and r["prompt_id"] in keep}
             for m in labels}
    rows = {m: _row(table[m], prompts) for m in labels}
    for m in labels:
        for ref, key in ((REFERENCE, "speedup_vs_ar"), (HF_REFERENCE, "speedup_vs_hf_generate")):
            base = rows.get(ref, {}).get("tokens_per_s")
            rows[m][key] = rows[m]["tokens_per_s"] / base if base else None
        if REFERENCE in table and prompts:
            rows[m].update(_versus(table[m], table[REFERENCE], prompts))
    return {"prompts": len(prompts), "prompt_ids": prompts, "methods": rows}


def _row(by_prompt: dict[str, dict], prompts: list[str]) -> dict:
    rs = [by_prompt[p] for p in prompts]
    if not rs:
        return {"n": 0, "tokens_per_s": None}
    drafted = [r["drafted"] for r in rs if r.get("drafted")]
    accepted = [r["accepted"] for r in rs if r.get("drafted")]
    calls = [a for acc in accepted for a in acc]
    nll = [(r["big_nll"], r["new_tokens"]) for r in rs if r.get("big_nll") is not None]
    passed = [r["passed"] for r in rs if r.get("passed") is not None]
    big_calls = [r["big_calls"] for r in rs if r.get("big_calls")]
    return {
        "n": len(rs),
        "tokens_per_s": mean(r["tokens_per_s"] for r in rs),
        "new_tokens": mean(r["new_tokens"] for r in rs),
        "seconds": sum(r["seconds"] for r in rs),
        "tokens_per_big_call": (sum(r["new_tokens"] for r in rs if r.get("big_calls")) / sum(big_calls)
                                if big_calls else None),
        "mean_accepted": mean(calls) if calls else None,
        "acceptance_by_position": acceptance_by_position(accepted, drafted) if drafted else None,
        "fallbacks": _total(rs, "fallbacks"), "rollbacks": _total(rs, "rollbacks"),
        "ppl": perplexity(sum(n for n, _ in nll), sum(t for _, t in nll)) if nll else None,
        "pass_at_1": mean(passed) if passed else None,
    }


def _total(rs: list[dict], key: str):
    values = [r[key] for r in rs if r.get(key) is not None]
    return sum(values) if values else None


def _versus(mine: dict[str, dict], ref: dict[str, dict], prompts: list[str]) -> dict:
    cand, refs = [mine[p]["text"] for p in prompts], [ref[p]["text"] for p in prompts]
    return {"identical_to_ar": mean(mine[p]["token_ids"] == ref[p]["token_ids"] for p in prompts),
            "rouge_l": mean(rouge_l(c, r) for c, r in zip(cand, refs)),
            "bleu": corpus_bleu(cand, refs)}


COLUMNS = [("method", "method", "{}"), ("n", "n", "{}"), ("tokens_per_s", "tok/s", "{:.2f}"),
           ("speedup_vs_ar", "× ar", "{:.2f}"), ("speedup_vs_hf_generate", "× hf-generate", "{:.2f}"),
           ("tokens_per_big_call", "tok/big call", "{:.2f}"), ("mean_accepted", "mean accepted", "{:.2f}"),
           ("acceptance_by_position", "accept. by position", None), ("identical_to_ar", "identical to ar", "{:.0%}"),
           ("rouge_l", "ROUGE-L vs ar", "{:.3f}"), ("bleu", "BLEU vs ar", "{:.1f}"), ("ppl", "big-model PPL", "{:.2f}"),
           ("pass_at_1", "pass@1", "{:.3f}")]


def markdown(summary: dict) -> str:
    rows = summary["methods"]
    cols = [c for c in COLUMNS if c[0] == "method" or any(r.get(c[0]) is not None for r in rows.values())]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for label, row in rows.items():
        lines.append("| " + " | ".join(_cell(label if key == "method" else row.get(key), fmt)
                                       for key, _, fmt in cols) + " |")
    return "\n".join(lines) + f"\n\n{summary['prompts']} prompts finished by every method.\n"


def _cell(value, fmt) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if fmt is None:  # acceptance by position: the first five positions
        return " ".join(f"{v:.2f}" for v in value[:5]) if value else "–"
    return fmt.format(value)
