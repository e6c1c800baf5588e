"""`bild draft build|teacher|train|export|sweep` and `bild align`: little-model work.

    draft build   OUT                build an untrained draft from the big model and save it
    draft teacher OUT                cache the big model's greedy outputs + top-k logits on prompts
    draft train   RUN                train a run directory (made by `draft build --run`) on a teacher cache
    draft export  RUN OUT            measure the best checkpoint of a run and save it as a draft directory
    draft sweep   OUT                short runs of several recipes on one teacher cache; a table of α (a GGUF
                                     pair: its --drafts measured side by side, bild/bench/littles.py)
    draft vocab   OUT                GGUF pairs: rank the big model's output tokens; reduced-head littles
    draft layers  OUT                GGUF pairs: layer influence; layer-dropped littles (untrained)
    align         RUN                BiLD prediction alignment end to end: teacher caches, build, train, export

Training code (bild.training, torch) is imported inside the handlers, and the teacher and training flags, which
come from TeacherConfig's and TrainConfig's fields, are added when their command is parsed (LazyParser): so
`bild generate` never imports training.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

from ..config import DRAFTS_BIG
from ..errors import BildError
from .args import LazyParser, add_fields, given

INIT_DIR = "draft_init"   # inside a run directory: the recipe (and vocab) the run trains
# TrainConfig fields that are no flags: the run directory is positional; max_len and autocast are library-only
TRAIN_SKIP = ("out_dir", "max_len", "autocast")
TEACHER_FLAGS = ("split", "n_prompts", "max_new_tokens", "batch_size", "top_k", "max_shards", "features", "source",
                  "text_tokens", "turns", "engine")


def add_commands(subparsers) -> None:
    """Add `draft` and `align` to `subparsers` (an add_subparsers(parser_class=LazyParser) action)."""
    draft = subparsers.add_parser("draft", help="build, train, export and sweep little (draft) models")
    sub = draft.add_subparsers(dest="draft_command", required=True, parser_class=LazyParser)

    p = sub.add_parser("build", help="build an untrained draft from the big model and save it")
    _recipe_args(p)
    p.add_argument("out")
    p.set_defaults(handler=cmd_build)

    sub.add_parser("teacher", help="cache the big model's greedy outputs and top-k logits", fill=_teacher_command)
    sub.add_parser("train", help="train a run directory on a teacher cache (resumes)", fill=_train_command)

    p = sub.add_parser("export", help="measure a run's best checkpoint and save it as a draft directory")
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--heldout-dir", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_export)

    sub.add_parser("sweep", help="train recipes (optional), then measure every draft: size, c, α, speedups",
                   fill=_sweep_command)
    from .draft_gguf import add_heal_command, add_layers_command, add_vocab_command
    add_vocab_command(sub)
    add_layers_command(sub)
    add_heal_command(sub)
    subparsers.add_parser("align", help="BiLD prediction alignment end to end (teacher caches, build, train, export)",
                          fill=_align_command)


def _teacher_command(p) -> None:
    from ..training.teacher import TeacherConfig
    p.add_argument("out")
    p.add_argument("--big", default=DRAFTS_BIG)
    add_fields(p, TeacherConfig, TEACHER_FLAGS)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_teacher)


def _train_command(p) -> None:
    p.add_argument("run")
    _train_args(p)
    p.set_defaults(handler=cmd_train)


def _sweep_command(p) -> None:
    p.add_argument("out")
    p.add_argument("--recipes", default="[]",
                   help='JSON list of {"name", "kind", "n_layers", "init", "vocab", "lr", "w_kd", "w_ce"} objects')
    p.add_argument("--drafts", nargs="*", default=[],
                   help="more little models to measure as they are: [NAME=]DRAFT_DIR or [NAME=]early-exit:K")
    p.add_argument("--prompts", type=int, default=10, help="held-out prompts for the measured speedups")
    p.add_argument("--dataset", default=None, help="GGUF pairs: the bench dataset of those prompts "
                                                   "(default humaneval-heldout); else held-out ShareGPT")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--no-measure", action="store_true", help="only train and export the recipes")
    p.add_argument("--dtype", default=None, help="engine dtype for the speed measurements (default: bild's choice)")
    _train_args(p)
    p.set_defaults(handler=cmd_sweep)


def _align_command(p) -> None:
    from ..training.teacher import TeacherConfig
    p.add_argument("run")
    _recipe_args(p)
    _train_args(p, big=False)
    add_fields(p, TeacherConfig, ["n_prompts"])
    p.add_argument("--n-heldout", type=int, default=72)
    add_fields(p, TeacherConfig, ["max_new_tokens"])
    p.add_argument("--export", default=None, help="export the best checkpoint to this draft directory")
    p.set_defaults(handler=cmd_align)


def _recipe_args(p) -> None:
    p.add_argument("--big", default=DRAFTS_BIG)
    add_fields(p, Recipe, RECIPE_FLAGS)
    p.add_argument("--run", action="store_true", help="build: OUT is a run directory (writes OUT/draft_init)")


def _train_args(p, big: bool = True) -> None:
    """TrainConfig's flags, --grow, and --big unless the command has it already (from _recipe_args)."""
    from ..training.trainer import TrainConfig
    add_fields(p, TrainConfig, skip=TRAIN_SKIP)
    p.add_argument("--grow", action="store_true",
                   help="re-read the teacher cache at each epoch (it may still be generated in the background)")
    if big:
        p.add_argument("--big", default=DRAFTS_BIG)


