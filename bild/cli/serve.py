"""`bild serve`: an OpenAI-compatible HTTP server (bild.server). Cheap to import: FastAPI, uvicorn and
prometheus-client load only when the server starts.

    bild serve --big smollm2-135m --port 8000 --queue-size 16
    curl localhost:8000/v1/completions -d '{"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 32}'
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from ..errors import BildError
from .args import add_decoding_args, add_model_args, decoding_kwargs


def add_commands(sub) -> None:
    p = sub.add_parser("serve", help="serve a big–little pair over an OpenAI-compatible HTTP API",
                       description="Serve the OpenAI completions and chat completions API. The decoding flags "
                                   "are defaults; each request may override them.")
    add_model_args(p)
    add_decoding_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait while one generates; more get HTTP 429 (default 16)")
    p.add_argument("--model-name", default=None, help="the model id clients send (default: the --big name)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for generation (default: torch's choice; 1 is best on a shared CPU)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    p.set_defaults(handler=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..server import run
    from ..server.app import ServerConfig, create_app
    from .generate import load_pair

    if args.threads is not None and args.threads < 1:
        raise BildError(f"--threads must be >= 1, got {args.threads}", field="threads")
    name = args.model_name or os.path.basename(args.big.rstrip("/")).removesuffix(".gguf")
    config = ServerConfig(model_name=name, queue_size=args.queue_size, defaults=decoding_kwargs(args))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pair = load_pair(args)
    print(f"serving {name!r} on http://{args.host}:{args.port}", file=sys.stderr)
    # uvicorn drains on SIGTERM, then re-raises the signal; after a clean drain, exit with status 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run(create_app(pair, config), host=args.host, port=args.port, log_level=args.log_level)
    return 0
