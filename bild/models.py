"""Loading models: aliases, hub ids or directories, .gguf files, and early-exit little models."""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from . import model_files
from .drafts import early_exit_spec
from .errors import BildError
from .files import keyed_path

# the little model an alias pairs with when none is named and none is shipped for it in bild/drafts/<alias>
PAIRS = {"qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b"}
DEFAULT_EARLY_EXIT_LAYERS = 2
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise BildError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve(spec: str) -> tuple[str, str | None]:
    """An alias, .gguf path, directory or hub id -> (directory or hub id, gguf file name or None)."""
    if spec in model_files.FILES:
        path = model_files.path(spec)
        return os.path.dirname(path), os.path.basename(path)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise BildError(f"model file not found: {spec}")
        return os.path.dirname(os.path.abspath(spec)), os.path.basename(spec)
    if _looks_like_path(spec) and not os.path.isdir(spec):
        raise BildError(f"model directory not found: {spec}")
    return spec, None


def gguf_file(spec: str) -> str | None:
    """The .gguf file an alias or path names, or None for a directory or hub id."""
    where, gguf = resolve(spec)
    return os.path.join(where, gguf) if gguf else None


def _looks_like_path(spec: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else with a slash is a path."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1


def load(spec: str, dtype=None, device=None, engine: str = "hf"):
    """Load (model, tokenizer) from an alias, hub id, directory or .gguf file.

    dtype=None: see default_dtype. float16 is for the native engine: fp16 weights, fp32 activations."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    where, gguf = resolve(spec)
    gguf_path = os.path.join(where, gguf) if gguf else None
    if gguf:
        where, gguf = _converted(where, gguf)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        dtype = parse_dtype(dtype) if dtype is not None else default_dtype(config, engine, gguf_path)
        model = auto.from_pretrained(where, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except BildError:
        raise
    except Exception as e:  # corrupt files and bad ids surface from many places inside transformers
        raise BildError(f"could not load model {spec!r}: {_first_line(e)}") from e
    model.eval()
    return (model.to(device) if device else model), tokenizer


def default_dtype(config, engine: str, gguf_path: str | None = None) -> torch.dtype:
    """What the native engine runs fastest where it applies: fp32 on a GGUF file's own Q4_1/Q8_0 blocks where the
    block kernels run (exact, and fastest), else bf16 on CPUs that compute it natively, else fp16 weights with fp32
    activations (x86 fbgemm); fp32 for everything else, and for the HF engine."""
    from . import kernels, native

    if engine == "hf" or not native.config_supported(config):
        return torch.float32
    if gguf_path is not None and kernels.unavailable() is None and gguf_blocks_only(gguf_path):
        return torch.float32
    return native.fastest_dtype()


def reads_directly(path: str | None) -> bool:
    """Whether the native engine reads this GGUF file itself (bild.native.gguf), without transformers."""
    from .native import gguf

    return path is not None and gguf_summary(path)["architecture"] in gguf.ARCHITECTURES


def gguf_blocks_only(path: str) -> bool:
    """Whether every quantised tensor of a GGUF file is Q4_1 or Q8_0, what bild/kernels recovers exactly from
    transformers' dequantised weights."""
    quantised = set(gguf_summary(path)["types"]) - {"F32", "F16", "BF16"}
    return bool(quantised) and quantised <= {"Q4_1", "Q8_0"}


def gguf_summary(path: str) -> dict:
    """A GGUF file's architecture and tensor types ({"architecture": "", "types": []} when unreadable: load() then
    reports why), from its cached index (bild.native.gguf.index)."""
    from .native import gguf

    try:
        return gguf.index(path)
    except BildError:
        return {"architecture": "", "types": []}


def _converted(directory: str, gguf: str) -> tuple[str, str | None]:
    """Dequantising a GGUF file takes ~20 s; do it once and keep a safetensors copy in the user's cache."""
    path = os.path.join(directory, gguf)
    target = keyed_path("converted", path)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target, None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    except Exception as e:
        raise BildError(f"could not load model {path!r}: {_first_line(e)}") from e
    model.hf_quantizer = None  # the weights are already dequantised to fp32; only the marker blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = f"{target}.tmp{os.getpid()}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache behind
    except OSError:  # a read-only or full disk: load from the GGUF file every time instead
        return directory, gguf
    return target, None


def gguf_tokenizer(path: str):
    """The tokenizer a GGUF file holds. Building it from the file's metadata takes seconds; a copy saved in the
    user's cache loads in a fraction of that."""
    from transformers import AutoTokenizer

    saved = keyed_path("tokenizers", path)
    if os.path.isfile(os.path.join(saved, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(saved)
    try:
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    except Exception as e:
        raise BildError(f"could not read the tokenizer of {path!r}: {_first_line(e)}") from e
    tmp = f"{saved}.tmp{os.getpid()}"
    try:
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, saved)
    except OSError:  # a read-only or full disk: read the file every time instead
        pass
    return tokenizer


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def early_exit(big: nn.Module, n_layers: int) -> nn.Module:
    """The big model's first n_layers, then its own final norm and LM head. Shares every weight; copies none."""
    path = _layer_path(big)
    layers = _get(big, path)
    if not 1 <= n_layers <= len(layers):
        raise BildError(f"early exit needs 1..{len(layers)} layers, got {n_layers}")
    little = _shallow_clone(big)
    parent = little
    for name in path[:-1]:  # clone the chain of modules down to the layer list, sharing everything else
        child = _shallow_clone(getattr(parent, name))
        parent._modules[name] = child
        parent = child
    parent._modules[path[-1]] = nn.ModuleList(list(layers)[:n_layers])
    cfg = _truncated_config(big.config, n_layers)
    for module in little.modules():
        if getattr(module, "config", None) is big.config:
            module.config = cfg
    little.config = cfg
    little.bild_little = early_exit_spec(big, n_layers)  # on the native engine it shares the big model's runner
    return little


def _layer_path(model: nn.Module) -> list[str]:
    for path in (["model", "layers"], ["decoder", "block"], ["model", "decoder", "layers"], ["transformer", "h"]):
        try:
            if isinstance(_get(model, path), nn.ModuleList):
                return path
        except AttributeError:
            continue
    raise BildError(f"cannot find the decoder layers of {type(model).__name__} to build an early exit")


def _get(module: nn.Module, path: list[str]):
    for name in path:
        module = getattr(module, name)
    return module


def _shallow_clone(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)  # a new child table; the children themselves are shared
    return clone


def _truncated_config(config, n_layers: int):
    cfg = copy.deepcopy(config)
    for name in ("num_hidden_layers", "num_decoder_layers", "n_layer"):
        if getattr(cfg, name, None) is not None:
            setattr(cfg, name, n_layers)
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:n_layers]
    return cfg


def pair_settings(big_spec: str) -> dict:
    """The decoding defaults measured for a big model alias (bild/pairs/<alias>.json, as `bild tune --write`
    makes it), or {}; arguments to generate() override them."""
    from .config import read_settings

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pairs", f"{big_spec}.json")
    return read_settings(path) if os.path.isfile(path) else {}


def default_little(big_spec: str) -> str | None:
    """The little model of a big model alias: the one shipped for it in bild/drafts/<alias> (a trained draft, or a
    little model made from its pair's file), else its pair (PAIRS), if there is one."""
    from .drafts import gguf as gguf_little
    from .drafts import recipe as draft

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "drafts", big_spec)
    if big_spec in model_files.FILES and (gguf_little.is_gguf_little(path) or draft.is_draft_dir(path)):
        return path
    return PAIRS.get(big_spec)


