"""Generation settings: one small dataclass that validates itself, and the names every front end shares.

Each field's metadata carries its help text; the CLI flags (bild.cli.args) and the server's request fields
(bild.server.schema) are generated from these fields, so a setting is typed here and nowhere else.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields

from .errors import BildError

POLICIES = ("ar", "little", "bild", "speculative")
ENGINES = ("auto", "hf", "native")
ACTIVATIONS = ("fp32", "int8")  # what the products of a model on GGUF blocks take
DEFAULT_BIG = "qwen2.5-coder-1.5b"  # with its little, qwen2.5-coder-0.5b (bild.models.PAIRS)
DRAFTS_BIG = "smollm2-135m"  # the draft tools' default: its teacher runs through transformers


@dataclass(slots=True)
class GenerationConfig:
    policy: str = field(default="bild", metadata={"help": f"one of {', '.join(POLICIES)}"})
    max_new_tokens: int = field(default=128, metadata={"help": "tokens to generate at most"})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_k: int | None = field(default=None, metadata={"help": "sample from the k most likely tokens only"})
    top_p: float | None = field(default=None, metadata={"help": "nucleus sampling: the smallest set holding p"})
    seed: int | None = field(default=None, metadata={"help": "random seed for sampling"})
    fallback: float = field(default=0.6, metadata={
        "help": "α_FB: the little model hands over when its top probability is below this"})
    rollback: float = field(default=5.0, metadata={
        "help": "α_RB: rollback where -log p(little's token) exceeds this; inf disables rollback"})
    max_little: int = field(default=10, metadata={
        "help": "bild: the big model runs at least every max_little little tokens"})
    gamma: int = field(default=5, metadata={"help": "speculative: draft length (initial length when adaptive)"})
    adaptive: bool = field(default=False, metadata={"help": "speculative: adapt gamma to the acceptance history"})
    lookup: int = field(default=0, metadata={
        "help": "bild/speculative: also draft by prompt lookup, copying what followed the latest earlier "
                "occurrence of the last n tokens, n from this down to 1; 0 = off"})
    stop: tuple[str, ...] = field(default=(), metadata={"help": "a stop string (repeatable)"})

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in (self.stop or ()) if s)
        _check(self.policy in POLICIES, "policy",
               f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1, "max_new_tokens",
               f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(_is_num(self.temperature) and self.temperature >= 0, "temperature",
               f"temperature must be >= 0, got {self.temperature!r}")
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1), "top_k",
               f"top_k must be an integer >= 1, got {self.top_k!r}")
        _check(self.top_p is None or (_is_num(self.top_p) and 0 < self.top_p <= 1), "top_p",
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_num(self.fallback) and 0 <= self.fallback <= 1, "fallback",
               f"fallback must be in [0, 1], got {self.fallback!r}")
        _check(_is_num(self.rollback) and self.rollback >= 0 and not math.isnan(self.rollback), "rollback",
               f"rollback must be >= 0, got {self.rollback!r}")
        _check(_is_int(self.max_little) and self.max_little >= 1, "max_little",
               f"max_little must be an integer >= 1, got {self.max_little!r}")
        _check(_is_int(self.gamma) and self.gamma >= 1, "gamma", f"gamma must be an integer >= 1, got {self.gamma!r}")
        _check(_is_int(self.lookup) and 0 <= self.lookup <= 16, "lookup",
               f"lookup must be an integer in 0..16, got {self.lookup!r}")
        _check(self.seed is None or (_is_int(self.seed) and -2**63 <= self.seed < 2**64), "seed",
               f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def lookup_sizes(self) -> tuple[int, ...]:
        """The n-gram sizes prompt lookup tries, longest first."""
        return tuple(range(self.lookup, 0, -1))


SETTINGS = tuple(f.name for f in fields(GenerationConfig))


def read_settings(path: str, allowed=SETTINGS, what: str = "has unknown settings") -> dict:
    """The decoding settings in a JSON file, as `bild tune --write` makes it (its "generate" section) or a plain
    object of GenerationConfig fields; "inf" may stand for math.inf. Settings outside `allowed` are refused."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise BildError(f"cannot read config {path}: {e}", field="config") from e
    settings = config.get("generate", config) if isinstance(config, dict) else None
    if not isinstance(settings, dict):
        raise BildError(f"config {path} must be a JSON object", field="config")
    if unknown := sorted(set(settings) - set(allowed)):
        raise BildError(f"config {path} {what}: {', '.join(unknown)}", field="config")
    return {k: (math.inf if v == "inf" else v) for k, v in settings.items()}


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise BildError(message, field=name)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)
