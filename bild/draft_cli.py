"""Command-line front end for little-model work: `draft build|teacher|train|export|sweep` and `align`.

The main CLI calls `add_commands(subparsers)`; `python -m bild.draft_cli ...` runs them standalone.

    draft build   OUT                build an untrained draft from the big model and save it
    draft teacher OUT                cache the big model's greedy outputs + top-k logits on prompts
    draft train   RUN                train a run directory (made by `draft build --run`) on a teacher cache
    draft export  RUN OUT            measure the best checkpoint of a run and save it as a draft directory
    draft sweep   OUT                short runs of several recipes on one teacher cache; a table of α
    align         RUN                BiLD prediction alignment end to end: teacher caches, build, train, export
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict

import torch

DEFAULT_BIG = "smollm2-135m"
INIT_DIR = "draft_init"   # inside a run directory: the recipe (and vocab) the run trains


def add_commands(subparsers) -> None:
    draft = subparsers.add_parser("draft", help="build, train, export and sweep little (draft) models")
    sub = draft.add_subparsers(dest="draft_command", required=True)

    p = sub.add_parser("build", help="build an untrained draft from the big model and save it")
    _recipe_args(p)
    p.add_argument("out")
    p.set_defaults(handler=cmd_build)

    p = sub.add_parser("teacher", help="cache the big model's greedy outputs and top-k logits")
    p.add_argument("out")
    p.add_argument("--big", default=DEFAULT_BIG)
    _teacher_args(p, "calibration")
    p.set_defaults(handler=cmd_teacher)

    p = sub.add_parser("train", help="train a run directory on a teacher cache (resumes)")
    p.add_argument("run")
    _train_args(p)
    p.set_defaults(handler=cmd_train)

    p = sub.add_parser("export", help="measure a run's best checkpoint and save it as a draft directory")
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--heldout-dir", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("sweep", help="train recipes (optional), then measure every draft: size, c, α, speedups")
    p.add_argument("out")
    p.add_argument("--recipes", default="[]",
                   help='JSON list of {"name", "kind", "n_layers", "init", "vocab", "lr", "w_kd", "w_ce"} objects')
    p.add_argument("--drafts", nargs="*", default=[],
                   help="more little models to measure as they are: [NAME=]DRAFT_DIR or [NAME=]early-exit:K")
    p.add_argument("--prompts", type=int, default=10, help="held-out ShareGPT prompts for the measured speedups")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-measure", action="store_true", help="only train and export the recipes")
    p.add_argument("--dtype", default=None, help="engine dtype for the speed measurements (default: bild's choice)")
    _train_args(p, run_dir=False)
    p.set_defaults(handler=cmd_sweep)

    p = subparsers.add_parser("align", help="BiLD prediction alignment end to end (teacher caches, build, train, export)")
    p.add_argument("run")
    _recipe_args(p)
    _train_args(p)
    p.add_argument("--n-prompts", type=int, default=4000)
    p.add_argument("--n-heldout", type=int, default=72)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--export", default=None, help="export the best checkpoint to this draft directory")
    p.set_defaults(handler=cmd_align)


def _recipe_args(p) -> None:
    p.add_argument("--big", default=DEFAULT_BIG)
    p.add_argument("--kind", choices=("shallow", "early_exit", "feature"), default="shallow",
                   help="feature: layers that also read the big model's features (EAGLE); train on a teacher cache "
                        "made with --features")
    p.add_argument("--init-draft", default=None,
                   help="feature: start from this trained shallow draft (its layers, norm and head; fc passes the "
                        "token embedding through, so training starts from that draft's agreement)")
    p.add_argument("--layers", type=int, default=2, help="trainable layers (shallow) or shared layers (early exit)")
    p.add_argument("--init", choices=("first", "spread"), default="spread")
    p.add_argument("--init-layers", default="", help="explicit big layer ids, e.g. 0,29")
    p.add_argument("--exit-init", type=int, default=-1, help="early exit: big layer initialising the exit layer")
    p.add_argument("--vocab", type=int, default=0, help="reduced head over this many frequent tokens (0: full)")
    p.add_argument("--vocab-from", default="text",
                   help="token frequencies from 'text' (calibration ShareGPT) or a calibration teacher cache dir")
    p.add_argument("--run", action="store_true", help="build: OUT is a run directory (writes OUT/draft_init)")


def _teacher_args(p, split: str) -> None:
    p.add_argument("--split", default=split, choices=("calibration", "heldout"))
    p.add_argument("--n-prompts", type=int, default=4000)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--max-shards", type=int, default=None, help="stop after this many shards")
    p.add_argument("--features", action="store_true",
                   help="also store the big model's final hidden states (training data for feature drafts)")
    p.add_argument("--source", choices=("aligned", "text"), default="aligned",
                   help="aligned: the big model's greedy continuations of prompts; text: one prefill over "
                        "calibration ShareGPT text (--text-tokens of it), no generation")
    p.add_argument("--text-tokens", type=int, default=1_000_000)
    p.add_argument("--turns", choices=("first", "later"), default="first",
                   help="aligned calibration prompts: first human turns, or the later turns (each of at least "
                        "32 characters) on their own, as more prompts of the same kind")
    p.add_argument("--engine", choices=("auto", "native", "hf"), default="auto",
                   help="auto: the batched native engine in its fastest precision where supported (LLaMA family), "
                        "else the HF model")
    p.add_argument("--threads", type=int, default=2)


def _train_args(p, run_dir: bool = True) -> None:
    p.add_argument("--data", choices=("aligned", "text", "mix"), default="aligned",
                   help="aligned: cached big greedy outputs; text: ShareGPT with the big model online; mix: both")
    p.add_argument("--aligned-every", type=int, default=2, help="mix: every n-th step is aligned")
    p.add_argument("--teacher-dir", default="runs/teacher_cal",
                   help="calibration teacher cache; several, comma-separated, are read in that order")
    p.add_argument("--grow", action="store_true",
                   help="re-read the teacher cache at each epoch (it may still be generated in the background)")
    p.add_argument("--teacher-shards", type=int, default=None, help="use only the first n calibration shards")
    p.add_argument("--heldout-dir", default="runs/teacher_heldout")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="cosine: decay to lr/10 at --max-steps")
    p.add_argument("--w-kd", type=float, default=1.0)
    p.add_argument("--w-ce", type=float, default=1.0)
    p.add_argument("--w-reg", type=float, default=1.0, help="feature drafts: weight of the feature regression")
    p.add_argument("--fc-lr-scale", type=float, default=1.0,
                   help="feature drafts: the fc's learning rate as a multiple of --lr")
    p.add_argument("--draft-steps", type=int, default=1,
                   help="feature drafts: also train the 2nd..n-th draft token of a round on the draft's own features "
                        "(HASS); the best checkpoint is then chosen by accept_est")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall-time budget")
    p.add_argument("--max-steps", type=int, default=10_000_000, help="stop after this many steps (reproducible)")
    p.add_argument("--eval-every", type=float, default=2.0, help="minutes")
    p.add_argument("--ckpt-every", type=float, default=5.0, help="minutes")
    p.add_argument("--seed", type=int, default=0)
    if not any(a.dest == "threads" for a in p._actions):
        p.add_argument("--threads", type=int, default=2)
    if not any(a.dest == "big" for a in p._actions):
        p.add_argument("--big", default=DEFAULT_BIG)


# ----------------------------------------------------------------------------------------------- handlers

def _load_big(spec: str, threads: int):
    from . import models
    torch.set_num_threads(threads)
    big, tokenizer = models.load(spec)
    for p in big.parameters():
        p.requires_grad_(False)
    return big, tokenizer


def _recipe(args):
    from .drafts.recipe import DraftRecipe
    layers = [int(x) for x in args.init_layers.split(",") if x.strip()] if args.init_layers else []
    return DraftRecipe(kind=args.kind, big=args.big, n_layers=args.layers if not layers else len(layers),
                       init=args.init, init_layers=layers, exit_init=args.exit_init)


def _kept_ids(big, tokenizer, vocab: int, source: str | None, max_shards: int | None = None):
    """The `vocab` most frequent token ids of a calibration teacher cache, or of calibration text ("text")."""
    from .drafts.recipe import frequent_tokens
    from .training.teacher import load_teacher_cache, text_token_stream
    if not vocab:
        return None
    if source in (None, "text"):
        lists = [torch.tensor(text_token_stream(tokenizer, 1_000_000))]
    else:
        lists = [e["ids"] for e in load_teacher_cache(source, max_shards)]
    always = [tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id]
    always += tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    return frequent_tokens(lists, vocab, [i for i in always if isinstance(i, int) and i >= 0])


def build(big, tokenizer, args, out: str, run: bool):
    from .drafts.recipe import build_draft, save_draft
    recipe = _recipe(args)
    if getattr(args, "init_draft", None):
        return build_from_shallow(big, recipe, args.init_draft, os.path.join(out, INIT_DIR) if run else out)
    draft = build_draft(big, recipe, _kept_ids(big, tokenizer, args.vocab, args.vocab_from,
                                               getattr(args, "teacher_shards", None)))
    save_draft(draft, big, recipe, os.path.join(out, INIT_DIR) if run else out)
    return draft, recipe


def build_from_shallow(big, recipe, shallow_dir: str, out: str):
    """A feature draft with a trained shallow draft's layers, norm and head rows; see FeatureDraft.init_from_shallow."""
    from .drafts.heads import ReducedHead
    from .drafts.recipe import build_draft, load_draft, read_recipe, save_draft
    source = read_recipe(shallow_dir)
    if recipe.kind != "feature" or source.kind != "shallow":
        raise SystemExit("--init-draft takes a trained shallow draft and builds a feature draft (--kind feature)")
    shallow = load_draft(shallow_dir, big)
    recipe.n_layers, recipe.init_layers, recipe.init_draft = source.n_layers, source.init_layers, shallow_dir
    kept = shallow.lm_head.kept if isinstance(shallow.lm_head, ReducedHead) else None
    draft = build_draft(big, recipe, kept)
    draft.init_from_shallow(shallow)
    save_draft(draft, big, recipe, out)
    return draft, recipe


