"""The training loop for little models, on CPU (bf16 autocast where native): one loop for both data sources.

Two data sources share one training loop:

- "aligned" (BiLD prediction alignment): the big model's own greedy continuations of calibration prompts,
  with its top-k logits cached once (`build_teacher_cache`). Generating costs one big forward per token and
  the logits needed for distillation come for free on the way, so every epoch and every experiment reuses
  them without running the big model again. Loss = w_kd * token-level KD (cross-entropy to the big model's
  renormalised top-k softmax) + w_ce * sequence-level KD (cross-entropy to the big model's greedy token).
- "text": ShareGPT conversations with the big model run online as the teacher (KL to its full softmax).

Progress: tqdm bar with ETA; JSONL log (loss, held-out top-1 agreement α over time); a checkpoint every
few minutes that `train` resumes from after an interruption (same seed, same data order).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from .. import native
from ..errors import BildError
from ..drafts.feature import FeatureDraft
from ..drafts.recipe import trainable_parameters, unique_state
from .evaluate import agreement
from .losses import feature_loss, pad_batch, student_logits, topk_kd_loss, vocab_lookup



@dataclass(slots=True)
class TrainConfig:
    """A training run's settings. The metadata's help, choices, flag and cli_default make the flags of
    `bild draft train|sweep` and `bild align` (bild.cli.args.add_fields)."""
    out_dir: str
    teacher_dir: str | None = field(default=None, metadata={  # aligned data (calibration teacher cache)
        "cli_default": "runs/teacher_cal",
        "help": "calibration teacher cache; several, comma-separated, are read in that order"})
    teacher_shards: int | None = field(default=None, metadata={  # pins the data for reproduction
        "help": "use only the first n calibration shards"})
    heldout_dir: str | None = field(default=None, metadata={  # held-out teacher cache for α
        "cli_default": "runs/teacher_heldout", "help": "held-out teacher cache (α)"})
    lr: float = 1e-3
    warmup_steps: int = field(default=5, metadata={"flag": "--warmup", "help": "warm-up steps"})
    schedule: str = field(default="constant", metadata={
        "choices": ("constant", "cosine"), "help": "cosine: decay to lr/10 at --max-steps"})
    batch_size: int = 8                # sequences per step
    max_len: int = 256                 # text mode: tokens per sequence
    data: str = field(default="aligned", metadata={  # recorded in the log
        "choices": ("aligned", "text", "mix"),
        "help": "aligned: cached big greedy outputs; text: ShareGPT with the big model online; mix: both"})
    aligned_every: int = field(default=1, metadata={  # with both data sources: every n-th step is aligned
        "cli_default": 2, "help": "mix: every n-th step is aligned"})
    w_kd: float = field(default=1.0, metadata={"help": "token-level KD weight"})
    w_ce: float = field(default=1.0, metadata={
        "help": "sequence-level KD weight (cross-entropy to the big model's greedy token)"})
    w_reg: float = field(default=1.0, metadata={"help": "feature drafts: weight of the feature regression"})
    # the fc's feature half reads inputs ~14x the embedding's scale; see param_groups
    fc_lr_scale: float = field(default=1.0, metadata={
        "help": "feature drafts: the fc's learning rate as a multiple of --lr"})
    draft_steps: int = field(default=1, metadata={
        "help": "feature drafts: also train the 2nd..n-th draft token of a round on the draft's own features "
                "(HASS); the best checkpoint is then chosen by accept_est"})
    max_steps: int = field(default=10_000_000, metadata={"help": "stop after this many steps (reproducible)"})
    max_minutes: float = field(default=10.0, metadata={"flag": "--minutes", "help": "training wall-time budget"})
    eval_every_minutes: float = field(default=2.0, metadata={"flag": "--eval-every", "help": "minutes"})
    ckpt_every_minutes: float = field(default=5.0, metadata={"flag": "--ckpt-every", "help": "minutes"})
    seed: int = 0
    threads: int = 2
    autocast: bool | None = None       # bf16 autocast on CPU; None: where the CPU has native bf16 (else emulated, slow)

    def __post_init__(self):
        if self.lr <= 0 or self.batch_size < 1 or self.fc_lr_scale <= 0 or self.draft_steps < 1:
            raise BildError("lr and fc_lr_scale must be > 0, batch_size and draft_steps >= 1")
        if self.schedule not in ("constant", "cosine"):
            raise BildError(f"schedule must be constant or cosine, got {self.schedule!r}", field="schedule")
        if self.schedule == "cosine" and self.max_steps >= 10_000_000:
            raise BildError("a cosine schedule needs max_steps", field="max_steps")


@dataclass(slots=True)
class TrainState:
    step: int = 0
    tokens: int = 0                    # loss positions seen
    seconds: float = 0.0               # training wall time, summed across resumes
    epoch: int = 0
    batch_in_epoch: int = 0
    best_score: float = -1.0           # best held-out value of best_key so far (best.pt holds that checkpoint)
    best_key: str = "alpha"            # alpha, or accept_est for feature drafts trained with draft_steps > 1



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




def _checkpoint_path(cfg: TrainConfig) -> str:
    return os.path.join(cfg.out_dir, "ckpt.pt")


def save_checkpoint(cfg: TrainConfig, draft, big, optimizer, state: TrainState, best: bool = False) -> None:
    blob = {"weights": {n: t.clone() for n, t in unique_state(draft, big).items()},
            "optimizer": optimizer.state_dict(), "state": asdict(state)}
    path = os.path.join(cfg.out_dir, "best.pt") if best else _checkpoint_path(cfg)
    if best:
        blob = {"weights": blob["weights"], "state": blob["state"]}
    torch.save(blob, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_weights(draft, big, weights: dict) -> None:
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
    os.makedirs(cfg.out_dir, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    for p in big.parameters():
        p.requires_grad_(False)
    if cfg.draft_steps > 1 and not isinstance(draft, FeatureDraft):
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
    if isinstance(draft, FeatureDraft):
        return feature_loss(draft, batch, lookup, cfg.w_kd, cfg.w_ce, cfg.w_reg,
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




def _plain(cfg) -> dict:
    return asdict(cfg)
