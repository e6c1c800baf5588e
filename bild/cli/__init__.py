"""The `bild` command line: main, the parser and --config. Each subcommand lives in a module of this package:

    generate.py   bild generate, bild prepare
    draft.py      bild draft build|teacher|train|export|sweep, bild align (training imports inside the handlers)
    bench.py      bild bench, bild sweep, bild tune
    serve.py      bild serve
    args.py       flags generated from dataclass fields (GenerationConfig, TeacherConfig, TrainConfig)
"""

from __future__ import annotations

import argparse
import sys

from ..config import read_settings
from ..errors import BildError
from . import bench, draft, generate, serve
from .args import LazyParser


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
    sub = parser.add_subparsers(dest="command", parser_class=LazyParser)
    for module in (generate, draft, bench, serve):
        module.add_commands(sub)
    return parser


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """--config FILE (JSON, as written by `bild tune`) supplies defaults; flags on the command line win."""
    args = parser.parse_args(argv)
    if not getattr(args, "config", None):
        return args
    args.subparser.set_defaults(**read_settings(args.config))
    return parser.parse_args(argv)