def cmd_build(args) -> None:
    big, tokenizer = _load_big(args.big, 2)
    _, recipe = build(big, tokenizer, args, args.out, args.run)
    print(json.dumps(asdict(recipe)))


def cmd_teacher(args) -> None:
    from .training.teacher import TeacherConfig, build_teacher_cache
    big, tokenizer = _load_big(args.big, args.threads)
    build_teacher_cache(big, tokenizer, TeacherConfig(args.out, args.split, args.n_prompts,
                                                      max_new_tokens=args.max_new_tokens,
                                                      batch_size=args.batch_size, top_k=args.top_k,
                                                      max_shards=args.max_shards, engine=args.engine,
                                                      features=args.features, source=args.source,
                                                      text_tokens=args.text_tokens, turns=args.turns))


def _train_config(args, out_dir: str):
    from .training.trainer import TrainConfig
    return TrainConfig(out_dir=out_dir, teacher_dir=args.teacher_dir, heldout_dir=args.heldout_dir, lr=args.lr,
                       warmup_steps=args.warmup, schedule=args.schedule, batch_size=args.batch_size,
                       w_kd=args.w_kd, w_ce=args.w_ce, w_reg=args.w_reg, fc_lr_scale=args.fc_lr_scale,
                       draft_steps=args.draft_steps,
                       max_minutes=args.minutes, max_steps=args.max_steps, teacher_shards=args.teacher_shards,
                       eval_every_minutes=args.eval_every, ckpt_every_minutes=args.ckpt_every, seed=args.seed,
                       threads=args.threads, aligned_every=args.aligned_every if args.data == "mix" else 1,
                       data=args.data)


