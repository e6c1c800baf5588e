"""Benchmark methods: a spec string ("bild:fallback=0.5,rollback=3") parsed into a small Method, and run once.

Engine methods (ar, little, speculative, bild) go through BigLittle.generate. Baselines use the same models
through transformers' own `generate` (greedy): the big model alone, assisted by the little model, or with
prompt lookup. `llamacpp` and `llamacpp-spec` run the same GGUF files in llama.cpp's own tools (its ar, and its
speculative decoding with the little file as draft), built by benchmarks/llamacpp.sh.
"""

from __future__ import annotations

import copy
import glob
import math
import os
import re
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields

from ..config import POLICIES, GenerationConfig
from ..errors import BildError
from ..files import cache_root

HF = ("hf-generate", "hf-assisted", "hf-prompt-lookup")
_SETTING = {f.name: {"int": int, "float": float, "bool": bool}.get(str(f.type)) for f in fields(GenerationConfig)}


def _settings(*names: str) -> dict[str, type]:
    """GenerationConfig settings a method's spec may give, with their types from the dataclass."""
    return {name: _SETTING[name] for name in names}


# method -> {parameter: type}, in the order labels print them
PARAMS: dict[str, dict[str, type]] = {
    "ar": {}, "little": {},
    "speculative": _settings("gamma", "adaptive", "lookup"),
    "bild": _settings("fallback", "rollback", "max_little", "lookup"),
    "hf-generate": {}, "hf-assisted": {},
    "hf-prompt-lookup": {"prompt_lookup_num_tokens": int},
    "llamacpp": {}, "llamacpp-spec": {"draft_max": int},
}
DEFAULTS = {"hf-prompt-lookup": {"prompt_lookup_num_tokens": 10}}


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    params: tuple[tuple[str, object], ...] = ()   # (key, value) in PARAMS order

    def __post_init__(self):
        if self.name not in PARAMS:
            raise BildError(f"unknown method {self.name!r}; choose one of {', '.join(PARAMS)}", field="methods")
        for key, _ in self.params:
            if key not in PARAMS[self.name]:
                allowed = ", ".join(PARAMS[self.name]) or "none"
                raise BildError(f"method {self.name!r} has no parameter {key!r} (parameters: {allowed})",
                                field="methods")
        if self.name in POLICIES:
            GenerationConfig(policy=self.name, **self.kwargs)  # range checks live in one place

    @property
    def kwargs(self) -> dict:
        return dict(self.params)

    @property
    def label(self) -> str:
        """Canonical spec: parse_method(m.label) == m."""
        parts = [k if v is True else f"{k}={_fmt(v)}" for k, v in self.params if v is not False]
        return self.name + (":" + ",".join(parts) if parts else "")

    def with_defaults(self, defaults: dict) -> Method:
        """Fill parameters this method takes and the spec left unset (e.g. from a tuned config)."""
        given = self.kwargs
        extra = {k: v for k, v in defaults.items() if k in PARAMS[self.name] and k not in given}
        return _make(self.name, {**given, **extra})


def parse_method(spec: str) -> Method:
    """'bild', 'speculative:gamma=4', 'speculative:adaptive', 'bild:fallback=0.5,rollback=inf' -> Method."""
    name, colon, rest = spec.strip().partition(":")
    if name not in PARAMS:
        raise BildError(f"unknown method {name!r} in {spec!r}; choose one of {', '.join(PARAMS)}", field="methods")
    values: dict[str, object] = {}
    for part in [p.strip() for p in rest.split(",") if p.strip()]:
        key, eq, raw = part.partition("=")
        key = key.strip().replace("-", "_")
        kind = PARAMS[name].get(key)
        if kind is None:
            allowed = ", ".join(PARAMS[name]) or "none"
            raise BildError(f"method {name!r} has no parameter {key!r} (parameters: {allowed})", field="methods")
        if key in values:
            raise BildError(f"parameter {key!r} given twice in {spec!r}", field="methods")
        values[key] = _convert(kind, raw.strip() if eq else None, key, spec)
    if colon and not values:
        raise BildError(f"empty parameter list in {spec!r}", field="methods")
    return _make(name, values)


def _make(name: str, values: dict) -> Method:
    return Method(name, tuple((k, values[k]) for k in PARAMS[name] if k in values))


