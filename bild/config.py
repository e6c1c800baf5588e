"""Generation settings: one small dataclass that validates itself."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import BildError

POLICIES = ("ar", "little", "bild", "speculative")


@dataclass(slots=True)
class GenerationConfig:
    policy: str = "bild"
    max_new_tokens: int = 128
    temperature: float = 0.0      # 0 means greedy
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    fallback: float = 0.6         # α_FB: the little model hands over when its top probability is below this
    rollback: float = 5.0         # α_RB: rollback where −log p(little's token) exceeds this (math.inf disables)
    max_little: int = 10          # bild: the big model runs at least every max_little little tokens
    gamma: int = 5                # speculative: draft length (initial length when adaptive)
    adaptive: bool = False        # speculative: adapt gamma from the acceptance history
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in (self.stop or ()) if s)
        _check(self.policy in POLICIES, f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(_is_num(self.temperature) and self.temperature >= 0,
               f"temperature must be >= 0, got {self.temperature!r}")
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1),
               f"top_k must be an integer >= 1, got {self.top_k!r}")
        _check(self.top_p is None or (_is_num(self.top_p) and 0 < self.top_p <= 1),
               f"top_p must be in (0, 1], got {self.top_p!r}")
        _check(_is_num(self.fallback) and 0 <= self.fallback <= 1,
               f"fallback must be in [0, 1], got {self.fallback!r}")
        _check(_is_num(self.rollback) and self.rollback >= 0 and not math.isnan(self.rollback),
               f"rollback must be >= 0, got {self.rollback!r}")
        _check(_is_int(self.max_little) and self.max_little >= 1,
               f"max_little must be an integer >= 1, got {self.max_little!r}")
        _check(_is_int(self.gamma) and self.gamma >= 1, f"gamma must be an integer >= 1, got {self.gamma!r}")
        _check(self.seed is None or (_is_int(self.seed) and -2**63 <= self.seed < 2**64),
               f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BildError(message)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)
