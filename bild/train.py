"""Teacher data: the big model's own greedy continuations of prompts, with its top-k logits cached.

Generating costs one big forward per token, and the logits needed for distillation come for free on
the way, so they are stored (top-k values fp16 + ids int32) and every experiment and epoch reuses them
without running the big model again.

A shard is a list of examples:
    {"ids": (L,) int64 prompt+continuation, "start": P-1 (first position whose next token was generated),
     "topv": (n, k) float16, "topi": (n, k) int32}   with n = L - P: position start+j predicts ids[start+j+1].
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import torch
from tqdm import tqdm


@dataclass(slots=True)
class TeacherConfig:
    out_dir: str
    split: str = "calibration"        # calibration | heldout
    n_prompts: int = 2000
    max_prompt_tokens: int = 256
    max_new_tokens: int = 128
    batch_size: int = 16
    top_k: int = 32
    shard_batches: int = 8            # write a shard every this many batches (resume skips written shards)

    def __post_init__(self):
        if self.split not in ("calibration", "heldout"):
            raise ValueError(f"split must be calibration or heldout, got {self.split!r}")


def encode_prompts(tokenizer, prompts, max_tokens: int) -> list[list[int]]:
    """Chat-template each prompt; drop those longer than max_tokens (truncation would cut the template)."""
    encoded = [_as_ids(tokenizer.apply_chat_template(p, add_generation_prompt=True)) for p in prompts]
    return [ids for ids in encoded if len(ids) <= max_tokens]


def _as_ids(out) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


@torch.no_grad()
def generate_batch(big, tokenizer, prompts: list[list[int]], cfg: TeacherConfig) -> list[dict]:
    """Greedy-continue a batch of token-id prompts (left padded); return one example per prompt.

    A plain prefill + step loop: on CPU it is several times faster than `generate()` at these sizes.
    """
    from transformers import DynamicCache
    eos = tokenizer.eos_token_id
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])        # (B, W)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])    # (B, W)
    cache, steps, done = DynamicCache(), [], torch.zeros(len(prompts), dtype=torch.bool)
    tokens = input_ids
    for _ in range(cfg.max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -tokens.shape[1]:]         # (B, t)
        logits = big(input_ids=tokens, attention_mask=mask, position_ids=positions,
                     past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (B, V)
        values, ids = logits.float().topk(cfg.top_k, dim=-1)                        # (B, k)
        steps.append((values.half(), ids.int()))
        tokens = ids[:, :1].long()                                                  # (B, 1) greedy
        done |= tokens[:, 0] == eos
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
        if done.all():
            break
    topv = torch.stack([v for v, _ in steps], dim=1)   # (B, S, k)
    topi = torch.stack([i for _, i in steps], dim=1)   # (B, S, k)
    generated = topi[:, :, 0].long()                   # (B, S): the greedy tokens
    return [_example(p, generated[b], topv[b], topi[b], eos) for b, p in enumerate(prompts)]


def _example(prompt: list[int], generated: torch.Tensor, topv, topi, eos: int) -> dict:
    n = len(generated)
    hits = (generated == eos).nonzero()
    if len(hits):
        n = int(hits[0]) + 1              # keep the EOS: predicting the stop is part of agreement
    ids = torch.cat([torch.tensor(prompt), generated[:n]])
    return {"ids": ids, "start": len(prompt) - 1, "topv": topv[:n].clone(), "topi": topi[:n].clone()}


def build_teacher_cache(big, tokenizer, cfg: TeacherConfig) -> str:
    """Write shards of teacher examples to cfg.out_dir; resumable (existing shards are skipped)."""
    from . import data
    os.makedirs(cfg.out_dir, exist_ok=True)
    source = data.calibration_prompts if cfg.split == "calibration" else data.heldout_prompts
    prompts = encode_prompts(tokenizer, source(cfg.n_prompts), cfg.max_prompt_tokens)
    per_shard = cfg.batch_size * cfg.shard_batches
    n_shards = (len(prompts) + per_shard - 1) // per_shard
    for s in tqdm(range(n_shards), desc=f"teacher {cfg.split}", unit="shard"):
        path = os.path.join(cfg.out_dir, f"shard_{s:04d}.pt")
        if os.path.exists(path):
            continue
        chunk = sorted(prompts[s * per_shard:(s + 1) * per_shard], key=len)   # less left padding per batch
        examples = []
        for b in range(0, len(chunk), cfg.batch_size):
            examples += generate_batch(big, tokenizer, chunk[b:b + cfg.batch_size], cfg)
        torch.save(examples, path + ".tmp")
        os.replace(path + ".tmp", path)
    return cfg.out_dir


def load_teacher_cache(directory: str, max_shards: int | None = None) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(directory, "shard_*.pt")))[:max_shards]
    return [ex for p in paths for ex in torch.load(p)]


def main(argv=None):
    import argparse
    from . import models
    ap = argparse.ArgumentParser(description="cache the big model's greedy outputs and top-k logits")
    ap.add_argument("out_dir")
    ap.add_argument("--big", default="smollm2-135m")
    ap.add_argument("--split", default="calibration")
    ap.add_argument("--n-prompts", type=int, default=2000)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    big, tok = models.load(a.big)
    cfg = TeacherConfig(a.out_dir, a.split, a.n_prompts, max_new_tokens=a.max_new_tokens,
                        batch_size=a.batch_size, top_k=a.top_k)
    build_teacher_cache(big, tok, cfg)


if __name__ == "__main__":
    main()