def train_run(big, tokenizer, run: str, cfg, grow: bool = False):
    from .drafts.recipe import load_draft
    from .training.teacher import load_teacher_cache, text_batch_fn
    from .training.trainer import train
    draft = load_draft(os.path.join(run, INIT_DIR), big)   # the untrained init; train() resumes any checkpoint
    examples = load_teacher_cache(cfg.teacher_dir, cfg.teacher_shards) if cfg.data in ("aligned", "mix") else None
    text = text_batch_fn(tokenizer, cfg.batch_size, cfg.max_len, cfg.seed) if cfg.data in ("text", "mix") else None
    heldout = load_teacher_cache(cfg.heldout_dir) if cfg.heldout_dir else None
    if examples is not None:
        print(f"training {run}: {len(examples)} aligned examples, "
              f"{sum(len(e['topv']) for e in examples)} target tokens")
    reload = (lambda: load_teacher_cache(cfg.teacher_dir, cfg.teacher_shards)) if grow else None
    return train(draft, big, cfg, examples=examples, heldout=heldout, pad_id=tokenizer.eos_token_id,
                 text_batches=text, reload_examples=reload)


def cmd_train(args) -> None:
    big, tokenizer = _load_big(args.big, args.threads)
    train_run(big, tokenizer, args.run, _train_config(args, args.run), grow=args.grow)


