"""Training little models: token-level KD and BiLD prediction alignment, on CPU (bf16 autocast where native).

Two data sources share one training loop:

- "aligned" (BiLD prediction alignment): the big model's own greedy continuations of calibration prompts,
  with its top-k logits cached once (`build_teacher_cache`). Generating costs one big forward per token and
  the logits needed for distillation come for free on the way, so every epoch and every experiment reuses
  them without running the big model again. Loss = w_kd * token-level KD (cross-entropy to the big model's
  renormalised top-k softmax) + w_ce * sequence-level KD (cross-entropy to the big model's greedy token).
- "text": ShareGPT conversations with the big model run online as the teacher (KL to its full softmax).

A teacher shard is a list of examples:
    {"ids": (L,) int64 prompt+continuation, "start": P-1 (first position whose next token was generated),
     "topv": (n, k) float16, "topi": (n, k) int32}   with n = L - P: position start+j predicts ids[start+j+1].

Progress: tqdm bar with ETA; JSONL log (loss, held-out top-1 agreement α over time); a checkpoint every
few minutes that `train` resumes from after an interruption (same seed, same data order).
"""

from __future__ import annotations

import glob
import json
import math
import os
import time
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
    max_shards: int | None = None     # stop after this many shards
    engine: str = "auto"              # native (batched, in the precision users decode with) | hf
    dtype: torch.dtype | None = None  # native only; None: native.fastest_dtype() (bf16, else fp16 weights, else fp32)
    features: bool = False            # native only: also keep the big model's final normed hidden states
    source: str = "aligned"           # aligned: greedy continuations of prompts | text: calibration ShareGPT text
    text_tokens: int = 1_000_000      # text: how many tokens, cut into max_prompt_tokens-long chunks
    turns: str = "first"              # aligned calibration prompts: first human turns, or later ones (data.py)

    def __post_init__(self):
        if self.split not in ("calibration", "heldout"):
            raise ValueError(f"split must be calibration or heldout, got {self.split!r}")
        if self.engine not in ("auto", "native", "hf"):
            raise ValueError(f"engine must be auto, native or hf, got {self.engine!r}")
        if (self.features or self.source == "text") and self.engine == "hf":
            raise ValueError("features and text caches come from the native engine; use engine auto or native")
        if self.source not in ("aligned", "text"):
            raise ValueError(f"source must be aligned or text, got {self.source!r}")
        if self.turns not in ("first", "later") or (self.split == "heldout" and self.turns != "first"):
            raise ValueError(f"turns must be first or later (held-out: first, as the benchmarks use), "
                             f"got {self.turns!r} for {self.split}")


def encode_prompts(tokenizer, prompts, max_tokens: int) -> list[list[int]]:
    """Chat-template each prompt; drop those longer than max_tokens (truncation would cut the template)."""
    encoded = [_as_ids(tokenizer.apply_chat_template(p, add_generation_prompt=True)) for p in prompts]
    return [ids for ids in encoded if len(ids) <= max_tokens]


def _as_ids(out) -> list[int]:
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)


def teacher_generator(big, tokenizer, cfg: TeacherConfig):
    """-> fn(prompts) -> examples. Native: a batched bf16 greedy loop (~500 tokens/s at batch 32 on the 2-core
    CPU, ~10x the HF loop below), the same big model `bild generate` decodes with by default."""
    from . import native
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


def text_teacher(big, cfg: TeacherConfig):
    """-> fn(chunks) -> examples over text itself: one native prefill per chunk gives the big model's top-k logits
    and (with cfg.features) its features at every position; no generation. Examples have start 0, and their
    targets are the big model's predictions, not the text's next tokens."""
    from . import native
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
    from . import data
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

