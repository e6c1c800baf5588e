"""The `bild` command line. Subcommands live beside the code they drive; this file only wires them up."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys

from .config import POLICIES
from .errors import BildError

DEFAULT_PROMPT = "Explain in a short paragraph why the sky is blue."
# modules that add their own subcommands with add_commands(subparsers), if they are present
PLUGINS = ("bild.draft_cli", "bild.bench", "bild.server")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parse_with_config(parser, argv)
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        return args.handler(args) or 0
    except BildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bild", description="Big–little decoding: a big model's output, faster.")
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("generate", help="generate text with a big–little pair and print statistics")
    gen.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    add_model_args(gen)
    add_decoding_args(gen)
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.add_argument("--compare", action="store_true", help="also run `ar` in this process and print the speedup")
    gen.set_defaults(handler=cmd_generate)
    for name in PLUGINS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # the module exists but one of its own imports is missing
                raise
            continue
        module.add_commands(sub)
    return parser


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """--config FILE (JSON, as written by `bild tune`) supplies defaults; flags on the command line win."""
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    try:
        with open(args.config) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise BildError(f"cannot read config {args.config}: {e}") from e
    config = config.get("generate", config)
    unknown = sorted(set(config) - set(vars(args)))
    if unknown:
        raise BildError(f"config {args.config} has unknown settings: {', '.join(unknown)}")
    args.subparser.set_defaults(**config)
    return parser.parse_args(argv)


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--big", default="smollm2-135m", help="alias, hub id, directory or .gguf file")
    p.add_argument("--little", default=None,
                   help="little model: directory, .gguf, hub id or early-exit:K (default: the big model's default)")
    p.add_argument("--dtype", default=None,
                   help="fp32 (exact), bf16, or fp16 (native engine: fp16 weights, fp32 activations). Default on "
                        "the native engine: bf16 where the CPU has it, else fp16 on x86; fp32 elsewhere")
    p.add_argument("--engine", default="auto", choices=["auto", "hf", "native"],
                   help="native: lean LLaMA-family CPU forward; hf: transformers; auto (default): native where it applies")
    p.add_argument("--activations", default="fp32", choices=["fp32", "int8"],
                   help="int8: a GGUF model's products take activations rounded to int8 per 32 values, as llama.cpp "
                        "does (native engine; faster, lossy against fp32). Default fp32 (exact)")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="bild", help=f"one of {', '.join(POLICIES)} (default bild)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--fallback", type=float, default=0.6, help="α_FB (default 0.6)")
    p.add_argument("--rollback", type=float, default=5.0, help="α_RB (default 5.0; inf disables rollback)")
    p.add_argument("--max-little", type=int, default=10)
    p.add_argument("--gamma", type=int, default=5)
    p.add_argument("--adaptive", action="store_true", help="speculative: adapt gamma to the acceptance history")
    p.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    p.add_argument("--config", default=None, help="JSON file of decoding settings (e.g. from `bild tune`)")
    p.set_defaults(subparser=p)


def decoding_kwargs(args: argparse.Namespace) -> dict:
    return dict(policy=args.policy, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, seed=args.seed, fallback=args.fallback,
                rollback=args.rollback, max_little=args.max_little, gamma=args.gamma, adaptive=args.adaptive,
                stop=tuple(args.stop or ()))


def load_pair(args: argparse.Namespace):
    from .api import BigLittle

    bl = BigLittle.load(big=args.big, little=args.little, dtype=args.dtype, engine=args.engine,
                        activations=args.activations)
    print(f"little model: {bl.little_description}; engine: {bl.engine}, {bl.precision}", file=sys.stderr)
    return bl


def cmd_generate(args: argparse.Namespace) -> int:
    from .config import GenerationConfig

    kwargs = decoding_kwargs(args)
    GenerationConfig(**kwargs)  # reject bad settings before spending time on loading models
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    bl = load_pair(args)
    bl.encode(prompt)
    if args.compare:
        bl.generate(prompt, **{**kwargs, "max_new_tokens": 4})  # warm-up, excluded from the timings
    if args.json:
        res = bl.generate(prompt, **kwargs)
    else:
        stream = bl.stream(prompt, **kwargs)
        for piece in stream:
            print(piece, end="", flush=True)
        res = stream.result
        print("\n")
    report = {"text": res.text, "token_ids": res.token_ids, "stats": res.stats.to_dict()}
    if not args.json:
        print(res.stats.summary())
    if args.compare:
        report["compare"] = _compare(bl, prompt, kwargs, res, quiet=args.json)
    if args.json:
        print(json.dumps(report, default=_json_default))
    return 0


def _compare(bl, prompt, kwargs, res, quiet: bool) -> dict:
    ar = bl.generate(prompt, **{**kwargs, "policy": "ar"})
    speedup = res.stats.tokens_per_s / ar.stats.tokens_per_s if ar.stats.tokens_per_s else math.nan
    identical = res.token_ids == ar.token_ids
    if not quiet:
        print(ar.stats.summary())
        print(f"speedup {res.stats.policy} vs ar: {speedup:.2f}x "
              f"({res.stats.tokens_per_s:.1f} vs {ar.stats.tokens_per_s:.1f} tok/s); "
              f"outputs identical: {'yes' if identical else 'no'}")
    return {"ar_stats": ar.stats.to_dict(), "ar_text": ar.text, "speedup": speedup, "identical": identical}


def _json_default(x):
    return str(x)


if __name__ == "__main__":
    sys.exit(main())
