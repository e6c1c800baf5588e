"""The public API: BigLittle.load(...), BigLittle(...).generate(...) and .stream(...)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from . import models, native
from .cache import make_runner
from .config import DEFAULT_BIG, GenerationConfig
from .drafts import gguf as gguf_little
from .errors import BildError
from .loop import decode
from .metrics import Stats


@dataclass(slots=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # generated tokens only, prompt excluded
    stats: Stats

    @property
    def finish_reason(self) -> str:
        return self.stats.finish_reason


class BigLittle:
    """A big model, a little model and their shared tokenizer, decoded together."""

    def __init__(self, big, little, tokenizer, little_description: str = "user-supplied model", engine: str = "auto",
                 activations: str = "fp32", big_file: str | None = None):
        """engine: "native" (LLaMA-family CPU forward), "hf" (transformers), or "auto" (native where it applies).
        The native engine runs in the HF models' dtype (float16: fp16 weights, fp32 activations).
        activations="int8": a big model on GGUF blocks multiplies activations rounded to int8 per 32-value block,
        as llama.cpp does: faster, lossy against fp32, and outputs are lossless relative to that model."""
        models.check_pair(big, little)
        big_runner = make_runner(big, engine, activations=activations)
        self._init(big_runner, make_runner(little, engine, share_with=big_runner), tokenizer, _eos_ids(big, tokenizer),
                   little_description, big_file, big.config.is_encoder_decoder)
        self.big, self.little = big, little

    @classmethod
    def from_runners(cls, big_runner, little_runner, tokenizer, eos_ids: set[int],
                     little_description: str = "user-supplied model", big_file: str | None = None,
                     little_file: str | None = None) -> BigLittle:
        """A decoder-only pair whose runners are built already, with no Hugging Face modules behind them (the
        native engine on GGUF files it reads directly); `big` and `little` are then None."""
        if big_runner.vocab_size != little_runner.vocab_size:
            raise BildError(f"vocabularies differ: big model has {big_runner.vocab_size} tokens, "
                            f"little model has {little_runner.vocab_size}")
        bl = cls.__new__(cls)
        bl._init(big_runner, little_runner, tokenizer, eos_ids, little_description, big_file, False)
        bl.little_file = little_file
        bl.big = bl.little = None
        return bl

    def _init(self, big_runner, little_runner, tokenizer, eos_ids, little_description, big_file, encoder_decoder):
        self.big_runner, self.little_runner, self.tokenizer = big_runner, little_runner, tokenizer
        self.eos_ids = eos_ids
        self.little_description = little_description
        self.big_file = big_file  # the .gguf file the big model was loaded from, if any (llama.cpp runs it too)
        self.little_file = None  # the little model's .gguf file, when it is one (llama.cpp's draft model)
        self.encoder_decoder = encoder_decoder
        self.engine = type(big_runner).__name__
        self.defaults: dict = {}  # decoding settings under every call's own (a pair's measured ones; see load)

    @property
    def precision(self) -> str:
        """What the big model computes in, e.g. "torch.float16 weights, torch.float32 activations"."""
        m = getattr(self.big_runner, "model", None)
        return m.precision if isinstance(m, native.NativeModel) else str(self.big.dtype)

    @classmethod
    def _load_gguf(cls, big: str, path: str, little: str | None, activations: str | None) -> BigLittle:
        """Both models straight from their GGUF files on the native engine (bild.native.gguf); the little one is
        another such file or an early exit of the big one."""
        int8 = activations != "fp32"
        big_runner = native.NativeRunner(native.gguf.load(path, int8=int8))
        spec = little if little is not None else models.default_little(big)
        little_runner, little_path = gguf_little_runner(spec, big_runner, int8)
        tokenizer = models.gguf_tokenizer(path)
        eos = {tokenizer.eos_token_id, *native.gguf.eos_ids(path)} - {None}
        return cls.from_runners(big_runner, little_runner, tokenizer, eos, models.describe_little(spec), path,
                                little_path)

    @classmethod
    def load(cls, big: str = DEFAULT_BIG, little: str | None = None, dtype=None, device=None,
             engine: str = "auto", activations: str | None = None) -> BigLittle:
        """Load by alias, hub id, directory or .gguf file; little=None is the big model's default little model.
        dtype=None: see models.default_dtype (bf16 or fp16 weights on the native engine, else fp32). Outputs are
        lossless relative to the big model as loaded: with bf16 or fp16, to its rounded weights.
        activations=None: int8 for a GGUF file the native engine reads directly (llama.cpp's arithmetic, its fast
        path), fp32 otherwise."""
        path = models.gguf_file(big)
        if engine != "hf" and models.reads_directly(path):
            bl = cls._load_gguf(big, path, little, activations)
            bl.defaults = models.pair_settings(big) if little is None else {}
            return bl
        big_model, tokenizer = models.load(big, dtype=dtype, device=device, engine=engine)
        little = little if little is not None else models.default_little(big)
        little_model = models.load_little(little, big_model, dtype=big_model.dtype, device=device)
        return cls(big_model, little_model, tokenizer, models.describe_little(little), engine=engine,
                   activations=activations or "fp32", big_file=path)

    def generate(self, prompt, **kwargs) -> GenerationResult:
        """Generate from a string, a list of token ids or a list of chat messages. See GenerationConfig."""
        *_, result = self._run(prompt, GenerationConfig(**{**self.defaults, **kwargs}))
        return result

    def stream(self, prompt, cancel: threading.Event | None = None, **kwargs) -> Stream:
        """Text pieces as they are finalised; after iterating, `.result` holds the GenerationResult.

        cancel: checked after every decoding round; once set, generation ends with finish_reason "cancelled"."""
        return Stream(self._run(prompt, GenerationConfig(**{**self.defaults, **kwargs}), cancel))

    def _run(self, prompt, cfg: GenerationConfig, cancel=None) -> Iterator[str | GenerationResult]:
        """Yield text pieces, then the GenerationResult."""
        ids = self.encode(prompt)
        stats = Stats(policy=cfg.policy, prompt_tokens=len(ids))
        out = _Output(self.tokenizer, cfg.stop)
        t0 = time.perf_counter()
        rounds = decode(self.big_runner, self.little_runner if cfg.policy != "ar" else None, ids, cfg,
                        self.eos_ids, stats)
        for new in rounds:
            stopped = out.add(new)
            if piece := out.pending_text(final=stopped):
                yield piece
            if stopped or (cancel is not None and cancel.is_set()):
                rounds.close()
                stats.finish_reason = "stop" if stopped else "cancelled"
                break
        stats.seconds = time.perf_counter() - t0
        stats.new_tokens = len(out.tokens)
        if piece := out.pending_text(final=True):
            yield piece
        yield GenerationResult(out.text(), out.tokens, stats)

    def encode(self, prompt) -> list[int]:
        """Prompt -> token ids, checked against the vocabulary and the context length."""
        ids = self._tokenize(prompt)
        if not ids:
            raise BildError("the prompt is empty", field="prompt")
        context = min(self.big_runner.max_length, self.little_runner.max_length)
        limit = context if self.encoder_decoder else context - 1
        if len(ids) > limit:
            raise BildError(f"the prompt is {len(ids)} tokens; the model's context is {context} tokens",
                            field="prompt")
        return ids

    def _tokenize(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids) if prompt else []
        if not isinstance(prompt, (list, tuple)):
            raise BildError(f"a prompt is a string, a list of token ids or a list of chat messages, "
                            f"not {type(prompt).__name__}", field="prompt")
        if all(isinstance(m, dict) for m in prompt) and prompt:
            return self._chat(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise BildError("a list prompt must hold only token ids or only chat messages", field="prompt")
        bad = [t for t in prompt if not 0 <= t < self.big_runner.vocab_size]
        if bad:
            raise BildError(f"token id {bad[0]} is outside the vocabulary (0..{self.big_runner.vocab_size - 1})",
                            field="prompt")
        return list(prompt)

    def _chat(self, messages: list[dict]) -> list[int]:
        if any(not isinstance(m.get("content"), str) or "role" not in m for m in messages):
            raise BildError("each chat message needs a 'role' and a string 'content'", field="prompt")
        if not all(m["content"] for m in messages):
            raise BildError("the prompt is empty", field="prompt")
        if not getattr(self.tokenizer, "chat_template", None):
            raise BildError("this tokenizer has no chat template; pass a plain string prompt", field="prompt")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


class Stream:
    """Iterate for text pieces (held back until no stop string can still match them); then read .result."""

    def __init__(self, run: Iterator[str | GenerationResult]):
        self._run = run
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        for item in self._run:
            if isinstance(item, GenerationResult):
                self.result = item
            else:
                yield item

    def close(self) -> None:
        """Stop generating (e.g. the client went away); the models are free for the next request."""
        self._run.close()


class _Output:
    """Generated tokens and text, with stop strings applied token by token, so every policy stops alike."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.cut: int | None = None  # text length at which a stop string begins
        self.emitted = 0

    def add(self, new: list[int]) -> bool:
        """Append a round's tokens; True when a stop string completed (later tokens are dropped)."""
        for t in new:
            self.tokens.append(t)
            if self.stop and self._find_stop():
                return True
        return False

    def _find_stop(self) -> bool:
        text = self._decode()
        hits = [i for s in self.stop if (i := text.find(s)) >= 0]
        if hits:
            self.cut = min(hits)
        return bool(hits)

    def _decode(self) -> str:
        return self.tokenizer.decode(self.tokens, skip_special_tokens=True)

    def text(self) -> str:
        return self._decode()[: self.cut]

    def pending_text(self, final: bool) -> str:
        """Text not yet emitted that can no longer change."""
        text = self.text()
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character may still be completed
                end -= 1
            if self.stop:
                end -= max(len(s) for s in self.stop) - 1
        if end <= self.emitted:
            return ""
        piece, self.emitted = text[self.emitted:end], end
        return piece


def gguf_little_runner(spec: str | None, big_runner, int8: bool):
    """-> (runner, its GGUF file or None) for the little model beside a big one read straight from its GGUF file:
    an early exit of it (None or early-exit:K), a little model directory (bild.drafts.gguf) or a GGUF file."""
    if spec is None or spec.startswith("early-exit"):
        return big_runner.early_exit(models.early_exit_layers(spec)), None
    if gguf_little.is_gguf_little(spec):  # a GGUF file's model with a reduced head or fewer layers
        return gguf_little.load(spec, int8=int8), models.gguf_file(gguf_little.read(spec).model)
    path = models.gguf_file(spec)
    if not models.reads_directly(path):
        raise BildError(f"the little model beside a GGUF big model must be a GGUF file the native engine reads "
                        f"directly, a little model directory or early-exit:K; got {spec!r}")
    return native.NativeRunner(native.gguf.load(path, int8=int8)), path


def _eos_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {i for i in ids if i is not None}
