"""Prediction alignment (BiLD) for a layer-dropped little model of a GGUF pair: low-rank deltas (LoRA) on its kept
layers, trained on the big model's greedy outputs for calibration prompts (token-level distillation with the big
model's tokens as labels), and measured by teacher-forced top-1 agreement with the big model on held-out outputs,
which is the acceptance at draft position 1 that the little would get.

The student is transformers' Qwen2 in float32 on the file's dequantised weights (only the kept layers, and the
head's kept rows); every base weight is frozen. Training resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROJECTIONS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}  # llama.cpp's Qwen2 names -> transformers' (q, k rows not permuted)


@dataclass(kw_only=True)
class HealConfig:
    rank: int = 16            # LoRA rank of every projection of every kept layer
    alpha: float = 32.0       # LoRA scale alpha / rank
    lr: float = 3e-4
    epochs: int = 1
    accumulate: int = 4       # sequences a step
    max_tokens: int = 768     # prompt + output tokens of a sequence (cut at the end)
    heldout: int = 12         # calibration sequences kept out of training, for the agreement measure
    eval_every: int = 10      # steps between agreement measures (and checkpoints)
    head: bool = field(default=False, metadata={"help": "LoRA on the head's kept rows too (a trained head, as an "
                                                         "early exit of the big model needs)"})
    seed: int = 0


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank delta: y = base(x) + (alpha / r) x A^T B^T, B starting at 0."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.a = nn.Parameter(torch.empty(rank, base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.a.T @ self.b.T) * self.scale

    def delta(self) -> Tensor:
        """The (out, in) weight delta this adds."""
        return (self.b @ self.a) * self.scale


def student(file: str, layers: list[int], kept: Tensor) -> nn.Module:
    """transformers' Qwen2 with the GGUF file's layers `layers` (in order) and a head over the token ids `kept`."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ..native import gguf

    cfg, theta = gguf.config(gguf.read(file))
    tensors = {t.name: t for t in GGUFReader(file).tensors}

    def weight(name: str) -> Tensor:
        t = tensors[name]
        return torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()

    hf = Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
                     num_hidden_layers=len(layers), num_attention_heads=cfg.n_heads,
                     num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=4096, rope_theta=theta,
                     rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(hf)
    state = {"model.embed_tokens.weight": weight("token_embd.weight"), "model.norm.weight": weight("output_norm.weight")}
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    for new, old in enumerate(layers):
        at = f"model.layers.{new}."
        for g, h in PROJECTIONS.items():
            state[at + h + ".weight"] = weight(f"blk.{old}.{g}.weight")
        for g in ("attn_q", "attn_k", "attn_v"):
            state[at + PROJECTIONS[g] + ".bias"] = weight(f"blk.{old}.{g}.bias")
        state[at + "input_layernorm.weight"] = weight(f"blk.{old}.attn_norm.weight")
        state[at + "post_attention_layernorm.weight"] = weight(f"blk.{old}.ffn_norm.weight")
    model.lm_head = nn.Linear(cfg.dim, len(kept), bias=False, device="meta")
    state["lm_head.weight"] = weight(head)[kept]
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(hf)  # rebuilt off the meta device
    return model.eval()


def add_lora(model: nn.Module, rank: int, alpha: float, head: bool = False) -> dict[str, LoRALinear]:
    """Freeze the model and wrap every projection of every layer: {"<layer>.<gguf name>": module}, and with head
    the head over the kept rows: {"head": module}."""
    for p in model.parameters():
        p.requires_grad_(False)
    added = {}
    if head:
        added["head"] = model.lm_head = LoRALinear(model.lm_head, rank, alpha)
    for i, layer in enumerate(model.model.layers):
        for g, h in PROJECTIONS.items():
            parent, name = h.split(".")
            owner = getattr(layer, parent)
            added[f"{i}.{g}"] = wrapped = LoRALinear(getattr(owner, name), rank, alpha)
            setattr(owner, name, wrapped)
    return added


