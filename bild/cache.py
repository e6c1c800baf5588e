"""Model runners: a model plus its KV cache, behind one small interface.

The decoding loop sees every model as a runner:
    start(prompt_ids) -> seq    reset the cache; return the initial decoder sequence
    forward(ids, keep) -> (keep, V) float32 logits of the last `keep` fed positions; the cache grows by len(ids)
    crop(n)                     keep only the first n cached tokens (rollback)
    length                      how many tokens of the sequence the cache holds
Decoder-only models start from the prompt. Encoder-decoder models run their encoder once in start() and
start the decoder from its start token; only self-attention KV grows and rolls back.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, EncoderDecoderCache

from .config import ACTIVATIONS, ENGINES
from .drafts import spec_of
from .errors import BildError
from .models import vocab_size


class HFRunner:
    """A Hugging Face decoder-only model with a DynamicCache; rollback crops it in place."""

    needs_big = False  # decodes on its own (policy "little")

    def __init__(self, model):
        self.model = model
        self.vocab_size = vocab_size(model)
        self.max_length = context_length(model)
        self.cache = None
        self.length = 0

    def start(self, prompt_ids: list[int]) -> list[int]:
        self.cache = DynamicCache(config=self.model.config)
        self.length = 0
        return list(prompt_ids)

    @torch.inference_mode()
    def forward(self, ids: list[int], keep: int = 1) -> torch.Tensor:
        x = torch.tensor([ids], device=self.model.device)  # (1, T)
        out = self.model(input_ids=x, cache=self.cache, use_cache=True, logits_to_keep=keep)
        self.length += len(ids)
        return out.logits[0, -keep:].float()  # (keep, V)

    def crop(self, n: int) -> None:
        if n < self.length:
            self.cache.crop(n - self.length)  # a negative count removes that many trailing tokens
            self.length = n


class HFSeq2SeqRunner(HFRunner):
    """A Hugging Face encoder-decoder model: the encoder runs once per input in start()."""

    def start(self, prompt_ids: list[int]) -> list[int]:
        cfg = self.model.config
        src = torch.tensor([prompt_ids], device=self.model.device)  # (1, S)
        with torch.inference_mode():
            self.encoder_outputs = self.model.get_encoder()(input_ids=src)
        self.cache = EncoderDecoderCache(DynamicCache(config=cfg), DynamicCache(config=cfg))
        self.length = 0
        return [cfg.decoder_start_token_id]

    @torch.inference_mode()
    def forward(self, ids: list[int], keep: int = 1) -> torch.Tensor:
        x = torch.tensor([ids], device=self.model.device)  # (1, T)
        out = self.model(encoder_outputs=self.encoder_outputs, decoder_input_ids=x,
                         cache=self.cache, use_cache=True)
        self.length += len(ids)
        return out.logits[0, -keep:].float()  # (keep, V)


def context_length(model) -> int:
    """The longest sequence a model takes; T5's relative positions have no hard limit, so use n_positions."""
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    return 512 if cfg.is_encoder_decoder else 2048




def make_runner(model, engine: str = "auto", share_with=None, activations: str = "fp32"):
    """A runner for `model`: the native LLaMA-family forward (bild/native.py) where it applies, else HF.

    share_with: the big model's native runner, beside which `model` runs as the little model: an early exit of it
    shares its weights, and another model is packed like it (its activations included).
    activations: "fp32", or "int8" (native engine on GGUF blocks only; see native.with_int8).
    """
    from . import native

    if engine not in ENGINES:
        raise BildError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}", field="engine")
    if activations not in ACTIVATIONS:
        raise BildError(f"unknown activations {activations!r}; choose one of {', '.join(ACTIVATIONS)}",
                        field="activations")
    int8 = activations == "int8"
    if int8 and (engine == "hf" or not native.supports(model)):
        raise BildError("int8 activations need the native engine (a LLaMA-family model on GGUF blocks)",
                        field="activations")
    spec = spec_of(model)
    if spec.reads_big_features:
        from .drafts.feature import FeatureRunner
        return FeatureRunner.attach(model, share_with)
    if engine == "hf" or (engine == "auto" and not native.supports(model)):
        return HFSeq2SeqRunner(model) if model.config.is_encoder_decoder else HFRunner(model)
    if not native.supports(model):
        raise BildError(f"the native engine does not handle {type(model).__name__}; use --engine hf", field="engine")
    if isinstance(share_with, native.NativeRunner) and spec.exits(share_with.source):
        return share_with.early_exit(spec.exit_layers)
    like = share_with.model if isinstance(share_with, native.NativeRunner) else None  # packed like the big model
    try:
        return native.NativeRunner.from_hf(model, dtype=model.dtype, like=like, int8=int8)
    except ValueError as e:
        raise BildError(str(e)) from e

