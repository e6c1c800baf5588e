"""The FastAPI app: OpenAI-compatible routes in front of one Worker that owns the model pair."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..config import GenerationConfig
from ..errors import BildError
from .monitor import Monitor
from .schema import ApiError, ChatRequest, CompletionRequest, Reply, Sampling, request_field
from .worker import Job, QueueFull, Stopped, Worker, is_bad_input

log = logging.getLogger("bild.server")
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
MAX_BODY = 4 << 20   # bytes; a prompt longer than any context fits well within this
POLL = 0.25          # seconds between disconnect checks while a request waits for the worker


@dataclass(slots=True)
class ServerConfig:
    model_name: str = "bild"
    queue_size: int = 16          # requests that may wait while one generates; more get 429
    retry_after: int = 1          # seconds, sent with 429
    defaults: dict = field(default_factory=dict)  # GenerationConfig keyword arguments for every request

    def __post_init__(self):
        if not self.model_name:
            raise BildError("the model name must not be empty", field="model_name")
        if not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise BildError(f"queue size must be an integer >= 1, got {self.queue_size!r}", field="queue_size")
        GenerationConfig(**self.defaults)


class ClientGone(Exception):
    pass


def create_app(pair, config: ServerConfig | None = None) -> FastAPI:
    """pair: a BigLittle (or anything with its encode() and stream()); the app's worker thread owns it."""
    config = config or ServerConfig()
    monitor = Monitor()
    worker = Worker(pair, config.queue_size, monitor)
    monitor.watch(worker)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)  # uvicorn has let in-flight requests finish; drain the rest

    app = FastAPI(title="bild", lifespan=lifespan)
    app.state.worker, app.state.monitor, app.state.config = worker, monitor, config
    app.add_middleware(Gate, monitor=monitor)
    _add_error_handlers(app)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await _answer(app, req, req.prompt_input(), Reply(config.model_name, chat=False), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        return await _answer(app, req, req.prompt_input(), Reply(config.model_name, chat=True), request)

    @app.get("/v1/models")
    async def models():
        card = {"id": config.model_name, "object": "model", "created": started, "owned_by": "bild"}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        body = {"status": "stopping" if worker.stopping else "ok", "model": config.model_name,
                "queued": worker.queued, "busy": worker.busy}
        return JSONResponse(body, status_code=503 if worker.stopping else 200)

    @app.get("/metrics")
    async def metrics():
        return Response(monitor.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


async def _answer(app: FastAPI, req: Sampling, prompt, reply: Reply, request: Request) -> Response:
    config, worker = app.state.config, app.state.worker
    if req.model is not None and req.model != config.model_name:
        raise ApiError(f"the model {req.model!r} does not exist; this server serves {config.model_name!r}",
                       "model", status=404, code="model_not_found")
    job, events = _new_job(prompt, req.settings(config.defaults))
    _submit(worker, job, config)
    handed_over = False
    try:
        _raise_if_error(await _next_event(events, request), reply.chat)  # ("start", n): the prompt is accepted
        if req.stream:
            handed_over = True  # from here the stream owns the job
            return _JobStream(job, _sse(events, reply, req.include_usage))
        while (event := await _next_event(events, request))[0] != "done":
            _raise_if_error(event, reply.chat)
        return JSONResponse(reply.body(event[1]))
    except ClientGone:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    finally:
        if not handed_over:
            job.cancelled.set()  # a no-op when the job has finished


def _new_job(prompt, settings: dict) -> tuple[Job, asyncio.Queue]:
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event: tuple) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    return Job(prompt, settings, emit), events


def _submit(worker: Worker, job: Job, config: ServerConfig) -> None:
    try:
        worker.submit(job)
    except QueueFull:
        raise ApiError(f"the server is busy ({config.queue_size} requests waiting); retry later", status=429,
                       type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(config.retry_after)}) from None
    except Stopped:
        raise ApiError("the server is shutting down", status=503, type="server_error",
                       code="shutting_down") from None


async def _next_event(events: asyncio.Queue, request: Request) -> tuple:
    """The worker's next event; ClientGone if the client disconnects first."""
    getter = asyncio.ensure_future(events.get())
    try:
        while True:
            if await request.is_disconnected():  # does not block: it only looks at what has arrived
                raise ClientGone()
            if (await asyncio.wait({getter}, timeout=POLL))[0]:
                return getter.result()
    finally:
        getter.cancel()


def _raise_if_error(event: tuple, chat: bool) -> None:
    if event[0] == "error":
        raise _api_error(event[1], chat)


def _api_error(e: Exception, chat: bool) -> ApiError:
    """A failed job: 400 when the request caused it, else 500 (logged; the worker carries on)."""
    if is_bad_input(e):
        return ApiError((str(e).splitlines() or [type(e).__name__])[0], _param_of(e, chat))
    log.error("generation failed", exc_info=e)
    return ApiError(f"generation failed: {type(e).__name__}", status=500, type="server_error",
                    code="generation_failed")


class _JobStream(StreamingResponse):
    """Server-sent events; however the response ends (done, disconnect, error), the generation stops."""

    def __init__(self, job: Job, events):
        super().__init__(events, media_type="text/event-stream")
        self.job = job

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled.set()  # a no-op when the job has finished


async def _sse(events: asyncio.Queue, reply: Reply, include_usage: bool):
    """The worker's events as OpenAI stream chunks."""
    if reply.chat:
        yield _data(reply.role_chunk())
    while (event := await events.get())[0] == "text":
        yield _data(reply.chunk(event[1]))
    if event[0] == "error":  # the response has begun: the error arrives as an event
        yield _data(_api_error(event[1], reply.chat).body())
        return
    yield _data(reply.last_chunk(event[1]))
    if include_usage:
        yield _data(reply.usage_chunk(event[1]))
    yield "data: [DONE]\n\n"


def _data(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _param_of(e: BildError, chat: bool = False) -> str | None:
    """The request field a BildError is about, from its field (a GenerationConfig setting or "prompt")."""
    param = request_field(e.field)
    return "messages" if chat and param == "prompt" else param


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error_response(e)

    @app.exception_handler(BildError)
    async def bild_error(request, e: BildError):
        return _error_response(ApiError(str(e), _param_of(e)))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return _error_response(ApiError(f"the request body is not valid JSON: {first.get('msg')}"))
        message = f"{'.'.join(where)}: {first.get('msg')}" if where else first.get("msg", "invalid request")
        return _error_response(ApiError(message, where[0] if where else None))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        return _error_response(ApiError(str(e.detail), status=e.status_code, type=kind))


class Gate:
    """ASGI middleware: counts responses by route and status, and refuses oversized bodies up front."""

    def __init__(self, app, monitor: Monitor):
        self.app, self.monitor = app, monitor

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"  # bounded label set

        async def counted(message):
            if message["type"] == "http.response.start":
                self.monitor.requests.labels(route, str(message["status"])).inc()
            await send(message)

        if _content_length(scope) > MAX_BODY:
            response = _error_response(ApiError(f"the request body is larger than {MAX_BODY} bytes", status=413))
            return await response(scope, receive, counted)
        await self.app(scope, receive, counted)


def _content_length(scope) -> int:
    value = dict(scope.get("headers", ())).get(b"content-length", b"0")
    return int(value) if value.isdigit() else 0
