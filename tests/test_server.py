"""`bild serve`: the OpenAI-compatible server, driven by the official openai client over loopback."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from bild import BigLittle
from bild.server.app import ServerConfig, create_app

MODEL = "tiny"
CHAT = [{"role": "user", "content": "Hi there"}]


class Controlled:
    """A BigLittle whose worker can be held at a gate, slowed per text piece, or made to fail mid-stream."""

    def __init__(self, pair: BigLittle):
        self.pair = pair
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()
        self.delay = 0.0
        self.fail: Exception | None = None  # raised after `fail_after` text pieces
        self.fail_after = 0
        self.cancelled: list[int] = []  # text pieces seen by each stream that ended cancelled

    def encode(self, prompt):
        return self.pair.encode(prompt)

    def stream(self, prompt, **kwargs):
        self.entered.set()
        self.gate.wait(30)
        return _SlowStream(self.pair.stream(prompt, **kwargs), self)


class _SlowStream:
    def __init__(self, stream, owner: Controlled):
        self.stream, self.owner, self.pieces = stream, owner, 0

    def __iter__(self):
        for piece in self.stream:
            if self.owner.fail and self.pieces >= self.owner.fail_after:
                raise self.owner.fail
            time.sleep(self.owner.delay)
            self.pieces += 1
            yield piece
        if self.stream.result.finish_reason == "cancelled":
            self.owner.cancelled.append(self.pieces)

    @property
    def result(self):
        return self.stream.result


@contextlib.contextmanager
def serving(pair, **config):
    """The app under uvicorn on a free loopback port, in a thread; yields (base URL, uvicorn server)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    app = create_app(pair, ServerConfig(model_name=MODEL, **config))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=None))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    _wait_until(lambda: server.started, "the server did not start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _wait_until(condition, message: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.02)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def pair(llama_pair, tok):
    return BigLittle(*llama_pair, tok)


@pytest.fixture(scope="module")
def controlled(pair):
    return Controlled(pair)


@pytest.fixture(scope="module")
def server(controlled):
    with serving(controlled, queue_size=8, defaults={"max_new_tokens": 16}) as (url, _):
        yield url


@pytest.fixture
def api(server, controlled):
    yield client(server)
    controlled.gate.set()
    controlled.delay, controlled.fail, controlled.fail_after = 0.0, None, 0


def metrics(url: str) -> dict[str, float]:
    """Every sample of /metrics, keyed by name and labels, e.g. 'bild_requests_total{route=...,status=200}'."""
    text = httpx.get(f"{url}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


# --- the happy paths ------------------------------------------------------------------------------------------

def test_completion_matches_the_engine(api, pair):
    res = api.completions.create(model=MODEL, prompt="Hello", max_tokens=12)
    want = pair.generate("Hello", max_new_tokens=12)
    assert res.choices[0].text == want.text
    assert res.choices[0].finish_reason == want.finish_reason
    assert res.usage.prompt_tokens == want.stats.prompt_tokens
    assert res.usage.completion_tokens == len(want.token_ids)
    stats = res.model_extra["bild"]
    assert stats["policy"] == "bild" and stats["big_calls"] >= 1 and len(stats["accepted"]) == stats["big_calls"] - 1


def test_request_fields_override_the_server_defaults(api, pair):
    extra = {"policy": "speculative", "gamma": 3, "rollback": 2.0, "fallback": 0.3}
    res = api.completions.create(model=MODEL, prompt=[1, 40, 41], max_tokens=20, temperature=0.7, top_p=0.9,
                                 seed=3, stop=["zz", "q"], extra_body=extra)
    want = pair.generate([1, 40, 41], max_new_tokens=20, temperature=0.7, top_p=0.9, seed=3, stop=["zz", "q"],
                         **extra)
    assert res.choices[0].text == want.text and res.model_extra["bild"]["policy"] == "speculative"


def test_chat_matches_the_engine(api, pair):
    res = api.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=10)
    assert res.choices[0].message.content == pair.generate(CHAT, max_new_tokens=10).text
    assert res.choices[0].message.role == "assistant" and res.object == "chat.completion"


@pytest.mark.parametrize("chat", [False, True])
def test_streaming_equals_the_whole_response(api, chat):
    kwargs = dict(model=MODEL, max_tokens=40, stop="~")
    if chat:
        whole = api.chat.completions.create(messages=CHAT, **kwargs)
        chunks = list(api.chat.completions.create(messages=CHAT, stream=True,
                                                  stream_options={"include_usage": True}, **kwargs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        want = whole.choices[0].message.content
    else:
        whole = api.completions.create(prompt="Stream me", **kwargs)
        chunks = list(api.completions.create(prompt="Stream me", stream=True,
                                             stream_options={"include_usage": True}, **kwargs))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        want = whole.choices[0].text
    assert text == want
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert finishing[0].model_extra["bild"]["new_tokens"] == whole.usage.completion_tokens
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_models_and_health(server, api):
    assert [m.id for m in api.models.list()] == [MODEL]
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


# --- bad requests ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,status,param", [
    (dict(n=2), 400, "n"),
    (dict(temperature=-0.5), 400, "temperature"),
    (dict(temperature=7.0), 400, "temperature"),
    (dict(top_p=0.0), 400, "top_p"),
    (dict(max_tokens=0), 400, "max_tokens"),
    (dict(model="gpt-4"), 404, "model"),
    (dict(prompt="a" * 300), 400, "prompt"),
    (dict(prompt=""), 400, "prompt"),
    (dict(prompt=[5, 999]), 400, "prompt"),
    (dict(prompt=["one", "two"]), 400, "prompt"),
    (dict(extra_body={"policy": "fastest"}), 400, "policy"),
    (dict(extra_body={"fallback": 2.0}), 400, "fallback"),
    (dict(extra_body={"gamma": "three"}), 400, "gamma"),
    (dict(logprobs=2), 400, "logprobs"),
    (dict(stop=[str(i) for i in range(17)]), 400, "stop"),
])
def test_bad_requests_get_openai_errors(api, kwargs, status, param):
    with pytest.raises(openai.APIStatusError) as info:
        api.completions.create(**{"model": MODEL, "prompt": "Hi", "max_tokens": 4, **kwargs})
    assert info.value.status_code == status
    error = info.value.body
    assert error["param"] == param and error["message"] and "type" in error


def test_extreme_sampling_settings_are_served(api, pair):
    """A tiny top_p keeps only the top token and a tiny temperature is greedy: both give the greedy text."""
    greedy = pair.generate("Hi", policy="ar", max_new_tokens=4).text
    for kwargs in (dict(top_p=1e-300, temperature=1.0), dict(temperature=1e-38)):
        res = api.completions.create(model=MODEL, prompt="Hi", max_tokens=4, seed=1,
                                     extra_body={"policy": "speculative"}, **kwargs)
        assert res.choices[0].text == greedy


def test_bad_chat_messages(api):
    for messages in ([], [{"role": "user"}], [{"role": "wizard", "content": "x"}], [{"role": "user", "content": ""}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]):
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(model=MODEL, messages=messages)
        assert info.value.body["param"] == "messages"


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"prompt"', b'{"prompt": 5}', b'{"prompt": "a",}',
                                  b'{"prompt": "a", "max_tokens": true}', b'{"prompt": "a", "temperature": NaN}'])