def cmd_export(args) -> None:
    big, tokenizer = _load_big(args.big if hasattr(args, "big") else DEFAULT_BIG, args.threads)
    print(json.dumps(export(big, tokenizer, args.run, args.out, args.heldout_dir), indent=2))


def export(big, tokenizer, run: str, out: str, heldout_dir: str) -> dict:
    """Best checkpoint of a run -> draft directory with recipe metrics and metrics.json."""
    from .drafts.recipe import load_draft, parameter_counts, read_recipe, save_draft
    from .training.evaluate import agreement
    from .training.teacher import load_teacher_cache
    from .training.trainer import load_weights
    draft = load_draft(os.path.join(run, INIT_DIR), big)
    best = torch.load(os.path.join(run, "best.pt"))
    load_weights(draft, big, best["weights"])
    heldout = load_teacher_cache(heldout_dir)
    metrics = {**agreement(draft, heldout, tokenizer.eos_token_id), "alpha_measured_on":
               "top-1 agreement with the big model's greedy continuations of held-out ShareGPT prompts "
               "(teacher-forced)", "train_state": best["state"], **parameter_counts(draft, big),
               **decode_speed(big, draft, tokenizer)}
    metrics["cost_ratio"] = round(metrics["draft_ms_per_token"] / metrics["big_ms_per_token"], 4)
    recipe = read_recipe(os.path.join(run, INIT_DIR))
    recipe.metrics = metrics
    save_draft(draft, big, recipe, out)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics


