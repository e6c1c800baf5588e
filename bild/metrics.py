"""Per-generation statistics: a plain record, written as one JSON object (Spec-Bench style)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class Stats:
    policy: str = ""
    prompt_tokens: int = 0
    new_tokens: int = 0
    big_calls: int = 0          # big-model forward passes after the prompt
    little_calls: int = 0       # little-model forward passes after the prompt
    fallbacks: int = 0          # bild: little model handed over (top probability below α_FB)
    rollbacks: int = 0          # bild: a little token was replaced by the big model's
    accepted: list[int] = field(default_factory=list)  # little tokens kept at each big call
    drafted: list[int] = field(default_factory=list)   # little tokens proposed at each big call
    lookup_drafted: int = 0     # drafts copied from the context (prompt lookup) rather than the little model's
    lookup_accepted: int = 0    # ... of which the big model kept
    seconds: float = 0.0        # wall time including prefill
    finish_reason: str = ""     # "stop" (EOS or stop string), "length", or "cancelled" (stream's cancel event)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_big_call(self) -> float:
        """Mean tokens produced per big call (accepted little tokens + the big model's own)."""
        return self.new_tokens / self.big_calls if self.big_calls else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Share of proposed little tokens that were kept."""
        return sum(self.accepted) / sum(self.drafted) if sum(self.drafted) else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(tokens_per_s=self.tokens_per_s, tokens_per_big_call=self.tokens_per_big_call,
                 acceptance_rate=self.acceptance_rate)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def summary(self) -> str:
        return (f"{self.policy}: {self.new_tokens} tokens in {self.seconds:.2f} s = {self.tokens_per_s:.1f} tok/s | "
                f"big calls {self.big_calls}, little calls {self.little_calls}, "
                f"{self.tokens_per_big_call:.2f} tokens/big call, acceptance {self.acceptance_rate:.0%}, "
                f"fallbacks {self.fallbacks}, rollbacks {self.rollbacks}"
                + (f", looked up {self.lookup_accepted}/{self.lookup_drafted} kept" if self.lookup_drafted else ""))
