#!/usr/bin/env bash
# The GPU check, prepared for a lent GPU machine (about 5 minutes on an H200; see DEVELOPERS.md):
#   1. the tests marked `cuda` (tests/platforms/test_devices.py: greedy float32 against transformers
#      on the GPU, bfloat16 top-1 agreement, the server, KV sizing from free memory, a host tier);
#   2. batch-1 and batch-32 decode against transformers' generate on the same GPU
#      (benchmarks/gpu/decode.py, random weights on SmolLM2-135M's shape, bfloat16).
# Outputs go to $OUT (the device tool brings that folder back), else benchmarks/results/raw/gpu.
#
#   bash benchmarks/gpu/fetch_wheels.sh                 # here, once: the wheels the GPU image lacks
#   device run: bash benchmarks/gpu/check.sh            # there, with .whl carried
#   bash benchmarks/gpu/check.sh --dry-run              # on a CPU (CI): the same steps, CUDA parts
#                                                       # skipped, the benchmark on a tiny shape
set -uo pipefail
cd "$(dirname "$0")/../.."
dry=""
[ "${1:-}" = "--dry-run" ] && dry="--dry-run"
py=${PYTHON:-python3}
out=${OUT:-benchmarks/results/raw/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 XLLM_TEST_NO_KERNEL_BUILD=1
export XLLM_CACHE_DIR=${XLLM_CACHE_DIR:-$(mktemp -d)}
if [ -z "$dry" ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/xllm-site .whl/*.whl \
    || { echo "check.sh: installing .whl failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/xllm-site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
status=0
start=$(date +%s)
"$py" - <<'PY' | tee "$out/machine.txt"
import platform, torch, transformers
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, GPU: {gpu}")
PY
echo "== 1. tests marked cuda"
"$py" -m pytest -q -p no:cacheprovider -m cuda -rs tests/platforms/test_devices.py 2>&1 | tee "$out/cuda-tests.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "== 2. decode against transformers"
"$py" benchmarks/gpu/decode.py $dry --output "$out/gpu-decode.json" 2>&1 | grep -v "^INFO\|it/s\]$" | tee "$out/gpu-decode.txt"
[ "${PIPESTATUS[0]}" = 0 ] || status=1
echo "check.sh: done in $(( $(date +%s) - start )) s, status $status"
exit $status
