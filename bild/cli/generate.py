"""`bild generate`: generate text with a big–little pair and print statistics."""

from __future__ import annotations

import argparse
import json
import math
import sys

from .args import add_decoding_args, add_model_args, decoding_kwargs

DEFAULT_PROMPT = ("Write a Python function `is_palindrome(s)` that tells whether a string reads the same backwards, "
                  "ignoring case, spaces and punctuation. Include a docstring with two doctest examples.")


def add_commands(sub) -> None:
    gen = sub.add_parser("generate", help="generate text with a big–little pair and print statistics")
    gen.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT, help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    add_model_args(gen)
    add_decoding_args(gen)
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user chat message")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.add_argument("--compare", action="store_true", help="also run `ar` in this process and print the speedup")
    gen.set_defaults(handler=cmd_generate)

    prep = sub.add_parser("prepare", help="do a pair's first-use work once (this CPU's kernel library, each GGUF "
                                          "file's tensor index, the tokenizer), so the first generate starts fast")
    add_model_args(prep)
    prep.set_defaults(handler=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    import time

    from .. import kernels

    start = time.perf_counter()
    load_pair(args)
    why = kernels.unavailable()  # builds this CPU's kernel library, which loading alone does not touch
    print(f"prepared {args.big} in {time.perf_counter() - start:.1f} s"
          + (f" (the block kernels cannot run here: {why})" if why else f"; kernels {kernels.isa()}"))
    return 0


def load_pair(args: argparse.Namespace):
    from ..api import BigLittle

    bl = BigLittle.load(big=args.big, little=args.little, dtype=args.dtype, engine=args.engine,
                        activations=args.activations)
    print(f"little model: {bl.little_description}; engine: {bl.engine}, {bl.precision}", file=sys.stderr)
    return bl


def cmd_generate(args: argparse.Namespace) -> int:
    from ..config import GenerationConfig

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
        print(json.dumps(report, default=str))
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