def _convert(kind: type, raw: str | None, key: str, spec: str):
    if kind is bool:
        if raw is None or raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise BildError(f"{key} in {spec!r} is a flag: write {key} or {key}=false", field="methods")
    if raw is None or raw == "":
        raise BildError(f"{key} in {spec!r} needs a value: {key}=...", field="methods")
    try:
        value = kind(raw)
    except ValueError:
        raise BildError(f"{key} in {spec!r} must be {'an integer' if kind is int else 'a number'}, "
                        f"got {raw!r}", field="methods") from None
    if kind is float and math.isnan(value):
        raise BildError(f"{key} in {spec!r} must be a number, got {raw!r}", field="methods")
    return value


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def available(method: Method, bl) -> str | None:
    """None when the method can run here with this pair, else why not."""
    if method.name in HF and bl.big is None:
        return f"{method.name} skipped: the pair was read straight from GGUF files, with no transformers model"
    if method.name in LLAMACPP:
        if llamacpp_bin() is None:
            return f"{method.name} skipped: llama.cpp is not built here (bash benchmarks/llamacpp.sh, ~10 minutes)"
        if not bl.big_file or (method.name == "llamacpp-spec" and not bl.little_file):
            return f"{method.name} skipped: it needs the big{' and little' if method.name != 'llamacpp' else ''} " \
                   "model as a GGUF file"
    return None


# --- running one method on one prompt -------------------------------------------------------------------

def run(bl, method: Method, prompt, max_new_tokens: int) -> dict:
    """Generate once; return the timing and counter fields of a record (text and token ids included)."""
    if method.name in POLICIES:
        return _run_engine(bl, method, prompt, max_new_tokens)
    if method.name in HF:
        return _run_hf(bl, method, prompt, max_new_tokens)
    return _run_llamacpp(bl, method, prompt, max_new_tokens)


def _run_engine(bl, method: Method, prompt, max_new_tokens: int) -> dict:
    res = bl.generate(prompt, policy=method.name, max_new_tokens=max_new_tokens, **method.kwargs)
    s = res.stats
    return dict(prompt_tokens=s.prompt_tokens, new_tokens=s.new_tokens, seconds=s.seconds,
                tokens_per_s=s.tokens_per_s, big_calls=s.big_calls, little_calls=s.little_calls,
                fallbacks=s.fallbacks, rollbacks=s.rollbacks, accepted=list(s.accepted), drafted=list(s.drafted),
                finish_reason=s.finish_reason, text=res.text, token_ids=list(res.token_ids))


def _run_hf(bl, method: Method, prompt, max_new_tokens: int) -> dict:
    import torch

    big, little = hf_models(bl)
    ids = bl.encode(prompt)
    x = torch.tensor([ids], device=big.device)  # (1, T)
    eos = sorted(bl.eos_ids)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                  eos_token_id=eos, pad_token_id=bl.tokenizer.pad_token_id if bl.tokenizer.pad_token_id
                  is not None else eos[0], attention_mask=torch.ones_like(x))
    if method.name == "hf-assisted":
        if bl.little_runner.needs_big:
            raise BildError("hf-assisted needs a Hugging Face little model; this one reads the big model's "
                            "features and runs only in bild's native engine", field="little")
        kwargs["assistant_model"] = little
    if method.name == "hf-prompt-lookup":
        kwargs["prompt_lookup_num_tokens"] = {**DEFAULTS[method.name], **method.kwargs}["prompt_lookup_num_tokens"]
    with count_calls(big) as big_calls, count_calls(little) as little_calls, torch.inference_mode():
        t0 = time.perf_counter()
        out = big.generate(x, **kwargs)  # (1, T + new)
        seconds = time.perf_counter() - t0
    new = out[0, len(ids):].tolist()
    if any(t in bl.eos_ids for t in new):  # drop padding after the first EOS, keep the EOS like the engine does
        new = new[: next(i for i, t in enumerate(new) if t in bl.eos_ids) + 1]
    return dict(prompt_tokens=len(ids), new_tokens=len(new), seconds=seconds,
                tokens_per_s=len(new) / seconds if seconds > 0 else 0.0, big_calls=big_calls[0],
                little_calls=little_calls[0] if method.name == "hf-assisted" else 0, fallbacks=None, rollbacks=None,
                accepted=None, drafted=None,
                finish_reason="stop" if new and new[-1] in bl.eos_ids else "length",
                text=bl.tokenizer.decode(new, skip_special_tokens=True), token_ids=new)


_FP32 = {}


