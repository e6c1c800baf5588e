"""A reduced-vocabulary LM head: a little model's logits over the kept token ids, -inf elsewhere (lossless)."""

from __future__ import annotations

import torch
from torch import nn


class ReducedHead(nn.Module):
    """LM head restricted to `kept` token ids; full-vocabulary logits with -inf elsewhere.

    The weight rows are gathered once from the big head (frozen, so the gather never goes stale) and
    held in a non-persistent buffer: nothing of the big model is saved with the draft.
    """

    def __init__(self, big_head: nn.Linear, kept: torch.Tensor, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.register_buffer("kept", kept.long(), persistent=False)
        self.register_buffer("sub_weight", big_head.weight.detach().index_select(0, self.kept), persistent=False)
        self.source = [big_head]   # a list so the big head is not registered as a submodule

    @property
    def weight(self) -> torch.Tensor:
        """The big head's full (V, H) weight, so vocabulary checks see the full vocabulary."""
        return self.source[0].weight

    def reduced(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.sub_weight.to(hidden.dtype).T                        # (B, T, N)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        small = self.reduced(hidden)                                               # (B, T, N)
        full = small.new_full((*small.shape[:-1], self.vocab_size), float("-inf"))  # (B, T, V)
        return full.index_copy_(-1, self.kept, small)
