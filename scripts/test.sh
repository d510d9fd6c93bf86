#!/usr/bin/env bash
# Set up .venv with the test tools, then run the whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
. .venv/bin/activate
python -m pytest -q tests "$@"
