"""OpenAI request bodies (validated by pydantic) and the response bodies and stream chunks built from results."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from ..api import GenerationResult
from ..config import GenerationConfig

MAX_STOP = 16          # stop strings are checked after every token
UNSUPPORTED = ("echo", "suffix", "logprobs", "top_logprobs", "best_of", "logit_bias", "tools", "functions")
# GenerationConfig fields a request names otherwise (OpenAI's names), and what a request may send for a field
REQUEST_NAMES = {"max_new_tokens": "max_tokens"}
REQUEST_TYPES = {"stop": str | list[str]}
# the API's own limits, beyond GenerationConfig's checks (OpenAI's temperature range; seeds that fit an int64)
LIMITS = {"max_new_tokens": dict(ge=1), "temperature": dict(ge=0, le=2, allow_inf_nan=False),
          "top_p": dict(gt=0, le=1, allow_inf_nan=False), "seed": dict(ge=-2**63, lt=2**63),
          "fallback": dict(allow_inf_nan=False)}  # rollback may be Infinity: it disables rollback
_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
# the GenerationConfig settings a request may override, under the same names (max_tokens is max_new_tokens)
OVERRIDES = tuple(f.name for f in fields(GenerationConfig) if f.name not in REQUEST_NAMES)


def request_field(setting: str | None) -> str | None:
    """The request field that carries a GenerationConfig setting (or an input such as "prompt")."""
    return REQUEST_NAMES.get(setting, setting) if setting else None


def _setting_fields() -> dict:
    """A pydantic field for each GenerationConfig setting: optional (None: the server's default), typed like it."""
    out = {}
    for f in fields(GenerationConfig):
        kind = REQUEST_TYPES.get(f.name) or _TYPES[str(f.type).removesuffix(" | None")]
        out[request_field(f.name)] = (kind | None, Field(None, **LIMITS.get(f.name, {})))
    return out


class ApiError(Exception):
    """An error answer (4xx, or 500 for one failed generation), in OpenAI's error format."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints: these, and one per GenerationConfig setting (see Sampling); the bild
    settings (policy ... adaptive) are extensions."""
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def settings(self, defaults: dict) -> dict:
        """GenerationConfig keyword arguments: the server's defaults, overridden by this request."""
        self._check_limits()
        given = {k: v for k in OVERRIDES if (v := getattr(self, k)) is not None}
        if self.max_length() is not None:
            given["max_new_tokens"] = self.max_length()
        settings = {**defaults, **given}
        GenerationConfig(**settings)  # BildError names the field
        return settings

    def max_length(self) -> int | None:
        return self.max_tokens

    def _check_limits(self) -> None:
        if self.n not in (None, 1):
            raise ApiError(f"n={self.n} is not supported: this server returns one choice per request", "n")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ApiError(f"at most {MAX_STOP} stop strings are supported, got {len(self.stop)}", "stop")
        for name in UNSUPPORTED:
            if (self.model_extra or {}).get(name):
                raise ApiError(f"{name} is not supported by this server", name)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


Sampling = create_model("Sampling", __base__=_Sampling, __module__=__name__, **_setting_fields())


class CompletionRequest(Sampling):
    prompt: str | list[int] | list[str]

    def prompt_input(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) > 1:
                raise ApiError("batched prompts are not supported: send one prompt per request", "prompt")
            return self.prompt[0]
        return self.prompt


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    def prompt_input(self) -> list[dict]:
        return [m.as_dict() for m in self.messages]

    def max_length(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


@dataclass(slots=True)
class Reply:
    """Builds one response's bodies and stream chunks; `chat` picks the chat-completion shapes."""
    model: str
    chat: bool
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def body(self, result: GenerationResult) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None}
        choice["finish_reason"] = result.finish_reason
        return {**self._head(stream=False), "choices": [choice], "usage": usage(result),
                "bild": result.stats.to_dict()}

    def role_chunk(self) -> dict:
        """A chat stream's first chunk: the assistant's role, no text yet."""
        return self._chunk({"role": "assistant", "content": ""})

    def chunk(self, text: str) -> dict:
        return self._chunk({"content": text} if self.chat else {"text": text})

    def last_chunk(self, result: GenerationResult) -> dict:
        """Carries the finish reason and, as an extension, the decoding statistics."""
        last = self._chunk({} if self.chat else {"text": ""}, result.finish_reason)
        return {**last, "bild": result.stats.to_dict()}

    def usage_chunk(self, result: GenerationResult) -> dict:
        return {**self._head(stream=True), "choices": [], "usage": usage(result)}

    def _chunk(self, content: dict, finish_reason: str | None = None) -> dict:
        choice = {"index": 0, "delta": content} if self.chat else {"index": 0, **content, "logprobs": None}
        return {**self._head(stream=True), "choices": [{**choice, "finish_reason": finish_reason}]}

    def _head(self, stream: bool) -> dict:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(result: GenerationResult) -> dict:
    s = result.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.new_tokens,
            "total_tokens": s.prompt_tokens + s.new_tokens}