@dataclass(slots=True)
class TrainConfig:
    out_dir: str
    teacher_dir: str | None = None     # aligned data (calibration teacher cache)
    teacher_shards: int | None = None  # use only the first n shards of it (pins the data for reproduction)
    heldout_dir: str | None = None     # held-out teacher cache for α
    lr: float = 1e-3
    warmup_steps: int = 5
    schedule: str = "constant"         # constant | cosine (to lr/10 at max_steps)
    batch_size: int = 8                # sequences per step
    max_len: int = 256                 # text mode: tokens per sequence
    data: str = "aligned"              # aligned | text | mix (recorded in the log)
    aligned_every: int = 1             # with both data sources: every n-th step is aligned, the rest text
    w_kd: float = 1.0                  # token-level KD weight
    w_ce: float = 1.0                  # sequence-level KD weight (cross-entropy to the big model's greedy token)
    w_reg: float = 1.0                 # feature drafts: smooth-L1 regression of the predicted features
    fc_lr_scale: float = 1.0           # feature drafts: the fc's learning rate relative to lr (its feature half
                                       # reads inputs ~14x the embedding's scale; see param_groups)
    draft_steps: int = 1               # feature drafts: train the first n draft tokens of a round (HASS unroll);
                                       # n > 1 also selects the best checkpoint by accept_est, not alpha
    max_steps: int = 10_000_000
    max_minutes: float = 10.0
    eval_every_minutes: float = 2.0
    ckpt_every_minutes: float = 5.0
    seed: int = 0
    threads: int = 2
    autocast: bool | None = None       # bf16 autocast on CPU; None: where the CPU has native bf16 (else emulated, slow)

    def __post_init__(self):
        if self.lr <= 0 or self.batch_size < 1 or self.fc_lr_scale <= 0 or self.draft_steps < 1:
            raise ValueError("lr and fc_lr_scale must be > 0, batch_size and draft_steps >= 1")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.schedule == "cosine" and self.max_steps >= 10_000_000:
            raise ValueError("a cosine schedule needs max_steps")


@dataclass(slots=True)
class TrainState:
    step: int = 0
    tokens: int = 0                    # loss positions seen
    seconds: float = 0.0               # training wall time, summed across resumes
    epoch: int = 0
    batch_in_epoch: int = 0
    best_score: float = -1.0           # best held-out value of best_key so far (best.pt holds that checkpoint)
    best_key: str = "alpha"            # alpha, or accept_est for feature drafts trained with draft_steps > 1


def vocab_lookup(draft, vocab_size: int) -> torch.Tensor | None:
    """(V,) map from token id to its column in a reduced head, -1 where not kept; None for a full head."""
    from .draft import ReducedHead
    head = draft.lm_head
    if not isinstance(head, ReducedHead):
        return None
    lookup = torch.full((vocab_size,), -1, dtype=torch.long)
    lookup[head.kept] = torch.arange(len(head.kept))
    return lookup