@dataclass(slots=True)
class Recipe:
    """How `build` makes a draft: the recipe flags (RECIPE_FLAGS), or a `draft sweep` recipe object."""
    big: str = DRAFTS_BIG
    kind: str = field(default="shallow", metadata={
        "choices": ("shallow", "early_exit", "feature"),
        "help": "feature: layers that also read the big model's features (EAGLE); train on a teacher cache made "
                "with --features"})
    init_draft: str | None = field(default=None, metadata={
        "help": "feature: start from this trained shallow draft (its layers, norm and head; fc passes the token "
                "embedding through, so training starts from that draft's agreement)"})
    layers: int = field(default=2, metadata={"help": "trainable layers (shallow) or shared layers (early exit)"})
    init: str = field(default="spread", metadata={"choices": ("first", "spread")})
    init_layers: str = field(default="", metadata={"help": "explicit big layer ids, e.g. 0,29"})
    exit_init: int = field(default=-1, metadata={"help": "early exit: big layer initialising the exit layer"})
    vocab: int = field(default=0, metadata={"help": "reduced head over this many frequent tokens (0: full)"})
    vocab_from: str | None = field(default="text", metadata={
        "help": "token frequencies from 'text' (calibration ShareGPT) or a calibration teacher cache dir"})
    teacher_shards: int | None = None  # of the vocab_from teacher cache

    @classmethod
    def of(cls, args, **kwargs) -> Recipe:
        """The recipe flags given in args (the rest: Recipe's defaults), with --big."""
        return cls(big=args.big, **given(args, cls, RECIPE_FLAGS), **kwargs)

    def draft_recipe(self):
        from ..drafts.recipe import DraftRecipe
        layers = [int(x) for x in self.init_layers.split(",") if x.strip()] if self.init_layers else []
        return DraftRecipe(kind=self.kind, big=self.big, n_layers=self.layers if not layers else len(layers),
                           init=self.init, init_layers=layers, exit_init=self.exit_init)


RECIPE_FLAGS = ("kind", "init_draft", "layers", "init", "init_layers", "exit_init", "vocab", "vocab_from")
SWEEP_RECIPE = {"kind": "kind", "n_layers": "layers", "init": "init", "init_layers": "init_layers",
                "exit_init": "exit_init", "vocab": "vocab"}  # a sweep recipe's keys -> Recipe fields


def _train_config(args, out_dir: str):
    """TrainConfig from the training flags given (a single data source trains every step on it)."""
    from ..training.trainer import TrainConfig
    settings = given(args, TrainConfig)
    if settings.get("data") != "mix":
        settings.pop("aligned_every", None)
    return TrainConfig(**{**settings, "out_dir": out_dir})


# ----------------------------------------------------------------------------------------------- handlers

def _load_big(spec: str, threads: int):
    import torch

    from .. import models
    torch.set_num_threads(threads)
    big, tokenizer = models.load(spec)
    for p in big.parameters():
        p.requires_grad_(False)
    return big, tokenizer


def _kept_ids(big, tokenizer, vocab: int, source: str | None, max_shards: int | None = None):
    """The `vocab` most frequent token ids of a calibration teacher cache, or of calibration text ("text")."""
    import torch

    from ..drafts.recipe import frequent_tokens
    from ..training.teacher import load_teacher_cache, text_token_stream
    if not vocab:
        return None
    if source in (None, "text"):
        lists = [torch.tensor(text_token_stream(tokenizer, 1_000_000))]
    else:
        lists = [e["ids"] for e in load_teacher_cache(source, max_shards)]
    always = [tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id]
    always += tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    return frequent_tokens(lists, vocab, [i for i in always if isinstance(i, int) and i >= 0])


