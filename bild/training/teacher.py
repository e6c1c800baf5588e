"""Teacher caches: the big model's own greedy continuations of calibration prompts with its top-k logits
(BiLD prediction alignment), and calibration text for online distillation.

A teacher shard is a list of examples:
    {"ids": (L,) int64 prompt+continuation, "start": P-1 (first position whose next token was generated),
     "topv": (n, k) float16, "topi": (n, k) int32}   with n = L - P: position start+j predicts ids[start+j+1].
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from .. import data, native
from ..config import ENGINES
from ..errors import BildError


@dataclass(slots=True)
class TeacherConfig:
    """A teacher cache's settings. The metadata's help, choices and cli_default make `bild draft teacher`'s flags
    (bild.cli.args.add_fields)."""
    out_dir: str
    split: str = field(default="calibration", metadata={"choices": ("calibration", "heldout")})
    n_prompts: int = field(default=2000, metadata={"cli_default": 4000})
    max_prompt_tokens: int = 256
    max_new_tokens: int = 128
    batch_size: int = field(default=16, metadata={"cli_default": 32})
    top_k: int = 32
    shard_batches: int = 8            # write a shard every this many batches (resume skips written shards)
    max_shards: int | None = field(default=None, metadata={"help": "stop after this many shards"})
    engine: str = field(default="auto", metadata={
        "choices": ENGINES, "help": "auto: the batched native engine in its fastest precision where supported "
                                    "(LLaMA family), else the HF model"})
    dtype: torch.dtype | None = None  # native only; None: native.fastest_dtype() (bf16, else fp16 weights, else fp32)
    features: bool = field(default=False, metadata={
        "help": "also store the big model's final hidden states (training data for feature drafts)"})
    source: str = field(default="aligned", metadata={
        "choices": ("aligned", "text"), "help": "aligned: the big model's greedy continuations of prompts; text: one "
                                               "prefill over calibration ShareGPT text (--text-tokens of it), no "
                                               "generation"})
    text_tokens: int = 1_000_000      # text: how many tokens, cut into max_prompt_tokens-long chunks
    turns: str = field(default="first", metadata={
        "choices": ("first", "later"), "help": "aligned calibration prompts: first human turns, or the later turns "
                                              "(each of at least 32 characters) on their own, as more prompts of "
                                              "the same kind"})

    def __post_init__(self):
        if self.split not in ("calibration", "heldout"):
            raise BildError(f"split must be calibration or heldout, got {self.split!r}", field="split")
        if self.engine not in ENGINES:
            raise BildError(f"engine must be {', '.join(ENGINES)}, got {self.engine!r}", field="engine")
        if (self.features or self.source == "text") and self.engine == "hf":
            raise BildError("features and text caches come from the native engine; use engine auto or native",
                            field="engine")
        if self.source not in ("aligned", "text"):
            raise BildError(f"source must be aligned or text, got {self.source!r}", field="source")
        if self.turns not in ("first", "later") or (self.split == "heldout" and self.turns != "first"):
            raise BildError(f"turns must be first or later (held-out: first, as the benchmarks use), "
                            f"got {self.turns!r} for {self.split}", field="turns")


def encode_prompts(tokenizer, prompts, max_tokens: int) -> list[list[int]]:
    """Chat-template each prompt; drop those longer than max_tokens (truncation would cut the template)."""
    encoded = [as_ids(tokenizer.apply_chat_template(p, add_generation_prompt=True)) for p in prompts]
    return [ids for ids in encoded if len(ids) <= max_tokens]


def as_ids(out) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def teacher_generator(big, tokenizer, cfg: TeacherConfig):
    """-> fn(prompts) -> examples. Native: a batched bf16 greedy loop (~500 tokens/s at batch 32 on the 2-core
    CPU, ~10x the HF loop below), the same big model `bild generate` decodes with by default."""
    use_native = cfg.engine == "native" or (cfg.engine == "auto" and native.supports(big))
    if not use_native:
        return lambda prompts: generate_batch(big, tokenizer, prompts, cfg)
    model, eos = native.from_hf(big, cfg.dtype), tokenizer.eos_token_id

    def generate(prompts: list[list[int]]) -> list[dict]:
        out = native.greedy_batch(model, prompts, cfg.max_new_tokens, cfg.top_k, eos, cfg.features)
        examples = [_example(p, out.topi[b, :, 0], out.topv[b].half(), out.topi[b].int(), eos)
                    for b, p in enumerate(prompts)]  # topv, topi (B, S, k)
        for e, f in zip(examples, out.features or []):
            e["feats"] = f[:len(e["ids"]) - 1].to(torch.bfloat16, copy=True)  # (L - 1, dim): row j predicts ids[j + 1]
        return examples
    return generate


@torch.no_grad()
def generate_batch(big, tokenizer, prompts: list[list[int]], cfg: TeacherConfig) -> list[dict]:
    """Greedy-continue a batch of token-id prompts (left padded) with the HF model; one example per prompt.

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
                     cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (B, V)
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