def student_logits(draft, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Draft logits at (row, col) `positions` only: (M, N) over the reduced head or (M, V) over the full one."""
    from .draft import ReducedHead
    hidden = draft.model(input_ids=ids).last_hidden_state        # (B, T, H)
    picked = hidden[positions[:, 0], positions[:, 1]]             # (M, H)
    head = draft.lm_head
    return head.reduced(picked) if isinstance(head, ReducedHead) else head(picked)


def topk_kd_loss(logits, topv, topi, greedy, lookup, w_kd: float, w_ce: float) -> tuple[torch.Tensor, dict]:
    """Cross-entropy to the teacher's renormalised top-k softmax (token KD) + to its greedy token (sequence KD).

    logits (M, N); topv/topi (M, k); greedy (M,). With a reduced head, teacher ids outside it are dropped.
    """
    logq = torch.log_softmax(logits.float(), dim=-1)                               # (M, N)
    cols, valid = topi.long(), torch.ones_like(topi, dtype=torch.bool)
    if lookup is not None:
        cols = lookup[cols]
        valid = cols >= 0
        cols = cols.clamp(min=0)
    p = torch.softmax(topv.float().masked_fill(~valid, float("-inf")), dim=-1)     # (M, k)
    p = torch.nan_to_num(p)                                                        # rows with nothing kept
    kd = -(p * logq.gather(1, cols)).sum(-1).mean()
    g = greedy.long() if lookup is None else lookup[greedy.long()]
    hit = g >= 0
    ce = -logq[hit].gather(1, g[hit][:, None]).mean() if hit.any() else logq.new_zeros(())
    return w_kd * kd + w_ce * ce, {"kd": kd.item(), "ce": ce.item()}


def pad_batch(examples: list[dict], pad_id: int) -> dict:
    """Right-pad aligned examples; gather loss positions and their teacher targets."""
    width = max(len(e["ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)             # (B, T)
    rows, cols, topv, topi = [], [], [], []
    out = {}
    if "feats" in examples[0]:  # feature drafts: the big model's features, (L - 1, dim) per example
        out["feats"] = torch.zeros(len(examples), width, examples[0]["feats"].shape[-1])  # (B, T, dim)
        out["feat_mask"] = torch.zeros(len(examples), width, dtype=torch.bool)  # (B, T): has a target feature
    for b, e in enumerate(examples):
        ids[b, :len(e["ids"])] = e["ids"]
        if out:
            out["feats"][b, :len(e["feats"])] = e["feats"].float()
            out["feat_mask"][b, :len(e["feats"])] = True
        n = len(e["topv"])
        rows.append(torch.full((n,), b))
        cols.append(torch.arange(e["start"], e["start"] + n))
        topv.append(e["topv"])
        topi.append(e["topi"])
    positions = torch.stack([torch.cat(rows), torch.cat(cols)], dim=1)             # (M, 2)
    return {"ids": ids, "positions": positions, "topv": torch.cat(topv), "topi": torch.cat(topi), **out}


def epoch_batches(examples: list[dict], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Deterministic length-grouped batches: shuffle, sort within windows of 16 batches, shuffle batches."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()
    window = batch_size * 16
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: len(examples[i]["ids"]))
        batches += [chunk[b:b + batch_size] for b in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


@torch.no_grad()
def agreement(draft, examples: list[dict], pad_id: int, batch_size: int = 8) -> dict:
    """Top-1 agreement α of the draft with the big model's greedy tokens (teacher-forced), and top-k coverage."""
    from . import feature_draft
    if isinstance(draft, feature_draft.FeatureDraft):
        return feature_draft.agreement(draft, examples, pad_id, batch_size)
    hits = total = 0
    for b in range(0, len(examples), batch_size):
        batch = pad_batch(examples[b:b + batch_size], pad_id)
        hidden = draft.model(input_ids=batch["ids"]).last_hidden_state                # (B, T, H)
        pos = batch["positions"]
        logits = draft.lm_head(hidden[pos[:, 0], pos[:, 1]][:, None])[:, 0]         # (M, V)
        hits += (logits.argmax(-1) == batch["topi"][:, 0].long()).sum().item()
        total += len(pos)
    return {"alpha": hits / max(total, 1), "positions": total}


def _checkpoint_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.out_dir, "ckpt.pt")


