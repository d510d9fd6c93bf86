"""Offline throughput benchmark: the same as `xllm bench offline` (run with --help for the flags)."""

import os
import sys

# Measure this checkout's xllm, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from xllm.bench.offline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
