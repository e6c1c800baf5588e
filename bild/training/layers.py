"""Which layers a layer-dropped little model keeps: ShortGPT's Block Influence, measured on the big model's text."""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.inference_mode()
def block_influence(model, sequences: list[list[int]]) -> list[float]:
    """Per layer, 1 − the mean cosine similarity of its input and output hidden states over every position of the
    sequences (each fed whole from position 0): how much the layer changes the residual stream."""
    from ..native import allocate_cache, blocks, keep_layers
    from ..native.forward import embedding

    totals, count = torch.zeros(model.config.n_layers, dtype=torch.float64), 0
    singles = [keep_layers(model, [i]) for i in range(model.config.n_layers)]
    for ids in sequences:
        x = embedding(model, torch.tensor(ids))  # (T, dim)
        for i, one in enumerate(singles):
            y = blocks(one, allocate_cache(one.config, len(ids), model.dtype), x, 0)  # (T, dim)
            totals[i] += (1 - F.cosine_similarity(x.double(), y.double(), dim=-1)).sum()
            x = y
        count += len(ids)
    return (totals / count).tolist()


def most_influential(influence: list[float], n: int) -> list[int]:
    """The n layers of highest influence, in model order."""
    if not 1 <= n <= len(influence):
        raise ValueError(f"keep 1..{len(influence)} layers, not {n}")
    return sorted(sorted(range(len(influence)), key=lambda i: -influence[i])[:n])
