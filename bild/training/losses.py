"""Losses of little-model training: token-level KD and sequence-level KD on teacher caches (BiLD prediction
alignment), and the feature drafts' loss with feature regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..drafts.feature import FeatureDraft, shifted
from ..drafts.heads import ReducedHead
from ..errors import BildError


def vocab_lookup(draft, vocab_size: int) -> torch.Tensor | None:
    """(V,) map from token id to its column in a reduced head, -1 where not kept; None for a full head."""
    head = draft.lm_head
    if not isinstance(head, ReducedHead):
        return None
    lookup = torch.full((vocab_size,), -1, dtype=torch.long)
    lookup[head.kept] = torch.arange(len(head.kept))
    return lookup


def student_logits(draft, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Draft logits at (row, col) `positions` only: (M, N) over the reduced head or (M, V) over the full one."""
    hidden = draft.model(input_ids=ids).last_hidden_state        # (B, T, H)
    picked = hidden[positions[:, 0], positions[:, 1]]             # (M, H)
    head = draft.lm_head
    return head.reduced(picked) if isinstance(head, ReducedHead) else head(picked)


def topk_kd_loss(logits, topv, topi, greedy, lookup, w_kd: float, w_ce: float) -> tuple[torch.Tensor, dict]:
    """Cross-entropy to the teacher's renormalised top-k softmax (token KD) + to its greedy token (sequence KD).

    logits (M, N); topv/topi (M, k); greedy (M,). With a reduced head, teacher ids outside it are dropped.
    """
    logq = torch.log_softmax(logits.float(), dim=-1)                               # (M, N)
    cols, valid = topi.long(), torch.ones_like(topi, dtype=torch.bool)
    if lookup is not None:
        cols = lookup[cols]
        valid = cols >= 0
        cols = cols.clamp(min=0)
    p = torch.softmax(topv.float().masked_fill(~valid, float("-inf")), dim=-1)     # (M, k)
    p = torch.nan_to_num(p)                                                        # rows with nothing kept
    kd = -(p * logq.gather(1, cols)).sum(-1).mean()
    g = greedy.long() if lookup is None else lookup[greedy.long()]
    hit = g >= 0
    ce = -logq[hit].gather(1, g[hit][:, None]).mean() if hit.any() else logq.new_zeros(())
    return w_kd * kd + w_ce * ce, {"kd": kd.item(), "ce": ce.item()}


def pad_batch(examples: list[dict], pad_id: int) -> dict:
    """Right-pad aligned examples; gather loss positions and their teacher targets."""
    width = max(len(e["ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)             # (B, T)
    rows, cols, topv, topi = [], [], [], []
    out = {}
    if "feats" in examples[0]:  # feature drafts: the big model's features, (L - 1, dim) per example
        out["feats"] = torch.zeros(len(examples), width, examples[0]["feats"].shape[-1])  # (B, T, dim)
        out["feat_mask"] = torch.zeros(len(examples), width, dtype=torch.bool)  # (B, T): has a target feature
    for b, e in enumerate(examples):
        ids[b, :len(e["ids"])] = e["ids"]
        if out:
            out["feats"][b, :len(e["feats"])] = e["feats"].float()
            out["feat_mask"][b, :len(e["feats"])] = True
        n = len(e["topv"])
        rows.append(torch.full((n,), b))
        cols.append(torch.arange(e["start"], e["start"] + n))
        topv.append(e["topv"])
        topi.append(e["topi"])
    positions = torch.stack([torch.cat(rows), torch.cat(cols)], dim=1)             # (M, 2)
    return {"ids": ids, "positions": positions, "topv": torch.cat(topv), "topi": torch.cat(topi), **out}



def feature_loss(draft: FeatureDraft, batch: dict, lookup: Tensor | None, w_kd: float, w_ce: float,
                 w_reg: float = 1.0, noise: float = 0.1, steps: int = 1) -> tuple[Tensor, dict, int]:
    """Train on a padded teacher batch with features (pad_batch): the shallow drafts' loss on the
    teacher's cached top-k (topk_kd_loss: token KD + sequence KD, one pass of the head) plus smooth-L1
    regression of f̂ onto the big model's features at every position that has one.
    lookup: token id -> column of a reduced head (vocab_lookup), or None for a full head.
    Input features get uniform noise of `noise` times their RMS, as in EAGLE, so the draft tolerates its own
    slightly wrong f̂ while drafting several tokens. steps > 1 also trains the later draft tokens of a round on the
    draft's own f̂ (FeatureDraft.unroll, as HASS does); every pass has the same targets and weight, and the loss is
    their sum."""
    need_features(batch)
    feats, valid = batch["feats"], batch["feat_mask"]  # (B, T, dim) targets f_t, (B, T) bool
    inputs = shifted(feats)
    if noise and draft.training:
        scale = noise * feats[valid].float().pow(2).mean().sqrt()
        inputs = inputs + (torch.rand_like(inputs) * 2 - 1) * scale
    pos = batch["positions"]  # (M, 2) positions with teacher logits
    total, parts = 0.0, {}
    for n, f_hat in enumerate(draft.unroll(batch["ids"], inputs, steps), start=1):  # (B, T, dim) each
        logits = draft.logits(f_hat[pos[:, 0], pos[:, 1]])  # (M, N)
        loss, kd_parts = topk_kd_loss(logits, batch["topv"], batch["topi"], batch["topi"][:, 0], lookup, w_kd, w_ce)
        reg = F.smooth_l1_loss(f_hat[valid].float(), feats[valid].float())
        total = total + loss + w_reg * reg
        suffix = "" if n == 1 else str(n)
        parts.update({f"{k}{suffix}": v for k, v in {**kd_parts, "reg": reg.item()}.items()})
    return total, parts, len(pos)



def need_features(batch: dict) -> dict:
    if "feats" not in batch:
        raise BildError("a feature draft trains and is measured on teacher caches with the big model's features: "
                        "make them with `bild draft teacher --features`")
    return batch