def save_checkpoint(cfg: TrainConfig, draft, big, optimizer, state: TrainState, best: bool = False) -> None:
    from dataclasses import asdict
    from .draft import unique_state
    blob = {"weights": {n: t.clone() for n, t in unique_state(draft, big).items()},
            "optimizer": optimizer.state_dict(), "state": asdict(state)}
    path = os.path.join(cfg.out_dir, "best.pt") if best else _checkpoint_path(cfg)
    if best:
        blob = {"weights": blob["weights"], "state": blob["state"]}
    torch.save(blob, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_weights(draft, big, weights: dict) -> None:
    from .draft import unique_state
    own = unique_state(draft, big)
    assert set(own) == set(weights), f"checkpoint does not match the draft: {sorted(set(own) ^ set(weights))[:5]}"
    with torch.no_grad():
        for name, tensor in weights.items():
            own[name].copy_(tensor)


def resume(cfg: TrainConfig, draft, big, optimizer) -> TrainState:
    path = _checkpoint_path(cfg)
    if not os.path.exists(path):
        return TrainState()
    blob = torch.load(path)
    load_weights(draft, big, blob["weights"])
    optimizer.load_state_dict(blob["optimizer"])
    saved = blob["state"]
    if "best_alpha" in saved:  # checkpoints before best_key existed
        saved["best_score"] = saved.pop("best_alpha")
    return TrainState(**saved)


def param_groups(draft: torch.nn.Module, params: list, cfg: TrainConfig) -> list[dict]:
    """One group, or two when fc_lr_scale != 1: a feature draft's fc apart. Adam moves every entry by about the
    learning rate whatever its gradient, and the fc's feature half multiplies features ~14x the embedding's scale,
    so at the common rate a draft started from a shallow one (fc = [I; 0]) drowns its token signal at once."""
    fc = getattr(draft, "fc", None)
    if cfg.fc_lr_scale == 1.0:
        return [{"params": params}]
    if fc is None:
        raise ValueError("fc_lr_scale applies to feature drafts only; this draft has no fc")
    own = {id(p) for p in fc.parameters()}
    return [{"params": [p for p in params if id(p) not in own]},
            {"params": [p for p in params if id(p) in own], "lr_scale": cfg.fc_lr_scale}]


def _lr(cfg: TrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    if cfg.schedule == "constant":
        return cfg.lr * warm
    progress = min(1.0, step / cfg.max_steps)
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _Log:
    def __init__(self, path: str):
        self.path = path

    def write(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def train(draft, big, cfg: TrainConfig, examples: list[dict] | None = None, heldout: list[dict] | None = None,
          pad_id: int = 0, text_batches=None, reload_examples=None) -> TrainState:
    """Train the draft's unique weights; resumes from cfg.out_dir/ckpt.pt if present.

    `examples`: aligned teacher examples (top-k KD). `text_batches(step) -> (B, T) ids`: online-teacher text KD.
    `reload_examples() -> examples`, if given, is called at each epoch boundary so a teacher cache that is
    still being generated in the background grows into the training data.
    """
    from . import native
    from .draft import trainable_parameters
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    for p in big.parameters():
        p.requires_grad_(False)
    if cfg.draft_steps > 1 and not hasattr(draft, "unroll"):
        raise ValueError("draft_steps applies to feature drafts only: other drafts never read their own features")
    params = trainable_parameters(draft, big)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(param_groups(draft, params, cfg), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    state = resume(cfg, draft, big, optimizer)
    autocast = native.bf16_supported() if cfg.autocast is None else cfg.autocast
    lookup = vocab_lookup(draft, big.config.vocab_size)
    log = _Log(os.path.join(cfg.out_dir, "log.jsonl"))
    log.write(event="start", step=state.step, tokens=state.tokens, config=_plain(cfg))
    budget = cfg.max_minutes * 60
    bar = tqdm(total=int(budget), initial=int(min(state.seconds, budget)), unit="s", desc="train",
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}s [{elapsed}<{remaining}] {postfix}")
    last_eval = last_ckpt = state.seconds
    batches = epoch_batches(examples, cfg.batch_size, cfg.seed, state.epoch) if examples else None
    if heldout and state.step == 0:
        _evaluate(draft, heldout, pad_id, state, log, cfg, big, optimizer)
    while state.step < cfg.max_steps and state.seconds < budget:
        t0 = time.time()
        draft.train()
        for group in optimizer.param_groups:
            group["lr"] = _lr(cfg, state.step) * group.get("lr_scale", 1.0)
        aligned = batches is not None and (text_batches is None or state.step % cfg.aligned_every == 0)
        if aligned:
            if state.batch_in_epoch >= len(batches):
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                examples = reload_examples() if reload_examples else examples
                log.write(event="epoch", epoch=state.epoch, step=state.step, examples=len(examples))
                batches = epoch_batches(examples, cfg.batch_size, cfg.seed, state.epoch)
            batch = pad_batch([examples[i] for i in batches[state.batch_in_epoch]], pad_id)  # outside autocast
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if aligned:
                loss, parts, n_tokens = _aligned_step(draft, batch, lookup, cfg)
            else:
                loss, parts, n_tokens = _text_step(draft, big, text_batches(state.step), lookup, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        state.step += 1
        state.batch_in_epoch += int(aligned)
        state.tokens += n_tokens
        dt = time.time() - t0
        state.seconds += dt
        bar.update(int(min(state.seconds, budget)) - bar.n)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{n_tokens / dt:.0f}", best=f"{state.best_score:.3f}")
        if state.step % 10 == 0:
            log.write(event="step", step=state.step, tokens=state.tokens, minutes=round(state.seconds / 60, 2),
                      loss=round(loss.item(), 4), **{k: round(v, 4) for k, v in parts.items()},
                      lr=_lr(cfg, state.step), tok_per_s=round(n_tokens / dt, 1))
        if heldout and state.seconds - last_eval >= cfg.eval_every_minutes * 60:
            _evaluate(draft, heldout, pad_id, state, log, cfg, big, optimizer)
            last_eval = state.seconds
        if state.seconds - last_ckpt >= cfg.ckpt_every_minutes * 60:
            save_checkpoint(cfg, draft, big, optimizer, state)
            last_ckpt = state.seconds
    if heldout:
        _evaluate(draft, heldout, pad_id, state, log, cfg, big, optimizer)
    save_checkpoint(cfg, draft, big, optimizer, state)
    bar.close()
    draft.eval()
    return state


def _aligned_step(draft, batch: dict, lookup, cfg: TrainConfig) -> tuple[torch.Tensor, dict, int]:
    from . import feature_draft
    if isinstance(draft, feature_draft.FeatureDraft):
        return feature_draft.aligned_loss(draft, batch, lookup, cfg.w_kd, cfg.w_ce, cfg.w_reg,
                                          steps=cfg.draft_steps)
    logits = student_logits(draft, batch["ids"], batch["positions"])
    loss, parts = topk_kd_loss(logits, batch["topv"], batch["topi"], batch["topi"][:, 0], lookup, cfg.w_kd, cfg.w_ce)
    return loss, parts, len(batch["positions"])


def _evaluate(draft, heldout, pad_id, state: TrainState, log: _Log, cfg: TrainConfig, big, optimizer) -> None:
    draft.eval()
    result = agreement(draft, heldout, pad_id)
    log.write(event="eval", step=state.step, tokens=state.tokens, minutes=round(state.seconds / 60, 2), **result)
    key = "accept_est" if cfg.draft_steps > 1 else "alpha"
    if key != state.best_key:  # a resumed run selecting on another measure starts its best afresh
        state.best_key, state.best_score = key, -1.0
    if result[key] > state.best_score:
        state.best_score = result[key]
        save_checkpoint(cfg, draft, big, optimizer, state, best=True)


def _text_step(draft, big, ids: torch.Tensor, lookup, cfg: TrainConfig):
    """Token-level KD on text: KL(big || draft) over the full (or kept) vocabulary at every position.

    With a reduced head the teacher's logits are computed over the kept ids only (renormalised there),
    which also trims the teacher's own head cost.
    """
    head = draft.lm_head
    with torch.no_grad():
        hidden_t = big.model(input_ids=ids).last_hidden_state[:, :-1]              # (B, T-1, H)
        teacher = (head.reduced(hidden_t) if lookup is not None else big.lm_head(hidden_t)).float()  # (B, T-1, N)
    hidden = draft.model(input_ids=ids).last_hidden_state[:, :-1]                  # (B, T-1, H)
    student = head.reduced(hidden) if lookup is not None else head(hidden)        # (B, T-1, N)
    logp = torch.log_softmax(teacher, -1)
    logq = torch.log_softmax(student.float(), -1)
    kd = (logp.exp() * (logp - logq)).sum(-1).mean()
    greedy = teacher.argmax(-1)                                                    # (B, T-1)
    ce = -logq.gather(-1, greedy[..., None]).mean()
    return cfg.w_kd * kd + cfg.w_ce * ce, {"kd": kd.item(), "ce": ce.item()}, greedy.numel()


def text_token_stream(tokenizer, max_tokens: int) -> list[int]:
    """Chat-templated calibration ShareGPT conversations, concatenated, in file order."""
    from . import data
    stream = []
    for conv in data.sharegpt_texts(heldout=False):
        stream += _as_ids(tokenizer.apply_chat_template(conv))
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


def _plain(cfg) -> dict:
    from dataclasses import asdict
    return asdict(cfg)