@torch.no_grad()
def decode_speed(big, draft, tokenizer, n_tokens: int = 48, repeats: int = 3) -> dict:
    """ms per token of one-token-at-a-time cached decoding in the HF path (median over repeats); a feature draft,
    which only runs on the native engine, is timed there against the native big model."""
    from transformers import DynamicCache
    from .drafts.feature import FeatureDraft
    from .training.teacher import as_ids
    prompt = torch.tensor([as_ids(tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about cats."}],
                                                                 add_generation_prompt=True))]).long()
    if isinstance(draft, FeatureDraft):
        return native_decode_speed(big, draft, prompt[0].tolist(), n_tokens)

    def one(model) -> float:
        cache = DynamicCache()
        ids = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
        t = time.perf_counter()
        for _ in range(n_tokens):
            ids = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
        return (time.perf_counter() - t) / n_tokens * 1000

    big_ms = sorted(one(big) for _ in range(repeats))[repeats // 2]
    draft_ms = sorted(one(draft) for _ in range(repeats))[repeats // 2]
    return {"big_ms_per_token": round(big_ms, 2), "draft_ms_per_token": round(draft_ms, 2),
            "speed_threads": torch.get_num_threads()}


def native_decode_speed(big, draft, prompt: list[int], n_tokens: int) -> dict:
    """ms per one-token step of the native big model and of the feature draft (bench.designs.step_ms, median of
    n_tokens steps). The big model runs first, so its runner holds the prompt's features for the draft to read."""
    from .bench.designs import step_ms
    from .cache import make_runner
    big_runner = make_runner(big, "native")
    little = make_runner(draft, "native", share_with=big_runner)
    big_ms = step_ms(big_runner, prompt, steps=n_tokens)
    draft_ms = step_ms(little, prompt, steps=n_tokens)
    return {"big_ms_per_token": round(big_ms, 2), "draft_ms_per_token": round(draft_ms, 2),
            "speed_threads": torch.get_num_threads(), "speed_engine": f"native {big_runner.model.dtype}"}


def cmd_sweep(args) -> None:
    """Each recipe trains for --minutes on the same teacher cache and is exported; then every draft (trained
    here or given with --drafts) is measured side by side, see bild/bench/designs.py. Writes OUT/designs.md|json."""
    from .bench import designs as DS
    from .bench.datasets import load_items
    from .training.teacher import load_teacher_cache
    recipes = json.loads(args.recipes)
    todo = [DS.Design(r.get("name", f"r{i}"), os.path.join(args.out, f"r{i}", "draft")) for i, r in enumerate(recipes)]
    if recipes:
        big, tokenizer = _load_big(args.big, args.threads)
        for r, d in zip(recipes, todo):
            if not os.path.isfile(os.path.join(d.little, "bild_draft.json")):
                train_recipe(big, tokenizer, args, r, os.path.dirname(d.little), d.little)
        del big
    if args.no_measure:
        return
    torch.set_num_threads(args.threads)
    designs = todo + DS.as_designs(args.drafts)
    if not designs:
        raise SystemExit("draft sweep: nothing to measure; give --recipes and/or --drafts")
    prompts = [item.prompt for item in load_items("sharegpt", args.prompts)]
    rows = DS.sweep(args.big, designs, load_teacher_cache(args.heldout_dir), prompts, args.gamma,
                    args.max_new_tokens, args.dtype)
    DS.write(rows, args.out, {"big": args.big, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                              "gamma": args.gamma, "dtype": rows[0]["dtype"], "heldout_dir": args.heldout_dir,
                              "threads": args.threads,
                              "recipes": recipes, "drafts": args.drafts})
    print(DS.markdown(rows))


def train_recipe(big, tokenizer, args, recipe: dict, run: str, out: str) -> None:
    """Build (once), train for --minutes (resumable) and export one sweep recipe."""
    from types import SimpleNamespace
    spec = SimpleNamespace(big=args.big, kind=recipe.get("kind", "shallow"), layers=recipe.get("n_layers", 2),
                           init=recipe.get("init", "spread"), init_layers=recipe.get("init_layers", ""),
                           exit_init=recipe.get("exit_init", -1), vocab=recipe.get("vocab", 0),
                           vocab_from=args.teacher_dir, teacher_shards=args.teacher_shards)
    if not os.path.exists(os.path.join(run, INIT_DIR)):
        build(big, tokenizer, spec, run, run=True)
    cfg = _train_config(args, run)
    cfg.lr, cfg.w_kd, cfg.w_ce = recipe.get("lr", cfg.lr), recipe.get("w_kd", cfg.w_kd), recipe.get("w_ce", cfg.w_ce)
    train_run(big, tokenizer, run, cfg)
    export(big, tokenizer, run, out, args.heldout_dir)


def cmd_align(args) -> None:
    """Teacher caches (skipped when present) -> draft build -> training -> optional export."""
    from .training.teacher import TeacherConfig, build_teacher_cache
    big, tokenizer = _load_big(args.big, args.threads)
    for out, split, n in ((args.heldout_dir, "heldout", args.n_heldout), (args.teacher_dir, "calibration",
                                                                          args.n_prompts)):
        build_teacher_cache(big, tokenizer, TeacherConfig(out, split, n, max_new_tokens=args.max_new_tokens,
                                                          batch_size=32 if split == "calibration" else 24))
    if not os.path.exists(os.path.join(args.run, INIT_DIR)):
        args.vocab_from = args.vocab_from or args.teacher_dir
        build(big, tokenizer, args, args.run, run=True)
    train_run(big, tokenizer, args.run, _train_config(args, args.run), grow=args.grow)
    if args.export:
        print(json.dumps(export(big, tokenizer, args.run, args.export, args.heldout_dir), indent=2))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bild.draft_cli")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