def examples(prompts: list[list[int]], outputs: list[list[int]], kept: Tensor, vocab_size: int,
             max_tokens: int) -> list[dict]:
    """{"ids": prompt + output (cut), "labels": the next token's index in the head at output positions, else -100,
    "predicts": the positions that predict an output token (those outside the head too)}."""
    index = torch.full((vocab_size,), -100, dtype=torch.long)
    index[kept] = torch.arange(len(kept))
    out = []
    for p, o in zip(prompts, outputs):
        ids = torch.tensor((p + o)[:max_tokens])
        labels = torch.full_like(ids, -100)
        labels[len(p) - 1:-1] = index[ids[len(p):]]  # position t predicts token t + 1
        predicts = torch.zeros_like(ids, dtype=torch.bool)
        predicts[len(p) - 1:-1] = True
        if (labels >= 0).any():
            out.append({"ids": ids, "labels": labels, "predicts": predicts})
    return out


def loss_of(model: nn.Module, ex: dict) -> Tensor:
    logits = model(input_ids=ex["ids"][None]).logits[0]  # (T, kept)
    return F.cross_entropy(logits.float(), ex["labels"], ignore_index=-100)


@torch.no_grad()
def agreement(model: nn.Module, exs: list[dict]) -> float:
    """Teacher-forced top-1 agreement with the big model's tokens over the output positions (a big token outside
    the head counts as a miss)."""
    hit = total = 0
    for ex in exs:
        pred = model(input_ids=ex["ids"][None]).logits[0].argmax(-1)  # (T,)
        hit += int(((pred == ex["labels"]) & ex["predicts"]).sum())
        total += int(ex["predicts"].sum())
    return hit / max(total, 1)


def train(model: nn.Module, lora: dict[str, LoRALinear], train_exs: list[dict], heldout: list[dict],
          cfg: HealConfig, out: str, log=print) -> dict:
    """LoRA training with AdamW, resumable from out/heal.pt; logs out/log.jsonl; returns the last measures."""
    params = [p for m in lora.values() for p in (m.a, m.b)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    ckpt, step, seen, last = os.path.join(out, "heal.pt"), 0, 0, {}
    if os.path.isfile(ckpt):
        state = torch.load(ckpt)
        for k, m in lora.items():
            m.a.data.copy_(state["lora"][k]["a"]), m.b.data.copy_(state["lora"][k]["b"])
        opt.load_state_dict(state["optimizer"])
        step, seen = state["step"], state["seen"]
        log(f"resumed at step {step}")
        with open(os.path.join(out, "log.jsonl")) as f:
            last = [json.loads(line) for line in f][-1]  # what the run measured last, if it has no step left
    order = [i for e in range(cfg.epochs) for i in random.Random(cfg.seed + e).sample(range(len(train_exs)),
                                                                                           len(train_exs))]
    total = len(order) // cfg.accumulate
    t0 = time.perf_counter()
    with open(os.path.join(out, "log.jsonl"), "a") as f:
        if step == 0:
            last = {"step": 0, "agreement": agreement(model, heldout), "seconds": 0.0}
            f.write(json.dumps(last) + "\n"), f.flush()
            log(json.dumps(last))
        while step < total:
            model.train()
            batch = order[step * cfg.accumulate:(step + 1) * cfg.accumulate]
            for g in opt.param_groups:  # cosine decay over the whole run
                g["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = sum(loss_of(model, train_exs[i]) for i in batch) / len(batch)
            loss.backward()
            opt.step(), opt.zero_grad()
            step, seen = step + 1, seen + sum(int((train_exs[i]["labels"] >= 0).sum()) for i in batch)
            last = {"step": step, "loss": round(float(loss.detach()), 4), "tokens": seen,
                    "seconds": round(time.perf_counter() - t0, 1)}
            if step % cfg.eval_every == 0 or step == total:
                model.eval()
                last["agreement"] = agreement(model, heldout)
                torch.save({"lora": {k: {"a": m.a.data, "b": m.b.data} for k, m in lora.items()},
                            "optimizer": opt.state_dict(), "step": step, "seen": seen, "config": asdict(cfg)}, ckpt)
            f.write(json.dumps(last) + "\n"), f.flush()
            log(json.dumps(last))
    return last


def export(lora: dict[str, LoRALinear], path: str) -> int:
    """The deltas as bild.drafts.gguf reads them (scale folded into b, fp16; "head" over the kept rows in id order);
    returns the file's bytes."""
    from safetensors.torch import save_file

    tensors = {}
    for key, m in lora.items():
        tensors[key + ".a"] = m.a.detach().half().contiguous()
        tensors[key + ".b"] = (m.b.detach() * m.scale).half().contiguous()
    save_file(tensors, path)
    return os.path.getsize(path)
