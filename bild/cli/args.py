"""Command-line flags generated from dataclass fields, so each setting is typed once (in its dataclass).

    add_fields(parser, GenerationConfig)              one flag per field: --max-new-tokens for max_new_tokens
    given(args, GenerationConfig) -> dict             the fields the user set on the command line
    GenerationConfig(**given(args, GenerationConfig))  the dataclass fills in its own defaults

A field's metadata may carry:
    help          the flag's help text (the default is appended)
    choices       the values argparse accepts
    flag          the flag's name, when it is not --field-name
    cli_default   the command line's default, where it differs from the library's

Flags default to None (or cli_default), so only what the user gave reaches the dataclass. Types come from the
annotations: int, float, str, `X | None`; bool fields are switches (store_true); tuple[str, ...] is repeatable.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from ..config import ACTIVATIONS, DEFAULT_BIG, ENGINES

_TYPES = {"int": int, "float": float, "str": str}


def add_fields(parser: argparse.ArgumentParser, cls, names=None, *, skip=()) -> list[str]:
    """Add a flag for each field of the dataclass `cls` (those in `names`, in their order, else all but `skip`);
    returns the fields added."""
    by_name = {f.name: f for f in fields(cls)}
    chosen = list(names) if names is not None else [n for n in by_name if n not in skip]
    for name in chosen:
        f = by_name[name]
        meta = f.metadata
        kind = str(f.type).replace(" | None", "").replace("Optional[", "").rstrip("]")
        default = meta.get("cli_default", f.default if f.default is not MISSING else None)
        text = meta.get("help", "")
        if default is not None and kind != "bool" and default != ():
            text = f"{text} (default {default})" if text else f"default {default}"
        kwargs: dict = {"dest": name, "default": meta.get("cli_default"), "help": text.replace("%", "%%") or None}
        if kind == "bool":
            kwargs["action"] = "store_true"
        elif kind.startswith("tuple[str"):
            kwargs["action"] = "append"
        elif kind in _TYPES:
            kwargs["type"] = _TYPES[kind]
        else:
            raise TypeError(f"{cls.__name__}.{name}: no flag for a field of type {f.type}")
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
            kwargs["metavar"] = "{" + ",".join(map(str, meta["choices"])) + "}"
        flag = meta.get("flag", "--" + name.replace("_", "-"))
        if kwargs.get("action") != "store_true":
            kwargs["metavar"] = kwargs.get("metavar", flag.lstrip("-").replace("-", "_").upper())
        parser.add_argument(flag, **kwargs)
    return chosen


def given(args: argparse.Namespace, cls, names=None) -> dict:
    """The fields of `cls` (or of `names`) set in `args`: flags the user gave, cli_defaults, or --config values."""
    wanted = names if names is not None else [f.name for f in fields(cls)]
    out = {}
    for name in wanted:
        value = getattr(args, name, None)
        if value is not None:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


class LazyParser(argparse.ArgumentParser):
    """A subcommand parser whose arguments are added on first use (`fill(parser)`): commands whose flags come from
    heavy modules (training) import them only when that command is parsed or its help shown."""

    def __init__(self, *args, fill=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._fill = fill

    def _filled(self) -> None:
        if self._fill is not None:
            fill, self._fill = self._fill, None
            fill(self)

    def parse_known_args(self, args=None, namespace=None):
        self._filled()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._filled()
        return super().format_help()

    def format_usage(self) -> str:
        self._filled()
        return super().format_usage()


def add_model_args(p: argparse.ArgumentParser) -> None:
    """BigLittle.load's arguments."""
    p.add_argument("--big", default=DEFAULT_BIG, help="alias, hub id, directory or .gguf file")
    p.add_argument("--little", default=None,
                   help="little model: directory, .gguf, hub id or early-exit:K (default: the big model's default)")
    p.add_argument("--dtype", default=None,
                   help="fp32 (exact), bf16, or fp16 (native engine: fp16 weights, fp32 activations). Default on "
                        "the native engine: bf16 where the CPU has it, else fp16 on x86; fp32 elsewhere")
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="native: lean LLaMA-family CPU forward; hf: transformers; auto (default): native where it applies")
    p.add_argument("--activations", default=None, choices=ACTIVATIONS,
                   help="int8: a GGUF model's products take activations rounded to int8 per block, as llama.cpp does "
                        "(native engine; faster, lossy against fp32); fp32: exact. Default: int8 for a file the "
                        "native engine reads directly (Qwen2 K-quants), else fp32")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """One flag per GenerationConfig field, and --config FILE to supply them (see bild.cli.parse_with_config)."""
    from ..config import GenerationConfig

    add_fields(p, GenerationConfig)
    p.add_argument("--config", default=None, help="JSON file of decoding settings (e.g. from `bild tune`)")
    p.set_defaults(subparser=p)


def decoding_kwargs(args: argparse.Namespace) -> dict:
    """GenerationConfig keyword arguments: the decoding settings given on the command line or by --config."""
    from ..config import GenerationConfig

    return given(args, GenerationConfig)
