"""Little models made from a GGUF file the native engine reads, by transforms that add no weights: a reduced-vocabulary
head (the kept token ids) and kept layers. Their directory holds only the recipe and the ids; the weights stay in the
file (model_files installs it).

    bild_little.json   {"model": alias or .gguf path, "vocab_size": N or null, "layers": [ids] or null,
                        "deltas": file name or null, "metrics": {}}
    vocab_ids.json     token ids ranked by how often the big model emitted them on calibration prompts (most first);
                       the head keeps the first vocab_size
    deltas             optional (`bild draft heal`): low-rank deltas of the kept layers' projections, safetensors
                       "<kept position>.<gguf name>.a" (r, in) and ".b" (out, r, scale folded in), fp16. At load
                       each projection becomes dequantise(W) + b a, requantised to its own type (Q8_0, Q4_K, Q6_K;
                       plain stays float32) or else Q5_0;
                       "head.a" / "head.b" (a trained head, `--head`): the same over the reduced head's kept rows.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..errors import BildError
from ..native import NativeModel, NativeRunner, gguf, keep_layers, reduced_head
from ..native import quantize as k_quants

RECIPE_FILE = "bild_little.json"
VOCAB_FILE = "vocab_ids.json"


@dataclass(slots=True, kw_only=True)
class GGUFLittle:
    model: str = "qwen2.5-coder-0.5b"  # the GGUF file: an alias of model_files or a path
    vocab_size: int | None = None      # head over the first vocab_size ranked ids (None: the whole vocabulary)
    prompt_tokens: bool = False        # a reduced head also takes each prompt's own tokens (code copies its prompt)
    layers: list[int] | None = None    # keep only these layers (None: all)
    deltas: str | None = None          # a file of trained low-rank deltas in the directory, merged at load
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.vocab_size is not None and self.vocab_size < 1:
            raise BildError(f"vocab_size must be >= 1, got {self.vocab_size}", field="vocab_size")

    def describe(self) -> str:
        parts = [f"{self.vocab_size} of its tokens in the head" + (" and the prompt's" if self.prompt_tokens else "")
                 if self.vocab_size else "",
                 f"layers {','.join(map(str, self.layers))}" if self.layers else "",
                 "trained deltas merged" if self.deltas else ""]
        alpha = self.metrics.get("alpha")
        parts.append(f"acceptance {alpha:.2f} at draft position 1" if isinstance(alpha, float) else "")
        return f"{self.model} ({'; '.join(p for p in parts if p)})"


def is_gguf_little(path) -> bool:
    return isinstance(path, str) and os.path.isfile(os.path.join(path, RECIPE_FILE))


def read(path: str) -> GGUFLittle:
    try:
        with open(os.path.join(path, RECIPE_FILE)) as f:
            return GGUFLittle(**json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise BildError(f"{path}: not a readable little model recipe ({type(e).__name__}: {e})") from e


def trained_parameters(spec) -> int:
    """The parameters a little model directory's deltas add (0 for anything else)."""
    if not is_gguf_little(spec):
        return 0
    return sum(t.numel() for t in read_deltas(spec, read(spec)).values())


def kept_ids(path: str, recipe: GGUFLittle) -> torch.Tensor | None:
    """The head's kept ids (sorted), or None for a full head."""
    if recipe.vocab_size is None:
        return None
    with open(os.path.join(path, VOCAB_FILE)) as f:
        ranked = json.load(f)
    if len(ranked) < recipe.vocab_size:
        raise BildError(f"{path}: {VOCAB_FILE} ranks {len(ranked)} ids, fewer than vocab_size {recipe.vocab_size}")
    return torch.tensor(sorted(ranked[:recipe.vocab_size]), dtype=torch.long)


def load(path: str, int8: bool = True):
    """The little model's runner, on its file's own blocks (sharing the memory map; a reduced head's rows are a copy
    of N rows)."""
    from .. import models

    recipe = read(path)
    file = models.gguf_file(recipe.model)
    deltas = read_deltas(path, recipe)
    model = gguf.load(file, int8=int8, replace=merged_tensors(path, recipe, file, deltas) if deltas else None)
    if recipe.layers:
        try:
            model = keep_layers(model, recipe.layers)
        except ValueError as e:
            raise BildError(f"{path}: {e}", field="layers") from e
    ids = kept_ids(path, recipe)
    if ids is None:
        return NativeRunner(model)
    if recipe.prompt_tokens:
        return PromptHeadRunner(model, ids)
    model = reduced_head(model, ids)
    if "head.a" in deltas:
        model = dataclasses.replace(model, head=merged_head(path, file, ids, deltas, int8))
    return NativeRunner(model)


