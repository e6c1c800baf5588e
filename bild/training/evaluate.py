"""Held-out agreement of a little model with the big model's greedy tokens (teacher-forced on a teacher cache)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..drafts.heads import ReducedHead
from ..drafts.feature import EVAL_STEPS, FeatureDraft, shifted
from .losses import need_features, pad_batch


@torch.no_grad()
def agreement(draft, examples: list[dict], pad_id: int, batch_size: int = 8) -> dict:
    """Top-1 agreement α of the draft with the big model's greedy tokens (teacher-forced), and top-k coverage."""
    if isinstance(draft, FeatureDraft):
        return feature_agreement(draft, examples, pad_id, batch_size)
    hits = total = 0
    for b in range(0, len(examples), batch_size):
        batch = pad_batch(examples[b:b + batch_size], pad_id)
        hidden = draft.model(input_ids=batch["ids"]).last_hidden_state                # (B, T, H)
        pos = batch["positions"]
        logits = draft.lm_head(hidden[pos[:, 0], pos[:, 1]][:, None])[:, 0]         # (M, V)
        hits += (logits.argmax(-1) == batch["topi"][:, 0].long()).sum().item()
        total += len(pos)
    return {"alpha": hits / max(total, 1), "positions": total}



@torch.no_grad()
def feature_agreement(draft: FeatureDraft, examples: list[dict], pad_id: int, batch_size: int = 8,
              steps: int = EVAL_STEPS) -> dict:
    """Held-out top-1 agreement with the big model's greedy tokens, teacher-forced on the big model's features:
    alpha is what the first draft token of every round sees. alpha_by_step[n-1] is the n-th draft token's, which
    reads the draft's own f̂ (FeatureDraft.unroll; tokens still teacher-forced), and accept_est = Σ_n Π_{j<=n}
    alpha_j estimates the draft tokens accepted per round of `steps` as if the steps erred independently. Measured
    end to end, acceptance is bild bench's tokens per big call."""
    hits, total = [0] * steps, 0
    for b in range(0, len(examples), batch_size):
        batch = need_features(pad_batch(examples[b:b + batch_size], pad_id))
        pos = batch["positions"]  # (M, 2)
        want = batch["topi"][:, 0].long()  # (M,)
        for n, f_hat in enumerate(draft.unroll(batch["ids"], shifted(batch["feats"].float()), steps)):
            hits[n] += (_full_argmax(draft, f_hat[pos[:, 0], pos[:, 1]]) == want).sum().item()
        total += len(pos)
    alphas = [h / max(total, 1) for h in hits]
    return {"alpha": alphas[0], "positions": total, "alpha_by_step": [round(a, 4) for a in alphas],
            "accept_est": round(sum(math.prod(alphas[:n + 1]) for n in range(steps)), 4)}


def _full_argmax(draft: FeatureDraft, f: Tensor) -> Tensor:
    """Argmax over the full vocabulary (a reduced head never picks a token outside its kept ids)."""
    logits = draft.logits(f)  # (M, N)
    head = draft.lm_head
    return head.kept[logits.argmax(-1)] if isinstance(head, ReducedHead) else logits.argmax(-1)

