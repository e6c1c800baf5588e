"""`bild draft vocab` and `bild draft sweep` for a pair read straight from GGUF files (the coder pair): little models
made from the little file by transforms that add no weights (bild.drafts.gguf), measured side by side."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from ..errors import BildError

OUTPUTS_FILE = "big_outputs.jsonl"


def add_vocab_command(sub) -> None:
    p = sub.add_parser("vocab", help="rank the big model's output tokens on calibration prompts and write little "
                                     "model directories with reduced heads (GGUF pairs)")
    p.add_argument("out")
    p.add_argument("--big", default="qwen2.5-coder-1.5b")
    p.add_argument("--little", default="qwen2.5-coder-0.5b", help="the GGUF model the heads are cut from")
    p.add_argument("--sizes", default="8192,16384,32768", help="head sizes, comma separated")
    p.add_argument("--prompt-tokens", action="store_true",
                   help="the heads also take each prompt's own tokens (directories named ...-vocabN-prompt)")
    p.add_argument("--code", type=int, default=82, help="HumanEval calibration problems (even task numbers)")
    p.add_argument("--chat", type=int, default=80, help="ShareGPT calibration prompts")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_vocab)


def add_layers_command(sub) -> None:
    p = sub.add_parser("layers", help="measure each layer's influence on the big model's outputs and write "
                                      "layer-dropped little model directories (GGUF pairs; untrained)")
    p.add_argument("out")
    p.add_argument("--from", dest="vocab_dir", required=True, help="a `bild draft vocab` output directory")
    p.add_argument("--little", default="qwen2.5-coder-0.5b")
    p.add_argument("--keep", default="12,16,20", help="layer counts to keep, comma separated")
    p.add_argument("--select", choices=("influence", "first"), default="influence",
                   help="influence: the layers of highest block influence (directories ...-keepN); first: the first "
                        "N layers, an early exit (...-firstN)")
    p.add_argument("--vocab", type=int, default=None, help="also a reduced head of this size (from --from)")
    p.add_argument("--prompt-tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="with --vocab, the head also takes each prompt's own tokens (no: a head `heal --head` trains)")
    p.add_argument("--sequences", type=int, default=40, help="big-model outputs the influence is measured on")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_layers)


def cmd_layers(args) -> None:
    import torch

    from .. import models
    from ..drafts import gguf as gguf_little
    from ..native import gguf
    from ..training import layers
    keeps = _sizes(args.keep, "keep")
    torch.set_num_threads(args.threads)
    ranked = _ranked(args.vocab_dir, args.vocab) if args.vocab else None
    model = gguf.load(models.gguf_file(args.little))
    os.makedirs(args.out, exist_ok=True)
    if args.select == "influence":  # measured on the big model's outputs; an early exit needs none
        with open(os.path.join(args.vocab_dir, OUTPUTS_FILE)) as f:
            sequences = [r["tokens"] for r in map(json.loads, f)][:args.sequences]
        influence = layers.block_influence(model, sequences)
        with open(os.path.join(args.out, "influence.json"), "w") as f:
            json.dump({"little": args.little, "sequences": len(sequences), "tokens": sum(map(len, sequences)),
                       "block_influence": influence}, f, indent=1)
    for n in keeps:
        if args.select == "first" and not 1 <= n <= model.config.n_layers:
            raise BildError(f"--keep {n}: {args.little} has {model.config.n_layers} layers", field="keep")
        kept = layers.most_influential(influence, n) if args.select == "influence" else list(range(n))
        name = f"{os.path.basename(args.little).removesuffix('.gguf')}-" \
            f"{'keep' if args.select == 'influence' else 'first'}{n}" + (f"-vocab{args.vocab}" if args.vocab else "")
        recipe = gguf_little.GGUFLittle(model=args.little, vocab_size=args.vocab,
                                        prompt_tokens=bool(args.vocab) and args.prompt_tokens,
                                        layers=kept)
        gguf_little.save(os.path.join(args.out, name), recipe, ranked)
        print(f"{name}: layers {kept}")


def add_heal_command(sub) -> None:
    p = sub.add_parser("heal", help="prediction alignment of a layer-dropped little model (GGUF pairs): LoRA on its "
                                    "kept layers, trained on the big model's calibration outputs; logs the agreement "
                                    "with the big model on held-out calibration outputs")
    p.add_argument("out")
    p.add_argument("--little", required=True, help="a little model directory (`bild draft layers`)")
    p.add_argument("--from", dest="vocab_dir", required=True, help="a `bild draft vocab` output directory")
    p.add_argument("--big", default="qwen2.5-coder-1.5b", help="whose tokenizer encodes the calibration prompts")
    from ..training.heal import HealConfig
    from .args import add_fields
    add_fields(p, HealConfig)
    p.add_argument("--baseline", action="store_true", help="also measure the little's file with all its layers")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(handler=cmd_heal)


def cmd_heal(args) -> None:
    import random

    import torch

    from .. import models
    from ..api import BigLittle
    from ..drafts import gguf as gguf_little
    from ..native import gguf
    from ..training import heal, vocab
    from .args import given
    torch.set_num_threads(args.threads)
    cfg = heal.HealConfig(**given(args, heal.HealConfig))
    recipe = gguf_little.read(args.little)
    kept = gguf_little.kept_ids(args.little, recipe)
    if kept is None:
        raise BildError(f"{args.little}: healing needs a reduced head (vocab_size), as `bild draft vocab` writes")
    if cfg.head and recipe.prompt_tokens:
        raise BildError(f"{args.little}: --head trains the head's kept rows, and this head also takes each "
                        "prompt's tokens, which would stay untrained; heal a directory without prompt tokens",
                        field="head")
    file = models.gguf_file(recipe.model)
    with open(os.path.join(args.vocab_dir, OUTPUTS_FILE)) as f:
        outputs = {r["id"]: r["tokens"] for r in map(json.loads, f)}
    encode = BigLittle.load(args.big, little="early-exit:1").encode
    prompts = [(pid, encode(p)) for pid, p in vocab.calibration_prompts(82, 80) if pid in outputs]
    every = list(range(gguf.config(gguf.read(file))[0].n_layers))  # the file's layers
    model = heal.student(file, recipe.layers or every, kept)
    vocab_size = model.model.embed_tokens.num_embeddings
    exs = heal.examples([p for _, p in prompts], [outputs[pid] for pid, _ in prompts], kept, vocab_size,
                        cfg.max_tokens)
    held = set(random.Random(cfg.seed).sample(range(len(exs)), cfg.heldout))
    train_exs, heldout = [e for i, e in enumerate(exs) if i not in held], [e for i, e in enumerate(exs) if i in held]
    os.makedirs(args.out, exist_ok=True)
    summary = {"little": args.little, "layers": recipe.layers, "head": len(kept), "train_sequences": len(train_exs),
               "heldout_sequences": len(heldout), "config": dataclasses.asdict(cfg)}
    if args.baseline:
        full = heal.student(file, every, kept)
        summary["baseline_agreement"] = heal.agreement(full, heldout)
        del full
    lora = heal.add_lora(model, cfg.rank, cfg.alpha, cfg.head)
    summary["trainable_parameters"] = sum(m.a.numel() + m.b.numel() for m in lora.values())
    print(json.dumps(summary))
    summary["last"] = heal.train(model, lora, train_exs, heldout, cfg, args.out)
    little = os.path.join(args.out, "little")  # the healed little model's directory
    os.makedirs(little, exist_ok=True)
    summary["deltas_bytes"] = heal.export(lora, os.path.join(little, "deltas.safetensors"))
    with open(os.path.join(args.little, gguf_little.VOCAB_FILE)) as f:  # a reduced head, checked above
        ranked = json.load(f)
    metrics = {"heldout_agreement": summary["last"].get("agreement"), "trained_tokens": summary["last"].get("tokens")}
    gguf_little.save(little, dataclasses.replace(recipe, deltas="deltas.safetensors", metrics=metrics), ranked)
    with open(os.path.join(args.out, "heal.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"healed little model: {little}")


def _ranked(vocab_dir: str, size: int) -> list[int]:
    """The big model's ranked output ids from a `bild draft vocab` directory (any of its heads of this size: the
    ranking is the big model's, whichever little the heads were cut for)."""
    from ..drafts import gguf as gguf_little
    for name in sorted(os.listdir(vocab_dir)) if os.path.isdir(vocab_dir) else []:
        path = os.path.join(vocab_dir, name, gguf_little.VOCAB_FILE)
        if name.endswith(f"-vocab{size}") and os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    raise BildError(f"{vocab_dir}: no head of {size} tokens (a ...-vocab{size} directory of `bild draft vocab`)",
                    field="vocab")