def hf_models(bl) -> tuple:
    """The models transformers' generate runs. With fp16 weights (native engine) they are fp32 copies of the same
    rounded weights: HF on CPU in fp16 is neither fast nor what anyone would compare against."""
    import torch

    if bl.big.dtype != torch.float16:
        return bl.big, bl.little
    if _FP32.get("of") is not bl:  # one pair at a time: a benchmark run uses one BigLittle
        _FP32.update({"of": bl, "pair": (copy.deepcopy(bl.big).float(), copy.deepcopy(bl.little).float())})
    return _FP32["pair"]


@contextmanager
def count_calls(model):
    """Count forward calls of exactly this module. An early-exit little model is a shallow clone of the big
    one and shares its hook table, so the hook checks identity."""
    counter = [0]

    def hook(module, args, output):
        if module is model:
            counter[0] += 1

    handle = model.register_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


LLAMACPP = ("llamacpp", "llamacpp-spec")
TIMING = re.compile(r"(prompt eval|eval) time =\s*([\d.]+) ms /\s*(\d+) (?:tokens|runs)")
SPEC = re.compile(r"(encoded|decoded)\s+(\d+) tokens in\s+([\d.]+) seconds")


def llamacpp_bin() -> str | None:
    """llama.cpp's bin directory: $BILD_LLAMACPP, else a build `bash benchmarks/llamacpp.sh` left in the cache."""
    if os.environ.get("BILD_LLAMACPP"):
        return os.environ["BILD_LLAMACPP"]
    builds = glob.glob(os.path.join(cache_root(), "llamacpp", "build-*", "bin", "llama-speculative-simple"))
    return os.path.dirname(max(builds, key=os.path.getmtime)) if builds else None


def _run_llamacpp(bl, method: Method, prompt, max_new_tokens: int) -> dict:
    """The same GGUF files in llama.cpp's own tools, greedy, with torch's thread count (the same cores as bild):
    llama-completion (its ar) or llama-speculative-simple with the little file as draft. Tokens per second count
    as bild's do, prefill included and model loading excluded: llama.cpp's own prompt-eval and eval times."""
    import torch

    ids = bl.encode(prompt)
    text_prompt = bl.tokenizer.decode(ids)  # the chat template applied, as bild feeds it
    common = ["-m", bl.big_file, "-t", str(torch.get_num_threads()), "-p", text_prompt, "-n", str(max_new_tokens),
              "--temp", "0", "--top-k", "1", "-c", str(len(ids) + max_new_tokens + 64)]
    if method.name == "llamacpp":
        out, err = _tool("llama-completion", common + ["-no-cnv", "--no-display-prompt"])
        times = {kind: (float(ms), int(n)) for kind, ms, n in TIMING.findall(err)}
        seconds = (times["prompt eval"][0] + times.get("eval", (0.0, 0))[0]) / 1e3
        text, calls = out, times.get("eval", (0.0, 0))[1] + 1  # the first token comes from the prompt's pass
    else:
        args = ["-md", bl.little_file, "--spec-type", "draft-simple",
                "--spec-draft-n-max", str(dict(method.params).get("draft_max", 3))]
        out, err = _tool("llama-speculative-simple", common + args)
        spans = {kind: (int(n), float(s)) for kind, n, s in SPEC.findall(err)}
        seconds = spans["encoded"][1] + spans["decoded"][1]
        text, calls = out.split(text_prompt.rstrip()[-40:], 1)[-1], None  # it echoes the prompt first
    new = bl.tokenizer(text.strip("\n") if method.name != "llamacpp" else text, add_special_tokens=False).input_ids
    new = new[:max_new_tokens]
    return dict(prompt_tokens=len(ids), new_tokens=len(new), seconds=seconds,
                tokens_per_s=len(new) / seconds if seconds > 0 else 0.0, big_calls=calls, little_calls=None,
                fallbacks=None, rollbacks=None, accepted=None, drafted=None,
                finish_reason="length" if len(new) >= max_new_tokens else "stop",
                text=bl.tokenizer.decode(new, skip_special_tokens=True), token_ids=new)


def _tool(name: str, args: list[str]) -> tuple[str, str]:
    done = subprocess.run([os.path.join(llamacpp_bin(), name), *args], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=3600)
    if done.returncode:
        raise BildError(f"{name} failed ({done.returncode}): {done.stderr.strip()[-300:]}", field="methods")
    return done.stdout, done.stderr