def read_deltas(path: str, recipe: GGUFLittle) -> dict:
    """The directory's trained deltas {key: tensor} ({} without any), checked against the recipe."""
    from safetensors.torch import load_file

    if not recipe.deltas:
        return {}
    try:
        deltas = load_file(os.path.join(path, recipe.deltas))
    except OSError as e:
        raise BildError(f"{path}: cannot read its deltas {recipe.deltas} ({e})", field="deltas") from e
    if "head.a" in deltas and (recipe.vocab_size is None or recipe.prompt_tokens):
        raise BildError(f"{path}: its deltas train the head's kept rows, so the recipe needs a vocab_size and no "
                        "prompt_tokens", field="deltas")
    return deltas


def merged_tensors(path: str, recipe: GGUFLittle, file: str, deltas: dict) -> dict:
    """{tensor name: FileTensor} of the kept layers' projections with the directory's deltas added, requantised."""
    f, layers, out = gguf.read(file), recipe.layers or None, {}
    for key in sorted({k.rsplit(".", 1)[0] for k in deltas} - {"head"}):  # "<kept position>.<gguf name>"
        at, short = key.split(".", 1)
        layer = layers[int(at)] if layers else int(at)
        t = f.get(f"blk.{layer}.{short}.weight")
        raw = _plus_delta(path, key, t.data, t.kind, t.shape, deltas)
        out[t.name] = gguf.FileTensor(t.name, _requantised(t.kind), t.shape, raw.reshape(-1))
    return out


def merged_head(path: str, file: str, ids: torch.Tensor, deltas: dict, int8: bool):
    """The reduced head's rows (the kept ids, sorted) with the trained head delta added, requantised, as blocks."""
    from ..kernels import from_gguf, with_int8

    f = gguf.read(file)
    t = f.get("output.weight" if "output.weight" in f.tensors else "token_embd.weight")
    rows = t.data.reshape(t.shape[0], -1)[ids.numpy()]  # (N, row bytes)
    shape, kind = (len(ids), t.shape[1]), _requantised(t.kind)
    raw = _plus_delta(path, "head", rows, t.kind, shape, deltas)
    if kind == "F32":
        return torch.from_numpy(raw.view(np.float32).reshape(shape))
    w = from_gguf(raw, kind, shape)
    return with_int8(w) if int8 else w


def _requantised(kind: str) -> str:
    """What a weight of this type becomes with a delta added: plain stays plain (float32); Q8_0, Q4_K and Q6_K keep
    their type (bild.native.quantize makes the K-quants); the rest becomes Q5_0."""
    return "F32" if kind in gguf.PLAIN_TYPES else kind if kind in ("Q8_0", "Q4_K", "Q6_K") else "Q5_0"


def _plus_delta(path: str, key: str, raw, kind: str, shape: tuple[int, int], deltas: dict):
    """dequantise(raw) + b a, requantised (raw uint8 bytes of a (out, in) weight)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    a, b = deltas[key + ".a"].float(), deltas[key + ".b"].float()  # (r, in), (out, r)
    if (b.shape[0], a.shape[1]) != tuple(shape):
        raise BildError(f"{path}: delta {key} is {(b.shape[0], a.shape[1])}, its weight {tuple(shape)}")
    w = dequantize(np.ascontiguousarray(raw), GGMLQuantizationType[kind]).reshape(shape) + (b @ a).numpy()
    w, to = w.astype(np.float32), _requantised(kind)
    if to == "F32":
        return np.ascontiguousarray(w.view(np.uint8))
    if to in k_quants.BLOCK_BYTES:
        return k_quants.quantize(w, to)
    return np.ascontiguousarray(quantize(w, GGMLQuantizationType[to]))


class PromptHeadRunner(NativeRunner):
    """A reduced head that also takes each prompt's own tokens: at every start() its rows are gathered anew for the
    kept ids and the prompt's (a copy of N + P rows, milliseconds). Still lossless: -inf outside them."""

    def __init__(self, base: NativeModel, kept: torch.Tensor, max_length: int | None = None):
        super().__init__(reduced_head(base, kept), max_length)
        self.base, self.kept = base, kept

    def start(self, prompt_ids: list[int]) -> list[int]:
        keep = torch.zeros(self.vocab_size, dtype=torch.bool)
        keep[self.kept] = True
        keep[torch.tensor(prompt_ids, dtype=torch.long)] = True
        self.model = reduced_head(self.base, keep.nonzero().squeeze(1))  # sorted ids
        return super().start(prompt_ids)


def save(path: str, recipe: GGUFLittle, ranked: list[int] | None = None) -> None:
    """Write a little model directory; `ranked` (needed with vocab_size) is stored cut to vocab_size."""
    os.makedirs(path, exist_ok=True)
    if recipe.vocab_size is not None:
        if ranked is None or len(ranked) < recipe.vocab_size:
            raise ValueError("a reduced head needs at least vocab_size ranked ids")
        with open(os.path.join(path, VOCAB_FILE), "w") as f:
            json.dump([int(i) for i in ranked[:recipe.vocab_size]], f)
    with open(os.path.join(path, RECIPE_FILE), "w") as f:
        json.dump(asdict(recipe), f, indent=1)
        f.write("\n")