def test_malformed_bodies(server, body):
    r = httpx.post(f"{server}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_route_and_oversized_body(server):
    r = httpx.get(f"{server}/v2/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(f"{server}/v1/completions", content=b" " * (5 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 413


# --- load and faults ------------------------------------------------------------------------------------------

def test_a_failing_generation_is_a_500_for_that_request_only(api, controlled):
    controlled.fail = RuntimeError("boom")
    with pytest.raises(openai.InternalServerError) as info:
        api.completions.create(model=MODEL, prompt="Hi", max_tokens=4)
    assert info.value.body["type"] == "server_error"
    controlled.fail_after = 2  # a stream has started: the failure arrives as an error event after the text
    received = []
    with pytest.raises(openai.APIError, match="generation failed"):
        for chunk in api.completions.create(model=MODEL, prompt="Hi", max_tokens=30, stream=True,
                                            extra_body={"policy": "ar"}):
            received.append(chunk.choices[0].text)
    assert len(received) == 2
    controlled.fail = None
    assert api.completions.create(model=MODEL, prompt="Hi", max_tokens=4).choices[0].text


def test_a_full_queue_answers_429_with_retry_after(pair):
    held = Controlled(pair)
    held.gate.clear()
    with serving(held, queue_size=1, retry_after=3) as (url, _), ThreadPoolExecutor(2) as pool:
        api = client(url)
        ask = lambda: api.completions.create(model=MODEL, prompt="Hi", max_tokens=4)  # noqa: E731
        running = pool.submit(ask)
        assert held.entered.wait(30)                      # the worker holds the first request
        waiting = pool.submit(ask)
        _wait_until(lambda: httpx.get(f"{url}/health").json()["queued"] == 1, "the second request never queued")
        with pytest.raises(openai.RateLimitError) as info:
            ask()
        assert info.value.response.headers["retry-after"] == "3"
        assert info.value.body["code"] == "queue_full"
        held.gate.set()
        assert running.result(30).choices[0].text and waiting.result(30).choices[0].text
        assert metrics(url)['bild_requests_total{route=/v1/completions,status=429}'] == 1


def test_disconnect_cancels_the_generation(server, api, controlled, pair):
    controlled.delay = 0.05  # 200 tokens would take 10 s or more
    stream = api.completions.create(model=MODEL, prompt="Go", max_tokens=200, stream=True,
                                    extra_body={"policy": "ar"})
    next(iter(stream))
    stream.close()
    _wait_until(lambda: metrics(server)["bild_cancelled_total"] == 1, "the generation was not cancelled")
    assert len(controlled.cancelled) == 1 and controlled.cancelled[0] < 50
    controlled.delay = 0.0
    after = api.completions.create(model=MODEL, prompt="Hi", max_tokens=8).choices[0].text
    assert after == pair.generate("Hi", max_new_tokens=8).text  # nothing of the cancelled request lingers


def test_disconnect_while_waiting_for_a_whole_response_cancels_too(server, controlled):
    controlled.delay = 0.05
    before = metrics(server)["bild_cancelled_total"]
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server}/v1/completions", json={"prompt": "Go", "max_tokens": 200, "policy": "ar"}, timeout=0.5)
    _wait_until(lambda: metrics(server)["bild_cancelled_total"] == before + 1, "the generation was not cancelled")
    assert controlled.cancelled[-1] < 50


def test_metrics_expose_requests_tokens_and_decoding_counts(server, api):
    api.completions.create(model=MODEL, prompt="Count", max_tokens=16)
    m = metrics(server)
    assert m["bild_requests_total{route=/v1/completions,status=200}"] >= 1
    assert m["bild_requests_total{route=/v1/completions,status=400}"] >= 1
    assert m["bild_generated_tokens_total"] >= 16
    assert m["bild_big_calls_total"] >= 1 and m["bild_little_calls_total"] >= 1
    for name in ("bild_fallbacks_total", "bild_rollbacks_total", "bild_queue_depth", "bild_busy"):
        assert name in m
    for hist in ("bild_acceptance_length", "bild_queue_seconds", "bild_request_seconds"):
        assert m[f"{hist}_count"] >= 1 and f"{hist}_bucket{{le=+Inf}}" in m


def test_the_same_seed_gives_the_same_text_idle_or_loaded(api):
    ask = lambda prompt: api.completions.create(  # noqa: E731
        model=MODEL, prompt=prompt, max_tokens=24, temperature=1.5, seed=11).choices[0].text
    idle = ask("Seeded")
    with ThreadPoolExecutor(6) as pool:
        loaded = list(pool.map(ask, ["Seeded", "Other", "Seeded", "Noise", "Seeded", "Else"]))
    assert loaded[0] == loaded[2] == loaded[4] == idle
    assert api.completions.create(model=MODEL, prompt="Seeded", max_tokens=24, temperature=1.5,
                                  seed=12).choices[0].text != idle


def test_shutdown_finishes_in_flight_requests(pair):
    slow = Controlled(pair)
    slow.delay = 0.01
    with serving(slow, queue_size=4) as (url, server):
        api = client(url)
        stream = api.completions.create(model=MODEL, prompt="Go", max_tokens=60, stream=True,
                                        extra_body={"policy": "ar"})
        chunks = iter(stream)
        first = next(chunks)
        server.should_exit = True  # what uvicorn's SIGTERM handler does
        rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    assert len(first.choices[0].text + "".join(c.choices[0].text for c in rest)) == 60
    assert slow.cancelled == []


# `bild serve` as the CLI runs it, without the other CLI plugins (work in progress elsewhere must not break this)
SERVE = ("import argparse, sys; from bild.cli.serve import add_commands; p = argparse.ArgumentParser(prog='bild'); "
         "add_commands(p.add_subparsers()); a = p.parse_args(); sys.exit(a.handler(a))")


@pytest.fixture(scope="module", autouse=True)
def cli_server(llama_dir):
    """`bild serve` in a subprocess, started with the module so that its slow start overlaps the other tests."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-c", SERVE, "serve", "--big", llama_dir, "--little", "early-exit:1", "--threads", "1",
           "--port", str(port), "--model-name", MODEL, "--max-new-tokens", "6", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, f"http://127.0.0.1:{port}"
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_bild_serve_cli_serves_and_exits_on_sigterm(cli_server):
    proc, url = cli_server
    _wait_until(lambda: _healthy(url) or proc.poll() is not None, "bild serve did not start", timeout=80)
    assert proc.poll() is None, proc.stdout.read()
    res = client(url).completions.create(model=MODEL, prompt="Hi")
    assert res.usage.completion_tokens <= 6 and res.model_extra["bild"]["policy"] == "bild"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


# --- no request body gets a 5xx -------------------------------------------------------------------------------

scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=12))
junk = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4), max_leaves=8)
prompts = st.one_of(st.text(min_size=1, max_size=40), st.lists(st.integers(0, 95), min_size=1, max_size=20))
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]),
                                           "content": st.text(min_size=1, max_size=30)}), min_size=1, max_size=3)
# mostly valid, each a little past its edges, so that most requests generate and the edges get probed
PLAUSIBLE = {"model": st.just(MODEL), "max_tokens": st.integers(0, 12), "max_completion_tokens": st.integers(0, 12),
             "temperature": st.one_of(st.just(0.0), st.floats(0, 2.2)), "top_p": st.floats(0, 1.05),
             "top_k": st.integers(0, 120), "seed": st.integers(-2**64, 2**64),
             "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=4)),
             "n": st.sampled_from([None, 1, 1, 2]), "stream": st.booleans(),
             "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
             "policy": st.sampled_from(["ar", "little", "bild", "speculative", "bild", "x"]),
             "fallback": st.floats(-0.05, 1.05), "rollback": st.one_of(st.floats(0, 10), st.just(float("inf"))),
             "gamma": st.integers(0, 8), "max_little": st.integers(0, 8), "adaptive": st.booleans()}
ANY = {name: st.one_of(value, junk) for name, value in PLAUSIBLE.items()} | {"logprobs": junk, "echo": junk}


def bodies(path: str):
    key, value = ("messages", messages) if "chat" in path else ("prompt", prompts)
    plausible = st.fixed_dictionaries({key: value}, optional=PLAUSIBLE)
    anything = st.fixed_dictionaries({}, optional={key: st.one_of(value, junk), **ANY})
    return st.one_of(plausible, plausible, plausible, anything, junk)


@pytest.fixture(scope="module")
def local(pair):
    with TestClient(create_app(pair, ServerConfig(model_name=MODEL, defaults={"max_new_tokens": 4}))) as c:
        yield c


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(data=st.data(), path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_no_request_body_gets_a_5xx(local, data, path):
    body = data.draw(bodies(path))
    r = local.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
