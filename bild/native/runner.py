"""The decoding loop's runner over a NativeModel and its own static KV cache."""

from __future__ import annotations

import torch
from torch import Tensor

from .convert import from_hf
from .forward import forward
from .model import NativeModel, allocate_cache, early_exit


class NativeRunner:
    """The decoding loop's runner interface over a NativeModel and its own static KV cache."""

    needs_big = False  # decodes on its own (policy "little")

    def __init__(self, model: NativeModel, max_length: int | None = None, source=None):
        limit = model.config.max_length
        self.model = model
        self.source = source  # the HF module it was converted from, if any (early exits of it share this runner)
        self.vocab_size = model.config.vocab_size
        self.max_length = min(max_length or limit, limit)
        self.cache = allocate_cache(model.config, self.max_length, model.dtype)
        self.length = 0
        self.features: Tensor | None = None  # (max_length, dim) once record_features() is called

    def record_features(self) -> Tensor:
        """From now on every forward writes its positions' final normed hidden states into self.features."""
        if self.features is None:
            self.features = torch.empty(self.max_length, self.model.config.dim, dtype=self.model.dtype)
        return self.features

    @classmethod
    def from_hf(cls, hf_model, dtype: torch.dtype | None = torch.bfloat16, max_length: int | None = None,
                pack: bool | None = None, gguf_blocks: bool | None = None, like: NativeModel | None = None,
                int8: bool = False):
        return cls(from_hf(hf_model, dtype, pack, gguf_blocks, like, int8), max_length, source=hf_model)

    def early_exit(self, n_layers: int) -> NativeRunner:
        """A runner over the first n_layers + final norm + head, sharing weights, with its own cache."""
        return NativeRunner(early_exit(self.model, n_layers), self.max_length)

    def start(self, prompt_ids: list[int]) -> list[int]:
        self.length = 0
        return list(prompt_ids)

    def forward(self, ids: list[int], keep: int = 1) -> Tensor:
        if not 1 <= keep <= len(ids):
            raise ValueError(f"keep must be in 1..{len(ids)}, got {keep}")
        if self.length + len(ids) > self.max_length:
            raise ValueError(f"sequence of {self.length + len(ids)} tokens exceeds the cache of {self.max_length}")
        logits = forward(self.model, self.cache, torch.tensor(ids), self.length, keep, self.features)  # (keep, V)
        self.length += len(ids)
        return logits

    def crop(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"cannot crop to {n} tokens")
        self.length = min(n, self.length)
