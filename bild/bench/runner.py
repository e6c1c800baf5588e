"""The benchmark loop: methods interleaved per prompt, one JSONL record per (method, prompt), resumable.

Every record is written and flushed as one line, so Ctrl-C (or a kill) leaves a valid file; a torn last line
is dropped on the next start. Records already present are skipped; run.json pins the settings that must
not change between resumed runs.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

from ..errors import BildError
from . import methods as M
from .datasets import Item
from .quality import continuation_nll, humaneval_passed

RECORDS = "records.jsonl"
RUN = "run.json"
PINNED = ("big", "little", "dataset", "engine", "dtype", "activations", "max_new_tokens")
UNPINNED_DEFAULTS = {"activations": "fp32"}  # what runs recorded before a setting existed used
WARMUP_TOKENS = 8


def read_records(path: str, repair: bool = True) -> list[dict]:
    """Whole records of a JSONL file. A torn last line (no newline) is ignored, and with repair cut off the
    file so appending can resume; never repair a file another process may be writing."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    keep = data[: data.rfind(b"\n") + 1]
    records = []
    for line in keep.decode("utf-8").splitlines():
        if line.strip():
            records.append(json.loads(line))
    if repair and len(keep) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(keep))
    return records


def append_record(f, record: dict) -> None:
    f.write(json.dumps(record) + "\n")
    f.flush()


def schedule(item_ids: list[str], labels: list[str], done: set[tuple[str, str]]) -> list[tuple[str, str]]:
    """(prompt id, method) pairs still to run: prompt-major, so methods are interleaved per prompt."""
    return [(i, m) for i in item_ids for m in labels if (m, i) not in done]


def check_run(out_dir: str, settings: dict) -> None:
    """Write run.json on the first run; on later runs refuse settings that would mix incomparable records."""
    path = os.path.join(out_dir, RUN)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [k for k in PINNED if _pinned(old, k) != _pinned(settings, k)]
        if diff:
            raise BildError(f"{out_dir} holds records made with different settings "
                            f"({', '.join(f'{k}: {old.get(k)!r} then, {settings.get(k)!r} now' for k in diff)}); "
                            "use another -o directory", field="out")
        return
    with open(path, "w") as f:
        json.dump(settings, f, indent=2)


def _pinned(settings: dict, key: str):
    return settings.get(key, UNPINNED_DEFAULTS.get(key))


def check_params(records: list[dict], methods: list[M.Method]) -> None:
    by_label = {m.label: m.kwargs for m in methods}
    for r in records:
        if r["method"] in by_label and r.get("params", {}) != _jsonable(by_label[r["method"]]):
            raise BildError(f"records for {r['method']} were made with parameters {r.get('params')}", field="out")


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                load_average=list(os.getloadavg()), python=platform.python_version(), torch=torch.__version__,
                transformers=transformers.__version__, platform=platform.platform())


def run_bench(bl, items: list[Item], methods: list[M.Method], out_dir: str, max_new_tokens: int,
              settings: dict | None = None, progress: bool = True, timeout: float = 10.0,
              warmup: bool = True) -> list[dict]:
    """Run every (prompt, method) pair not yet in out_dir/records.jsonl; return all records."""
    os.makedirs(out_dir, exist_ok=True)
    runnable = []
    for m in methods:
        if why := M.available(m, bl):
            print(why, file=sys.stderr)
        else:
            runnable.append(m)
    check_run(out_dir, {**(settings or {}), "max_new_tokens": max_new_tokens})
    path = os.path.join(out_dir, RECORDS)
    records = read_records(path)
    check_params(records, runnable)
    done = {(r["method"], r["prompt_id"]) for r in records}
    by_id, by_label = {it.id: it for it in items}, {m.label: m for m in runnable}
    todo = schedule([it.id for it in items], list(by_label), done)
    if not todo:
        return records
    if warmup:  # first calls pay for allocation and kernel selection; keep them out of the timings
        for m in runnable:
            M.run(bl, m, items[0].prompt, min(WARMUP_TOKENS, max_new_tokens))
    bar = _progress(len(todo), progress)
    with open(path, "a", encoding="utf-8") as f:
        for item_id, label in todo:
            bar.set_postfix_str(f"{label} on {item_id}", refresh=False)
            record = run_one(bl, by_label[label], by_id[item_id], max_new_tokens, timeout)
            append_record(f, record)
            records.append(record)
            bar.update(1)
    bar.close()
    return records


def run_one(bl, method: M.Method, item: Item, max_new_tokens: int, timeout: float = 10.0) -> dict:
    fields = M.run(bl, method, item.prompt, max_new_tokens)
    record = {"method": method.label, "params": _jsonable(method.kwargs), "prompt_id": item.id, **fields}
    if bl.big is not None:  # fp32 maths, also for fp16 weights; after timing
        record["big_nll"] = continuation_nll(M.hf_models(bl)[0], bl.encode(item.prompt), fields["token_ids"])
    else:  # a pair read straight from GGUF files has no transformers model to score with: pass@1 is its measure
        record["big_nll"] = None
    record["passed"] = humaneval_passed(item.problem, fields["text"], timeout) if item.problem else None
    record["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record


def _jsonable(params: dict) -> dict:
    """inf is not JSON; store it as the string "inf" so params compare equal after a round trip."""
    return {k: ("inf" if isinstance(v, float) and v == float("inf") else v) for k, v in params.items()}


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, unit="gen", dynamic_ncols=True, file=sys.stderr)
