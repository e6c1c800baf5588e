"""The kept ids of a reduced-vocabulary head: the tokens the big model emits on calibration prompts, ranked.

The big model greedy-decodes calibration prompts (code and chat) in batches on the native engine; its outputs are
cached as JSONL (one record a prompt), so a rerun decodes only what is missing. Ids rank by how often the big model
emitted them, ties and unseen ids by their frequency in calibration text, so any size can be cut from one ranking.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import torch

from .. import data
from ..bench.datasets import load_items


def calibration_prompts(n_code: int, n_chat: int) -> list[tuple[str, object]]:
    """(id, chat messages): HumanEval's calibration half (never its held-out half) and ShareGPT calibration turns."""
    code = [(i.id, i.prompt) for i in load_items("humaneval-calibration", n_code)] if n_code else []
    chat = [(f"sharegpt-calibration-{k:04d}", p) for k, p in enumerate(data.calibration_prompts(n_chat))] if n_chat else []
    return code + chat


def big_outputs(model, encode, prompts: list[tuple[str, object]], path: str, max_new_tokens: int, eos: set[int],
                stop: int, batch: int = 8, max_prompt_tokens: int = 1024, log=print) -> list[list[int]]:
    """The big model's greedy tokens for each prompt (cut after its first end-of-sequence token), read from the JSONL
    cache at `path` where present, decoded in batches of similar length and appended there otherwise. A batch ends
    once every row has emitted `stop` (the chat template's end of turn)."""
    from ..native import greedy_batch

    done = {}
    if os.path.isfile(path):
        with open(path) as f:
            done = {r["id"]: r["tokens"] for r in map(json.loads, f) if "tokens" in r}
    todo = [(pid, ids) for pid, ids in ((pid, encode(p)) for pid, p in prompts if pid not in done)
            if len(ids) <= max_prompt_tokens]
    todo.sort(key=lambda t: len(t[1]))  # similar lengths share a batch: less attention over padding
    with open(path, "a") as f:
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            out = greedy_batch(model, [ids for _, ids in chunk], max_new_tokens, 1, stop)
            for (pid, _), row in zip(chunk, out.topi[:, :, 0].tolist()):
                cut = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
                done[pid] = row[:cut]
                f.write(json.dumps({"id": pid, "tokens": done[pid]}) + "\n")
            f.flush()
            log(f"big outputs: {min(start + batch, len(todo))}/{len(todo)} prompts decoded")
    return [done[pid] for pid, _ in prompts if pid in done]


def rank(outputs: list[list[int]], text: list[int], vocab_size: int, always: list[int] = ()) -> list[int]:
    """Every id, most useful first: `always`, then by count in the big model's outputs, then by count in `text`,
    then by id."""
    emitted, seen = Counter(t for row in outputs for t in row), Counter(text)
    first = list(dict.fromkeys(int(i) for i in always))
    rest = sorted(set(range(vocab_size)) - set(first), key=lambda i: (-emitted[i], -seen[i], i))
    return first + rest


def coverage(outputs: list[list[int]], ranked: list[int], sizes: list[int]) -> dict[int, float]:
    """The share of the big model's output tokens that each head size keeps."""
    tokens = torch.tensor([t for row in outputs for t in row])
    order = torch.empty(max(ranked) + 1, dtype=torch.long)
    order[torch.tensor(ranked)] = torch.arange(len(ranked))  # id -> its rank
    ranks = order[tokens]
    return {n: int((ranks < n).sum()) / len(tokens) for n in sizes}