def text_teacher(big, cfg: TeacherConfig):
    """-> fn(chunks) -> examples over text itself: one native prefill per chunk gives the big model's top-k logits
    and (with cfg.features) its features at every position; no generation. Examples have start 0, and their
    targets are the big model's predictions, not the text's next tokens."""
    model = native.from_hf(big, cfg.dtype)
    width = cfg.max_prompt_tokens
    cache = native.allocate_cache(model.config, width, model.dtype)
    feats = torch.empty(width, model.config.dim, dtype=model.dtype)

    def run(chunks: list[list[int]]) -> list[dict]:
        out = []
        for ids in chunks:
            n = len(ids) - 1  # position j predicts ids[j + 1]
            logits = native.forward(model, cache, torch.tensor(ids), 0, len(ids), feats)[:n]  # (n, V)
            topv, topi = logits.topk(cfg.top_k, dim=-1)  # (n, k) each
            example = {"ids": torch.tensor(ids), "start": 0, "topv": topv.half(), "topi": topi.int()}
            if cfg.features:
                example["feats"] = feats[:n].to(torch.bfloat16, copy=True)  # (n, dim); feats is reused
            out.append(example)
        return out
    return run


def teacher_inputs(tokenizer, cfg: TeacherConfig) -> list[list[int]]:
    """What one teacher example starts from: chat-templated prompts, or chunks of calibration text."""
    if cfg.source == "text":
        if cfg.split != "calibration":
            raise ValueError("text teacher caches are for training: use the calibration split")
        stream = text_token_stream(tokenizer, cfg.text_tokens)[:cfg.text_tokens]
        width = cfg.max_prompt_tokens
        return [stream[i:i + width] for i in range(0, len(stream) - width + 1, width)]
    prompts = (data.heldout_prompts(cfg.n_prompts) if cfg.split == "heldout"
               else data.calibration_prompts(cfg.n_prompts, turns=cfg.turns))
    return encode_prompts(tokenizer, prompts, cfg.max_prompt_tokens)


def build_teacher_cache(big, tokenizer, cfg: TeacherConfig) -> str:
    """Write shards of teacher examples to cfg.out_dir; resumable (existing shards are skipped)."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    prompts = teacher_inputs(tokenizer, cfg)
    per_shard = cfg.batch_size * cfg.shard_batches
    n_shards = min((len(prompts) + per_shard - 1) // per_shard, cfg.max_shards or 10**9)
    generate = text_teacher(big, cfg) if cfg.source == "text" else teacher_generator(big, tokenizer, cfg)
    for s in tqdm(range(n_shards), desc=f"teacher {cfg.split}", unit="shard"):
        path = os.path.join(cfg.out_dir, f"shard_{s:04d}.pt")
        if os.path.exists(path):
            continue
        chunk = sorted(prompts[s * per_shard:(s + 1) * per_shard], key=len)   # less left padding per batch
        examples = []
        for b in range(0, len(chunk), cfg.batch_size):
            examples += generate(chunk[b:b + cfg.batch_size])
        torch.save(examples, path + ".tmp")
        os.replace(path + ".tmp", path)
    return cfg.out_dir


def load_teacher_cache(directory: str, max_shards: int | None = None) -> list[dict]:
    """Every example of a teacher cache; `directory` may name several, comma-separated, read in that order.
    max_shards counts shards over all of them."""
    paths = [p for d in directory.split(",") for p in sorted(glob.glob(os.path.join(d, "shard_*.pt")))][:max_shards]
    return [ex for p in paths for ex in torch.load(p)]


# ----------------------------------------------------------------------------------------------- training


def text_token_stream(tokenizer, max_tokens: int) -> list[int]:
    """Chat-templated calibration ShareGPT conversations, concatenated, in file order."""
    stream = []
    for conv in data.sharegpt_texts(heldout=False):
        stream += as_ids(tokenizer.apply_chat_template(conv))
        if len(stream) > max_tokens:
            break
    return stream


def text_batch_fn(tokenizer, batch_size: int, max_len: int, seed: int = 0, max_tokens: int = 1_500_000):
    """(step) -> (B, max_len) ids cut from calibration ShareGPT conversations (deterministic order)."""
    stream = text_token_stream(tokenizer, max_tokens)
    chunks = torch.tensor(stream[:len(stream) // max_len * max_len]).view(-1, max_len)   # (C, T)
    order = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(seed))

    def batch(step: int) -> torch.Tensor:
        start = step * batch_size % (len(chunks) - batch_size)
        return chunks[order[start:start + batch_size]]
    return batch


