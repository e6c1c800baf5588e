"""Benchmark prompts: ShareGPT held-out (or calibration, for tuning), HumanEval, or a JSONL file."""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import BildError

NAMES = ("sharegpt", "sharegpt-calibration", "humaneval", "humaneval-calibration", "humaneval-heldout", "jsonl:PATH")
CALIBRATION = ("sharegpt-calibration", "humaneval-calibration")  # what tuning may read: never a held-out set
HUMANEVAL_HALVES = {"humaneval": None, "humaneval-calibration": 0, "humaneval-heldout": 1}  # task number % 2


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    prompt: object               # str, token ids or chat messages
    problem: dict | None = None  # HumanEval problem, for pass@1


def load_items(spec: str, limit: int | None = None) -> list[Item]:
    if limit is not None and limit < 1:
        raise BildError(f"--limit must be >= 1, got {limit}", field="limit")
    if spec == "sharegpt":
        from ..data import heldout_prompts
        return [Item(f"heldout-{i:04d}", p) for i, p in enumerate(heldout_prompts(limit))]
    if spec == "sharegpt-calibration":
        from ..data import calibration_prompts
        return [Item(f"calibration-{i:04d}", p) for i, p in enumerate(calibration_prompts(limit))]
    if spec in HUMANEVAL_HALVES:  # a fixed split: even task numbers calibrate (bild tune), odd ones are held out
        from ..data import humaneval_problems, humaneval_prompts
        half = HUMANEVAL_HALVES[spec]
        pairs = [(p, m) for i, (p, m) in enumerate(zip(humaneval_problems(), humaneval_prompts()))
                 if half is None or i % 2 == half]
        return [Item(p["task_id"], m, p) for p, m in pairs[:limit]]
    if spec.startswith("jsonl:"):
        return read_jsonl_items(spec.removeprefix("jsonl:"))[:limit]
    raise BildError(f"unknown dataset {spec!r}; choose one of {', '.join(NAMES)}", field="dataset")


def read_jsonl_items(path: str) -> list[Item]:
    """One JSON object a line with "prompt" (a string) or "messages" (chat messages), optional "id"."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise BildError(f"cannot read dataset {path}: {e}", field="dataset") from e
    items, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise BildError(f"{path}:{n}: not JSON ({e})", field="dataset") from e
        items.append(_item(obj, f"{path}:{n}", default_id=str(len(items))))
        if items[-1].id in seen:
            raise BildError(f"{path}:{n}: duplicate id {items[-1].id!r}", field="dataset")
        seen.add(items[-1].id)
    if not items:
        raise BildError(f"dataset {path} has no prompts", field="dataset")
    return items


def _item(obj, where: str, default_id: str) -> Item:
    if not isinstance(obj, dict):
        raise BildError(f"{where}: expected an object with 'prompt' or 'messages'", field="dataset")
    prompt = obj.get("prompt", obj.get("messages"))
    if isinstance(prompt, str) and prompt:
        pass
    elif isinstance(prompt, list) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in prompt):
        pass
    else:
        raise BildError(f"{where}: needs a non-empty string 'prompt' or a list of {{role, content}} 'messages'",
                        field="dataset")
    return Item(str(obj.get("id", default_id)), prompt)
