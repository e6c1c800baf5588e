"""Benchmarks: methods (bild.bench.methods), datasets, the resumable runner, quality metrics, summaries, sweeps
and little-model designs. The `bild bench|sweep|tune` commands that drive them live in bild/cli/bench.py."""

from __future__ import annotations

from ..config import POLICIES, read_settings
from .methods import PARAMS

# what a tuned config may set for the bench: the parameters of its engine methods
TUNABLE = ("policy", *dict.fromkeys(k for name in POLICIES for k in PARAMS[name]))


def load_tuned(path: str) -> dict:
    """Decoding settings from a `bild tune` config (its "generate" section), checked; policy dropped."""
    settings = read_settings(path, allowed=TUNABLE, what="has settings bench cannot use")
    return {k: v for k, v in settings.items() if k != "policy"}
