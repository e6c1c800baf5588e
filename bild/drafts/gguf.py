"""Little models made from a GGUF file the native engine reads, by transforms that add no weights: a reduced-vocabulary
head (the kept token ids) and kept layers. Their directory holds only the recipe and the ids; the weights stay in the
file (model_files installs it).

    bild_little.json   {"model": alias or .gguf path, "vocab_size": N or null, "layers": [ids] or null,
                        "deltas": file name or null, "metrics": {}}
    vocab_ids.json     token ids ranked by how often the big model emitted them on calibration prompts (most first);
                       the head keeps the first vocab_size
    deltas             optional (`bild draft heal`): low-rank deltas of the kept layers' projections, safetensors
                       "<kept position>.<gguf name>.a" (r, in) and ".b" (out, r, scale folded in), fp16. At load
                       each projection becomes dequantise(W) + b a, requantised to Q8_0 if it was Q8_0, else Q5_0.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

import torch

from ..errors import BildError
from ..native import NativeModel, NativeRunner, gguf, keep_layers, reduced_head

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
    merged = merged_tensors(path, recipe, file) if recipe.deltas else None
    model = gguf.load(file, int8=int8, replace=merged)
    if recipe.layers:
        try:
            model = keep_layers(model, recipe.layers)
        except ValueError as e:
            raise BildError(f"{path}: {e}", field="layers") from e
    ids = kept_ids(path, recipe)
    if ids is None:
        return NativeRunner(model)
    return PromptHeadRunner(model, ids) if recipe.prompt_tokens else NativeRunner(reduced_head(model, ids))


def merged_tensors(path: str, recipe: GGUFLittle, file: str) -> dict:
    """{tensor name: FileTensor} of the kept layers' projections with the directory's deltas added, requantised."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize
    from safetensors.torch import load_file

    try:
        deltas = load_file(os.path.join(path, recipe.deltas))
    except OSError as e:
        raise BildError(f"{path}: cannot read its deltas {recipe.deltas} ({e})", field="deltas") from e
    f, layers, out = gguf.read(file), recipe.layers or None, {}
    for key in sorted({k.rsplit(".", 1)[0] for k in deltas}):  # "<kept position>.<gguf name>"
        at, short = key.split(".", 1)
        layer = layers[int(at)] if layers else int(at)
        t = f.get(f"blk.{layer}.{short}.weight")
        a, b = deltas[key + ".a"].float(), deltas[key + ".b"].float()  # (r, in), (out, r)
        if (b.shape[0], a.shape[1]) != t.shape:
            raise BildError(f"{path}: delta {key} is {(b.shape[0], a.shape[1])}, the tensor {t.name} {t.shape}")
        w = dequantize(t.data, GGMLQuantizationType[t.kind]).reshape(t.shape) + (b @ a).numpy()  # (out, in)
        kind = "Q8_0" if t.kind == "Q8_0" else "Q5_0"
        raw = quantize(w.astype(np.float32), GGMLQuantizationType[kind])
        out[t.name] = gguf.FileTensor(t.name, kind, t.shape, np.ascontiguousarray(raw).reshape(-1))
    return out


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