def _sizes(text: str, name: str = "sizes") -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise BildError(f"--{name} must be integers separated by commas, got {text!r}", field=name) from None
    if not sizes or min(sizes) < 1:
        raise BildError(f"--{name} must be positive, got {text!r}", field=name)
    return sizes


def cmd_vocab(args) -> None:
    import torch

    from ..api import BigLittle
    from ..drafts import gguf as gguf_little
    from ..training import vocab
    from ..training.teacher import text_token_stream
    sizes = _sizes(args.sizes)
    torch.set_num_threads(args.threads)
    bl = BigLittle.load(args.big, little="early-exit:1")  # only the big model decodes here
    os.makedirs(args.out, exist_ok=True)
    prompts = vocab.calibration_prompts(args.code, args.chat)
    tok = bl.tokenizer
    outputs = vocab.big_outputs(bl.big_runner.model, bl.encode, prompts, os.path.join(args.out, OUTPUTS_FILE),
                                args.max_new_tokens, bl.eos_ids, tok.eos_token_id, args.batch)
    marks = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])  # the chat template's turn marks
    always = sorted((bl.eos_ids | set(tok.all_special_ids) | set(marks)) - {None, tok.unk_token_id})
    ranked = vocab.rank(outputs, text_token_stream(tok, 1_000_000), bl.big_runner.vocab_size, always)
    covered = vocab.coverage(outputs, ranked, sizes)
    summary = {"big": args.big, "little": args.little, "prompts": len(outputs),
               "tokens": sum(map(len, outputs)), "distinct": len({t for row in outputs for t in row}),
               "coverage": {str(n): covered[n] for n in sizes}}
    for n in sizes:
        name = f"{args.little}-vocab{n}" + ("-prompt" if args.prompt_tokens else "")
        recipe = gguf_little.GGUFLittle(model=args.little, vocab_size=n, prompt_tokens=args.prompt_tokens,
                                        metrics={"calibration_coverage": covered[n]})
        gguf_little.save(os.path.join(args.out, name), recipe, ranked)
    with open(os.path.join(args.out, "vocab.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))


def sweep_gguf(args, threads: int) -> None:
    """`bild draft sweep` when the big model is a GGUF file the native engine reads: the --drafts little models
    (GGUF aliases or paths, little model directories, early-exit:K) measured side by side, see
    bild/bench/littles.py. Writes OUT/littles.md|json."""
    import torch

    from ..bench import littles as L
    from ..bench.datasets import load_items
    from ..bench.runner import machine
    if args.recipes != "[]":
        raise BildError("draft sweep: training recipes need a transformers big model; for a GGUF pair give "
                        "--drafts (little model directories, GGUF files or early-exit:K)", field="recipes")
    if not args.drafts:
        raise BildError("draft sweep: nothing to measure; give --drafts", field="drafts")
    torch.set_num_threads(threads)
    designs = [L.Little(*(d.split("=", 1) if "=" in d else (os.path.basename(d.rstrip("/")), d))) for d in args.drafts]
    items = load_items(args.dataset or "humaneval-heldout", args.prompts)
    from ..drafts import gguf as gguf_little
    trained = {d.name: gguf_little.trained_parameters(d.spec) for d in designs}
    rows = L.sweep(L.pairs(args.big, designs), items, args.gamma, args.max_new_tokens, trained)
    settings = {"big": args.big, "dataset": args.dataset or "humaneval-heldout", "prompts": len(items),
                "max_new_tokens": args.max_new_tokens, "gamma": args.gamma, "threads": threads,
                "drafts": args.drafts, "machine": machine()}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "littles.json"), "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "littles.md"), "w") as f:
        f.write(L.markdown(rows))
    print(L.markdown(rows))