def build(big, tokenizer, spec: Recipe, out: str, run: bool):
    from ..drafts.recipe import build_draft, save_draft
    recipe = spec.draft_recipe()
    if spec.init_draft:
        return build_from_shallow(big, recipe, spec.init_draft, os.path.join(out, INIT_DIR) if run else out)
    draft = build_draft(big, recipe, _kept_ids(big, tokenizer, spec.vocab, spec.vocab_from, spec.teacher_shards))
    save_draft(draft, big, recipe, os.path.join(out, INIT_DIR) if run else out)
    return draft, recipe


def build_from_shallow(big, recipe, shallow_dir: str, out: str):
    """A feature draft with a trained shallow draft's layers, norm and head rows; see FeatureDraft.init_from_shallow."""
    from ..drafts.heads import ReducedHead
    from ..drafts.recipe import build_draft, load_draft, read_recipe, save_draft
    source = read_recipe(shallow_dir)
    if recipe.kind != "feature" or source.kind != "shallow":
        raise BildError("--init-draft takes a trained shallow draft and builds a feature draft (--kind feature)",
                        field="init_draft")
    shallow = load_draft(shallow_dir, big)
    recipe.n_layers, recipe.init_layers, recipe.init_draft = source.n_layers, source.init_layers, shallow_dir
    kept = shallow.lm_head.kept if isinstance(shallow.lm_head, ReducedHead) else None
    draft = build_draft(big, recipe, kept)
    draft.init_from_shallow(shallow)
    save_draft(draft, big, recipe, out)
    return draft, recipe


def cmd_build(args) -> None:
    big, tokenizer = _load_big(args.big, 2)
    _, recipe = build(big, tokenizer, Recipe.of(args), args.out, args.run)
    print(json.dumps(asdict(recipe)))


def cmd_teacher(args) -> None:
    from ..training.teacher import TeacherConfig, build_teacher_cache
    cfg = TeacherConfig(args.out, **given(args, TeacherConfig, TEACHER_FLAGS))  # checked before loading the model
    big, tokenizer = _load_big(args.big, args.threads)
    build_teacher_cache(big, tokenizer, cfg)


def train_run(big, tokenizer, run: str, cfg, grow: bool = False):
    from ..drafts.recipe import load_draft
    from ..training.teacher import load_teacher_cache, text_batch_fn
    from ..training.trainer import train
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
    cfg = _train_config(args, args.run)
    big, tokenizer = _load_big(args.big, cfg.threads)
    train_run(big, tokenizer, args.run, cfg, grow=args.grow)


def cmd_export(args) -> None:
    big, tokenizer = _load_big(DRAFTS_BIG, args.threads)
    print(json.dumps(export(big, tokenizer, args.run, args.out, args.heldout_dir), indent=2))


def export(big, tokenizer, run: str, out: str, heldout_dir: str) -> dict:
    """Best checkpoint of a run -> draft directory with recipe metrics and metrics.json."""
    import torch

    from ..drafts.recipe import load_draft, parameter_counts, read_recipe, save_draft
    from ..training.evaluate import agreement
    from ..training.teacher import load_teacher_cache
    from ..training.trainer import load_weights
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


