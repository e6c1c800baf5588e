"""Little models built from the big one, and their save format.

Two kinds, both a real HF causal LM of the big model's class with K decoder layers, whose embeddings,
rotary module and LM head are the big model's own objects (shared, frozen, never saved):

- "shallow":    K trainable layers initialised from chosen big layers (`init="first"`: 0..K-1,
                `init="spread"`: evenly spaced from 0 to the last), plus a trainable copy of the final norm.
- "early_exit": the big model's first K layers (shared objects, frozen) + one trainable exit layer
                (initialised from a chosen big layer) + a trainable final norm.
- "feature":    K trainable layers that also read the big model's final hidden states (EAGLE); not an HF
                model but a bild.drafts.feature.FeatureDraft, run by the native engine beside the big model.
                `init_draft` names a trained shallow draft it started from (copied at build time only).

Either may use a reduced-vocabulary head over the N most frequent tokens: its logits are -inf outside
the kept ids, so the draft distribution has zero mass there and verification stays lossless.

Save format (a directory):
    bild_draft.json     the recipe (kind, big model spec, layers, vocab file, metrics)
    model.safetensors   only the draft's unique weights
    vocab_ids.json      kept token ids (reduced-vocabulary drafts only)
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .heads import ReducedHead

RECIPE_FILE = "bild_draft.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab_ids.json"
KINDS = ("shallow", "early_exit", "feature")
INITS = ("first", "spread")


@dataclass(slots=True)
class DraftRecipe:
    kind: str = "shallow"
    big: str = "smollm2-135m"          # how to load the big model (alias, path or hub id)
    n_layers: int = 2                  # shallow, feature: trainable layers; early_exit: shared big layers before
                                       # the exit
    init: str = "spread"               # shallow: which big layers initialise the draft's layers
    init_layers: list[int] = field(default_factory=list)   # resolved big layer ids (filled by resolve_layers)
    exit_init: int = -1                # early_exit: big layer that initialises the exit layer (-1: the last)
    vocab_size: int | None = None      # reduced head over this many frequent tokens (None: full vocabulary)
    vocab_file: str | None = None
    init_draft: str | None = None      # feature: the shallow draft whose layers, norm and head it started from
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"draft kind must be one of {KINDS}, got {self.kind!r}")
        if self.init not in INITS and not self.init_layers:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")


def resolve_layers(recipe: DraftRecipe, n_big: int) -> list[int]:
    """Big layer ids that initialise (shallow) or are shared into (early_exit) the draft."""
    if recipe.init_layers:
        layers = list(recipe.init_layers)
    elif recipe.kind == "early_exit" or recipe.init == "first":
        layers = list(range(recipe.n_layers))
    elif recipe.n_layers == 1:
        layers = [n_big - 1]
    else:  # spread: 0 .. n_big-1 evenly, so the first and the last big layers are always included
        layers = [round(i * (n_big - 1) / (recipe.n_layers - 1)) for i in range(recipe.n_layers)]
    if len(layers) != recipe.n_layers or not all(0 <= i < n_big for i in layers):
        raise ValueError(f"bad layer choice {layers} for a {n_big}-layer big model")
    return layers


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def build_draft(big: nn.Module, recipe: DraftRecipe, kept_ids: torch.Tensor | None = None) -> nn.Module:
    """A K-layer model of the big model's class sharing its embeddings, rotary module and head."""
    n_big = len(_layers(big))
    recipe.init_layers = resolve_layers(recipe, n_big)
    head = big.get_output_embeddings()
    recipe.vocab_size = None if kept_ids is None else len(kept_ids)
    if recipe.kind == "feature":
        from .feature import FeatureDraft, check_big
        check_big(big)
        reduced = head if kept_ids is None else ReducedHead(head, kept_ids, big.config.vocab_size)
        return FeatureDraft(big, reduced, recipe.init_layers).eval()
    if recipe.kind == "shallow":
        layers = [copy.deepcopy(_layers(big)[i]) for i in recipe.init_layers]
    else:  # shared first layers (big objects) + a trainable exit layer
        exit_from = recipe.exit_init % n_big
        layers = [_layers(big)[i] for i in recipe.init_layers] + [copy.deepcopy(_layers(big)[exit_from])]
    config = copy.deepcopy(big.config)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:len(layers)]
    with torch.device("meta"):   # skeleton only: every module is replaced below
        draft = type(big)(config)
    for i, layer in enumerate(layers):
        if recipe.kind == "shallow" or i == len(layers) - 1:
            layer.self_attn.layer_idx = i    # the cache slot this layer writes
    draft.model.layers = nn.ModuleList(layers)
    draft.model.embed_tokens = big.model.embed_tokens
    draft.model.rotary_emb = big.model.rotary_emb
    draft.model.norm = copy.deepcopy(big.model.norm)
    draft.lm_head = head if kept_ids is None else ReducedHead(head, kept_ids, config.vocab_size)
    _assert_materialised(draft)
    draft.eval()
    return draft


