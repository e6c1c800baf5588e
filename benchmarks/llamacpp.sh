#!/usr/bin/env bash
# Build llama.cpp's llama-bench, llama-completion and llama-speculative-simple once, for side-by-side numbers.
# Not part of scripts/install.sh: it takes ~10 minutes on 2 cores.
#
# Source: the llama.cpp vendored in the llama-cpp-python==0.3.36 sdist (fetched with pip from the package
# registry). Built with GGML_NATIVE=ON, i.e. for this machine's CPU only, so the build directory is keyed by a
# short CPU fingerprint (model name, family/model, hash of the flags): another machine sharing the cache rebuilds.
#
#   bash benchmarks/llamacpp.sh          # builds if needed; the last line printed is the bin directory
#   LLAMACPP_DIR=... to use another cache directory (default ${BILD_CACHE:-~/.cache/bild}/llamacpp)
set -euo pipefail
VERSION=0.3.36
TARGETS=(llama-bench llama-completion llama-speculative-simple)
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CACHE="${LLAMACPP_DIR:-${BILD_CACHE:-$HOME/.cache/bild}/llamacpp}"

fingerprint() {
    local model family cpumodel flags
    model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
    family=$(grep -m1 '^cpu family' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')
    cpumodel=$(grep -m1 '^model[[:space:]]*:' /proc/cpuinfo | cut -d: -f2 | tr -d ' ')
    flags=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2- | tr ' ' '\n' | sed '/^$/d' | sort | tr '\n' ' ')
    local slug hash
    slug=$(printf '%s' "$model" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9' '-' | sed 's/--*/-/g; s/^-//; s/-$//' | cut -c1-32)
    hash=$(printf '%s|%s|%s|%s' "$model" "$family" "$cpumodel" "$flags" | sha256sum | cut -c1-8)
    printf '%s-f%sm%s-%s' "${slug:-cpu}" "$family" "$cpumodel" "$hash"
}

BUILD="$CACHE/build-$VERSION-$(fingerprint)"
BIN="$BUILD/bin"
have_all() { for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || return 1; done; }
if have_all; then echo "$BIN"; exit 0; fi

if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
mkdir -p "$CACHE"
SDIST="$CACHE/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
    echo "downloading the llama-cpp-python==$VERSION sdist into $CACHE" >&2
    "$PY" -m pip --disable-pip-version-check -q download --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$CACHE"
    [ -f "$SDIST" ] || SDIST=$(ls "$CACHE"/llama_cpp_python-"$VERSION".tar.gz "$CACHE"/llama-cpp-python-"$VERSION".tar.gz 2>/dev/null | head -1)
fi
SRC="$CACHE/llama_cpp_python-$VERSION"
if [ ! -f "$SRC/vendor/llama.cpp/CMakeLists.txt" ]; then
    tmp="$CACHE/.unpack.$$"
    rm -rf "$tmp"; mkdir -p "$tmp"
    tar -xzf "$SDIST" -C "$tmp"
    rm -rf "$SRC"; mv "$tmp"/* "$SRC"; rm -rf "$tmp"
fi

echo "building ${TARGETS[*]} in $BUILD (GGML_NATIVE=ON, ~10 minutes on 2 cores)" >&2
cmake -S "$SRC/vendor/llama.cpp" -B "$BUILD" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >"$BUILD.configure.log" 2>&1 \
    || { tail -30 "$BUILD.configure.log" >&2; exit 1; }
cmake --build "$BUILD" --config Release -j2 --target "${TARGETS[@]}" >"$BUILD.build.log" 2>&1 \
    || { tail -30 "$BUILD.build.log" >&2; exit 1; }
have_all || { echo "build finished but not all of ${TARGETS[*]} are in $BIN" >&2; exit 1; }
echo "$BIN"