def decode_speed(big, draft, tokenizer, n_tokens: int = 48, repeats: int = 3) -> dict:
    """ms per token of one-token-at-a-time cached decoding in the HF path (median over repeats); a feature draft,
    which only runs on the native engine, is timed there against the native big model."""
    import torch
    from transformers import DynamicCache

    from ..drafts.feature import FeatureDraft
    from ..training.teacher import as_ids
    prompt = torch.tensor([as_ids(tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about cats."}],
                                                                 add_generation_prompt=True))]).long()
    if isinstance(draft, FeatureDraft):
        return native_decode_speed(big, draft, prompt[0].tolist(), n_tokens)

    @torch.no_grad()
    def one(model) -> float:
        cache = DynamicCache(config=model.config)
        ids = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
        t = time.perf_counter()
        for _ in range(n_tokens):
            ids = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits.argmax(-1)
        return (time.perf_counter() - t) / n_tokens * 1000

    big_ms = sorted(one(big) for _ in range(repeats))[repeats // 2]
    draft_ms = sorted(one(draft) for _ in range(repeats))[repeats // 2]
    return {"big_ms_per_token": round(big_ms, 2), "draft_ms_per_token": round(draft_ms, 2),
            "speed_threads": torch.get_num_threads()}


def native_decode_speed(big, draft, prompt: list[int], n_tokens: int) -> dict:
    """ms per one-token step of the native big model and of the feature draft (bench.designs.step_ms, median of
    n_tokens steps). The big model runs first, so its runner holds the prompt's features for the draft to read."""
    import torch

    from ..bench.designs import step_ms
    from ..cache import make_runner
    big_runner = make_runner(big, "native")
    little = make_runner(draft, "native", share_with=big_runner)
    big_ms = step_ms(big_runner, prompt, steps=n_tokens)
    draft_ms = step_ms(little, prompt, steps=n_tokens)
    return {"big_ms_per_token": round(big_ms, 2), "draft_ms_per_token": round(draft_ms, 2),
            "speed_threads": torch.get_num_threads(), "speed_engine": f"native {big_runner.model.dtype}"}


def cmd_sweep(args) -> None:
    """Each recipe trains for --minutes on the same teacher cache and is exported; then every draft (trained
    here or given with --drafts) is measured side by side, see bild/bench/designs.py. Writes OUT/designs.md|json."""
    import torch

    from .. import models
    from ..bench import designs as DS
    from ..bench.datasets import load_items
    from ..training.teacher import load_teacher_cache
    threads = _train_config(args, args.out).threads  # the training flags are checked before any work
    if models.reads_directly(models.gguf_file(args.big)):
        from .draft_gguf import sweep_gguf
        return sweep_gguf(args, threads)
    try:
        recipes = json.loads(args.recipes)
    except ValueError as e:
        raise BildError(f"--recipes is not JSON: {e}", field="recipes") from e
    todo = [DS.Design(r.get("name", f"r{i}"), os.path.join(args.out, f"r{i}", "draft")) for i, r in enumerate(recipes)]
    if recipes:
        big, tokenizer = _load_big(args.big, threads)
        for r, d in zip(recipes, todo):
            if not os.path.isfile(os.path.join(d.little, "bild_draft.json")):
                train_recipe(big, tokenizer, args, r, os.path.dirname(d.little), d.little)
        del big
    if args.no_measure:
        return
    torch.set_num_threads(threads)
    designs = todo + DS.as_designs(args.drafts)
    if not designs:
        raise BildError("draft sweep: nothing to measure; give --recipes and/or --drafts", field="drafts")
    prompts = [item.prompt for item in load_items("sharegpt", args.prompts)]
    rows = DS.sweep(args.big, designs, load_teacher_cache(args.heldout_dir), prompts, args.gamma,
                    args.max_new_tokens, args.dtype)
    DS.write(rows, args.out, {"big": args.big, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
                              "gamma": args.gamma, "dtype": rows[0]["dtype"], "heldout_dir": args.heldout_dir,
                              "threads": threads,
                              "recipes": recipes, "drafts": args.drafts})
    print(DS.markdown(rows))


def train_recipe(big, tokenizer, args, recipe: dict, run: str, out: str) -> None:
    """Build (once), train for --minutes (resumable) and export one sweep recipe."""
    spec = Recipe(big=args.big, vocab_from=args.teacher_dir, teacher_shards=args.teacher_shards,
                  **{name: recipe[key] for key, name in SWEEP_RECIPE.items() if key in recipe})
    if not os.path.exists(os.path.join(run, INIT_DIR)):
        build(big, tokenizer, spec, run, run=True)
    cfg = _train_config(args, run)
    cfg.lr, cfg.w_kd, cfg.w_ce = recipe.get("lr", cfg.lr), recipe.get("w_kd", cfg.w_kd), recipe.get("w_ce", cfg.w_ce)
    train_run(big, tokenizer, run, cfg)
    export(big, tokenizer, run, out, args.heldout_dir)


def cmd_align(args) -> None:
    """Teacher caches (skipped when present) -> draft build -> training -> optional export."""
    from ..training.teacher import TeacherConfig, build_teacher_cache
    cfg = _train_config(args, args.run)
    spec = Recipe.of(args, teacher_shards=cfg.teacher_shards)
    spec.vocab_from = spec.vocab_from or cfg.teacher_dir
    length = given(args, TeacherConfig, ["max_new_tokens"])
    caches = [TeacherConfig(cfg.heldout_dir, "heldout", args.n_heldout, batch_size=24, **length),
              TeacherConfig(cfg.teacher_dir, "calibration", args.n_prompts, batch_size=32, **length)]
    big, tokenizer = _load_big(args.big, cfg.threads)
    for teacher in caches:
        build_teacher_cache(big, tokenizer, teacher)
    if not os.path.exists(os.path.join(args.run, INIT_DIR)):
        build(big, tokenizer, spec, args.run, run=True)
    train_run(big, tokenizer, args.run, cfg, grow=args.grow)
    if args.export:
        print(json.dumps(export(big, tokenizer, args.run, args.export, args.heldout_dir), indent=2))