def early_exit_layers(spec: str | None) -> int:
    """None or 'early-exit[:K]' -> K (DEFAULT_EARLY_EXIT_LAYERS when not given)."""
    k = spec.partition(":")[2] if spec else ""
    if k and not k.isdigit():
        raise BildError(f"early exit layers must be an integer, got {k!r}")
    return int(k) if k else DEFAULT_EARLY_EXIT_LAYERS


def load_little(spec: str | None, big: nn.Module, dtype=None, device=None) -> nn.Module:
    """None or 'early-exit[:K]' -> an early exit of big; a trained draft directory; else any loadable model."""
    from .drafts import recipe as draft

    if spec is not None and draft.is_draft_dir(spec):
        try:
            return draft.load_draft(spec, big)
        except Exception as e:  # safetensors, json and shape errors all mean a broken draft directory
            raise BildError(f"could not load the draft in {spec}: {_first_line(e)}") from e
    if spec is None or spec.startswith("early-exit"):
        return early_exit(big, early_exit_layers(spec))
    model, _ = load(spec, dtype=dtype, device=device)
    return model


def describe_little(spec: str | None) -> str:
    from .drafts import gguf as gguf_little
    from .drafts import recipe as draft

    if gguf_little.is_gguf_little(spec):
        return f"{spec}: {gguf_little.read(spec).describe()}"
    if spec is not None and draft.is_draft_dir(spec):
        recipe = draft.read_recipe(spec)
        alpha = (recipe.metrics or {}).get("alpha")
        if recipe.kind == "feature":
            return (f"feature draft {spec} ({recipe.n_layers} layers reading the big model's hidden states"
                    + (f", head over {recipe.vocab_size} tokens" if recipe.vocab_size else "")
                    + (f", held-out top-1 agreement of its first token {alpha:.2f}" if isinstance(alpha, float) else "")
                    + ")")
        return (f"trained draft {spec} ({recipe.n_layers} layers"
                + (f", head over {recipe.vocab_size} tokens" if recipe.vocab_size else "")
                + (f", held-out top-1 agreement {alpha:.2f}" if isinstance(alpha, float) else "") + ")")
    if spec is None or spec.startswith("early-exit"):
        return (f"early exit of the big model after {early_exit_layers(spec)} layers "
                "(UNTRAINED: expect low acceptance and little or no speedup)")
    return spec


def vocab_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_pair(big: nn.Module, little: nn.Module) -> None:
    """Big and little must share a vocabulary and an architecture family."""
    vb, vl = vocab_size(big), vocab_size(little)
    if vb != vl:
        raise BildError(f"vocabularies differ: big model has {vb} tokens, little model has {vl}")
    if big.config.is_encoder_decoder != little.config.is_encoder_decoder:
        raise BildError("big and little must both be decoder-only or both encoder-decoder models")
