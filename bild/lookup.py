"""Drafting from the context itself (prompt lookup): no model runs, so these drafts cost nothing.

Code answers repeat their prompt and themselves: signatures, docstrings, names, whole lines. Where the last n
tokens of the sequence also stand earlier in it, the tokens that followed there are a likely continuation. The
loop (bild/loop.py) has the little model read them in the forward that drafts its next token and keep the prefix
it accepts: a proposal is deterministic (q = one-hot), so a proposal x is accepted with probability min(1, q[x])
and a rejection resamples from norm(max(q - one_hot(x), 0)), which is q with x removed. Every kept token is
then distributed as the little model's own draft would be, and the big model verifies them as such.
"""

from __future__ import annotations

import numpy as np


def lookup(seq: list[int], sizes: tuple[int, ...], limit: int) -> list[int]:
    """Up to `limit` tokens that followed the latest earlier occurrence of the last n tokens of seq, for the first
    n in `sizes` (longest first is the sensible order) that has one; [] when none does."""
    if limit < 1 or not sizes:
        return []
    arr = np.asarray(seq, dtype=np.int64)
    for n in sizes:
        if len(arr) <= n:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # (L - n, n): window i is arr[i:i+n]
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))  # earlier starts of the last n tokens
        if hits.size:
            start = int(hits[-1]) + n  # the latest, so the continuation is the nearest text's
            return arr[start:start + limit].tolist()
    return []
