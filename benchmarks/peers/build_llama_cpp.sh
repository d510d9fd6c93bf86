#!/usr/bin/env bash
# Build llama.cpp's llama-server, llama-bench and llama-quantize from the source that the
# llama-cpp-python sdist vendors (PyPI is reachable here; GitHub is not). About 15-30 minutes on
# 2 cores, so the build is cached outside the repository and reused:
#   $XLLM_PEERS_DIR (default ~/.cache/xllm-peers)/llama.cpp-<version>/build/bin/llama-server
# Usage: bash benchmarks/peers/build_llama_cpp.sh [version]     (prints the bin folder)
set -euo pipefail
VERSION="${1:-${LLAMA_CPP_PYTHON_VERSION:-0.3.36}}"
ROOT="${XLLM_PEERS_DIR:-$HOME/.cache/xllm-peers}"
DEST="$ROOT/llama.cpp-$VERSION"
BIN="$DEST/build/bin"
if [[ -x "$BIN/llama-server" && -x "$BIN/llama-quantize" && -x "$BIN/llama-bench" ]]; then
    echo "$BIN"; exit 0
fi
mkdir -p "$ROOT"
PY="${PYTHON:-python3}"
if [[ ! -d "$DEST/src" ]]; then
    tmp="$(mktemp -d)"
    "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp" >&2
    tar -xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp"
    rm -rf "$DEST"; mkdir -p "$DEST"
    mv "$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DEST/src"
    rm -rf "$tmp"
fi
cmake -S "$DEST/src" -B "$DEST/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF >&2
cmake --build "$DEST/build" -j "$(nproc)" --target llama-server llama-bench llama-quantize >&2
echo "$BIN"