def _assert_materialised(model: nn.Module) -> None:
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise RuntimeError(f"draft has uninitialised tensors: {meta[:5]}")


def shared_tensor_ids(big: nn.Module) -> set[int]:
    return {t.data_ptr() for t in list(big.parameters()) + list(big.buffers())}


def unique_state(draft: nn.Module, big: nn.Module) -> dict[str, torch.Tensor]:
    """The draft's own weights: every parameter whose storage the big model does not hold."""
    shared = shared_tensor_ids(big)
    return {n: p.detach() for n, p in draft.named_parameters(remove_duplicate=False) if p.data_ptr() not in shared}


def trainable_parameters(draft: nn.Module, big: nn.Module) -> list[nn.Parameter]:
    shared = shared_tensor_ids(big)
    return [p for p in draft.parameters() if p.data_ptr() not in shared]


def parameter_counts(draft: nn.Module, big: nn.Module) -> dict:
    unique = sum(t.numel() for t in unique_state(draft, big).values())
    total = sum(p.numel() for p in draft.parameters())
    if isinstance(draft.lm_head, ReducedHead):
        total += draft.lm_head.sub_weight.numel()
    return {"unique": unique, "total": total, "big": sum(p.numel() for p in big.parameters())}


def save_draft(draft: nn.Module, big: nn.Module, recipe: DraftRecipe, path: str) -> None:
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    if isinstance(draft.lm_head, ReducedHead):
        recipe.vocab_file = VOCAB_FILE
        with open(os.path.join(path, VOCAB_FILE), "w") as f:
            json.dump(draft.lm_head.kept.tolist(), f)
    state = {n: t.contiguous().clone() for n, t in unique_state(draft, big).items()}
    save_file(state, os.path.join(path, WEIGHTS_FILE))
    with open(os.path.join(path, RECIPE_FILE), "w") as f:
        json.dump(asdict(recipe), f, indent=2)


def read_recipe(path: str) -> DraftRecipe:
    with open(os.path.join(path, RECIPE_FILE)) as f:
        return DraftRecipe(**json.load(f))


def is_draft_dir(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.path.isfile(os.path.join(path, RECIPE_FILE))


def load_draft(path: str, big_model: nn.Module) -> nn.Module:
    """Rebuild the draft around `big_model` and load its unique weights (strict: names and shapes must match)."""
    from safetensors.torch import load_file
    recipe = read_recipe(path)
    kept = None
    if recipe.vocab_file:
        with open(os.path.join(path, recipe.vocab_file)) as f:
            kept = torch.tensor(json.load(f), dtype=torch.long)
    draft = build_draft(big_model, recipe, kept)
    state = load_file(os.path.join(path, WEIGHTS_FILE))
    own = unique_state(draft, big_model)
    if set(state) != set(own):
        raise ValueError(f"draft weights do not match the recipe: missing {sorted(set(own) - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - set(own))[:5]}")
    with torch.no_grad():
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise ValueError(f"{name}: saved shape {tuple(tensor.shape)} != {tuple(own[name].shape)}")
            own[name].copy_(tensor)
    draft.eval()
    return draft


def frequent_tokens(token_lists, n: int, always: list[int] = ()) -> torch.Tensor:
    """The n most frequent ids over `token_lists` (iterable of 1-D tensors), plus `always`, sorted."""
    counts = None
    for ids in token_lists:
        c = torch.bincount(ids.long().flatten())
        counts = c if counts is None else _add_padded(counts, c)
    keep = set(int(i) for i in always)
    order = counts.argsort(descending=True).tolist()
    for i in order:
        if len(keep) >= n or counts[i] == 0:
            break
        keep.add(i)
    return torch.tensor(sorted(keep), dtype=torch.long)


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if len(a) < len(b):
        a, b = b, a
    a = a.clone()
    a[:len(b)] += b
    return a
