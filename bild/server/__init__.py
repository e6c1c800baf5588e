"""An OpenAI-compatible HTTP server for a big–little pair; `bild serve` (bild/cli/serve.py) starts it.

The app itself (FastAPI, uvicorn, prometheus-client) is imported only when the server starts.
"""

from __future__ import annotations


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT or SIGTERM; in-flight and queued requests finish first (graceful shutdown)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=None))
    server.run()
