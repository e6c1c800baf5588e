"""The user's cache directory ($BILD_CACHE, default ~/.cache/bild): paths keyed by the file they derive from, and
atomic writes, so a crash or a concurrent first use never leaves a half-written entry behind."""

from __future__ import annotations

import os


def cache_root() -> str:
    return os.environ.get("BILD_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "bild"))


def keyed_path(kind: str, path: str) -> str:
    """$BILD_CACHE/kind/<file name>-<size>-<mtime>: a key that changes when the file does."""
    stat = os.stat(path)
    name = os.path.basename(path).removesuffix(".gguf")
    return os.path.join(cache_root(), kind, f"{name}-{stat.st_size}-{int(stat.st_mtime)}")


def write_quietly(path: str, text: str) -> None:
    """Atomically, or not at all on a read-only or full disk (the cache is an optimisation)."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(f"{path}.tmp{os.getpid()}", "w") as f:
            f.write(text)
        os.replace(f"{path}.tmp{os.getpid()}", path)
    except OSError:
        pass
