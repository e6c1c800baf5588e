"""Load test for `bild serve`: concurrent clients against a real server on loopback.

    .venv/bin/python benchmarks/load_test.py [--clients 32] [--requests 8] [--max-tokens 32] [--big qwen2.5-coder-1.5b]

Starts `bild serve` on a free 127.0.0.1 port, runs clients × requests through the official openai client
(a mix of completions and chat, streamed and not, greedy and seeded sampling), then checks:
  - no 5xx and no transport errors;
  - every response is complete (a finish_reason; a stream that reached it) and matches its request: the
    same request (prompt, seed) always gets the same text, streamed or not, so a response delivered to the
    wrong request, cut short or garbled shows up as a mismatch;
  - the server is healthy afterwards, and exits with status 0 on SIGTERM.
Prints p50/p95 latency, throughput and the count of each status. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import openai

PROMPTS = ["Name three primary colours.", "What is the capital of France?", "Write a haiku about rain.",
           "Explain what a CPU does in one sentence.", "List two prime numbers.", "Say hello in Spanish.",
           "What is 12 times 12?", "Give one tip for learning to code."]


@dataclass(slots=True)
class Outcome:
    key: tuple            # what determines the text: (kind, prompt index, seed)
    status: str           # "200", "429", ..., or an exception name for transport errors
    seconds: float
    text: str = ""
    tokens: int = 0
    complete: bool = False


def main() -> int:
    args = parse_args()
    port = free_port()
    server = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, server, args.start_timeout)
        t0 = time.perf_counter()
        outcomes = asyncio.run(asyncio.wait_for(run_clients(url, args), args.timeout))
        wall = time.perf_counter() - t0
        healthy = httpx.get(f"{url}/health", timeout=10).json()
        failures = report(outcomes, wall, healthy, args)
        print_server_metrics(httpx.get(f"{url}/metrics", timeout=10).text)
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(120)
    print(f"server exit status after SIGTERM: {code}")
    failures += [] if code == 0 else [f"server exited with status {code}"]
    for f in failures:
        print(f"FAIL: {f}")
    print("PASS" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--big", default="qwen2.5-coder-1.5b")
    p.add_argument("--little", default=None)
    p.add_argument("--policy", default="bild")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="server torch threads (default 1: the CPU is shared)")
    p.add_argument("--queue-size", type=int, default=None, help="server queue depth (default: --clients)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds for the whole run")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds for the server to load")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "bild.cli", "serve", "--big", args.big, "--host", "127.0.0.1", "--port", str(port),
           "--queue-size", str(args.queue_size or args.clients), "--policy", args.policy,
           "--max-new-tokens", str(args.max_tokens), "--threads", str(args.threads), "--log-level", "warning"]
    cmd += ["--little", args.little] if args.little else []
    print("starting:", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_healthy(url: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"bild serve exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"bild serve was not healthy after {timeout:.0f} s")


async def run_clients(url: str, args) -> list[Outcome]:
    api = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=args.timeout)
    model = (await api.models.list()).data[0].id
    clients = [client(api, model, c, args) for c in range(args.clients)]
    return [o for outcomes in await asyncio.gather(*clients) for o in outcomes]


async def client(api, model: str, c: int, args) -> list[Outcome]:
    outcomes = []
    for r in range(args.requests):
        i = c * args.requests + r
        chat, stream, prompt = i % 2 == 1, i % 3 == 0, (c + r) % len(PROMPTS)
        seed = None if i % 4 < 2 else prompt  # half greedy, half sampled with a seed fixed per prompt
        outcomes.append(await one_request(api, model, chat, stream, prompt, seed, args.max_tokens))
    return outcomes


async def one_request(api, model, chat, stream, prompt, seed, max_tokens) -> Outcome:
    sampling = dict(model=model, max_tokens=max_tokens, temperature=0.8 if seed is not None else 0.0, seed=seed)
    out = Outcome(("chat" if chat else "completion", prompt, seed), "", 0.0)
    t0 = time.perf_counter()
    try:
        if chat:
            call = api.chat.completions.create(messages=[{"role": "user", "content": PROMPTS[prompt]}],
                                               stream=stream, **sampling)
        else:
            call = api.completions.create(prompt=PROMPTS[prompt], stream=stream, **sampling)
        res = await call
        await (collect_stream(res, out, chat) if stream else collect(res, out, chat))
        out.status = "200"
    except openai.APIStatusError as e:
        out.status = str(e.status_code)
    except (openai.APIError, httpx.HTTPError) as e:
        out.status = type(e).__name__
    out.seconds = time.perf_counter() - t0
    return out


async def collect(res, out: Outcome, chat: bool) -> None:
    choice = res.choices[0]
    out.text = choice.message.content if chat else choice.text
    out.tokens = res.usage.completion_tokens
    out.complete = choice.finish_reason in ("stop", "length")


async def collect_stream(stream, out: Outcome, chat: bool) -> None:
    pieces = []
    async for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        pieces.append((choice.delta.content or "") if chat else choice.text)
        if choice.finish_reason:
            out.complete = choice.finish_reason in ("stop", "length")
            out.tokens = chunk.model_extra["bild"]["new_tokens"]
    out.text = "".join(pieces)


def report(outcomes: list[Outcome], wall: float, healthy: dict, args) -> list[str]:
    ok = [o for o in outcomes if o.status == "200"]
    latencies = sorted(o.seconds for o in ok)
    statuses = collections.Counter(o.status for o in outcomes)
    tokens = sum(o.tokens for o in ok)
    print(f"\n{len(outcomes)} requests ({args.clients} clients × {args.requests}), max_tokens {args.max_tokens}, "
          f"policy {args.policy}, big {args.big}, wall {wall:.1f} s")
    print("status counts:", ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items())))
    if latencies:
        print(f"latency p50 {percentile(latencies, 50):.2f} s, p95 {percentile(latencies, 95):.2f} s, "
              f"max {latencies[-1]:.2f} s")
    print(f"throughput {len(ok) / wall:.2f} requests/s, {tokens / wall:.1f} generated tokens/s")
    print(f"health afterwards: {healthy}")
    return checks(outcomes, statuses, healthy)


def print_server_metrics(text: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    m = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    calls = m["bild_big_calls_total"]
    print(f"server: {m['bild_generated_tokens_total']:.0f} tokens, {calls:.0f} big calls "
          f"({m['bild_generated_tokens_total'] / max(calls, 1):.2f} tokens/big call), "
          f"{m['bild_little_calls_total']:.0f} little calls, {m['bild_fallbacks_total']:.0f} fallbacks, "
          f"{m['bild_rollbacks_total']:.0f} rollbacks, mean acceptance length "
          f"{m['bild_acceptance_length_sum'] / max(m['bild_acceptance_length_count'], 1):.2f}, mean queue time "
          f"{m['bild_queue_seconds_sum'] / max(m['bild_queue_seconds_count'], 1):.1f} s")


def checks(outcomes: list[Outcome], statuses: collections.Counter, healthy: dict) -> list[str]:
    failures = [f"{n} responses with status {s}" for s, n in statuses.items() if not s.isdigit() or int(s) >= 500]
    ok = [o for o in outcomes if o.status == "200"]
    failures += [f"{n} incomplete responses" for n in [sum(not o.complete for o in ok)] if n]
    texts = collections.defaultdict(set)
    for o in ok:
        texts[o.key].add(o.text)
    failures += [f"request {key} got {len(t)} different texts" for key, t in texts.items() if len(t) > 1]
    if healthy.get("status") != "ok" or healthy.get("queued") or healthy.get("busy"):
        failures.append(f"server not idle and healthy afterwards: {healthy}")
    return failures


def percentile(sorted_values: list[float], q: float) -> float:
    return statistics.quantiles(sorted_values, n=100, method="inclusive")[q - 1] if len(sorted_values) > 1 \
        else sorted_values[0]


if __name__ == "__main__":
    sys.exit(main())
