"""Where benchmark results go: summaries committed, raw per-request data gzipped in an ignored folder.

A run writes a summary (the aggregated figures and the command that made them; JSON, a table,
a PNG) under benchmarks/results/, and its raw data (every request of every run) as compact
gzipped JSON under the matching path in benchmarks/results/raw/, which git ignores:

    benchmarks/results/peers-<stamp>/serving-0.json          summary: per-run figures, no requests
    benchmarks/results/raw/peers-<stamp>/serving-0.json.gz   raw: the same report with every request

`read_json` reads either kind.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import shlex
import sys

RESULTS_DIR = os.path.join("benchmarks", "results")  # relative to the current directory (a checkout)
RAW = "raw"  # the ignored folder of raw data, below a results folder (.gitignore: benchmarks/results/**/raw/)


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running (`sys.argv` by default), as a shell line one can paste.

    A script is shown as `python <path>` (relative to the current directory when under it), the
    `xllm` console script and `python -m xllm.entrypoints.cli` as `xllm`.
    """
    argv = list(sys.argv if argv is None else argv) or ["python"]
    prog, rest = argv[0], argv[1:]
    norm = prog.replace(os.sep, "/")
    if os.path.basename(prog) == "xllm" or norm.endswith("xllm/entrypoints/cli.py"):
        head = ["xllm"]
    elif prog.endswith(".py"):
        rel = os.path.relpath(prog) if os.path.isabs(prog) else prog
        head = ["python", prog if rel.startswith("..") else rel]
    else:
        head = [prog]
    return shlex.join(head + [str(a) for a in rest])


def raw_dir(run_dir: str) -> str:
    """The raw-data folder of a run folder: results/<run> -> results/raw/<run>."""
    run_dir = os.path.normpath(run_dir)
    return os.path.join(os.path.dirname(run_dir), RAW, os.path.basename(run_dir))


def raw_path(summary_path: str) -> str:
    """The raw-data file of a summary file beside it: <folder>/<name>.json -> <folder>/raw/<name>.json.gz."""
    folder, name = os.path.split(os.path.normpath(summary_path))
    return os.path.join(folder, RAW, name if name.endswith(".gz") else name + ".gz")


def json_safe(value):
    """`value` with every non-finite float as a string ("inf"), which strict JSON cannot hold."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _makedirs_for(path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def write_summary(path: str, data: dict) -> str:
    """Write a summary as indented strict JSON (folders created); return the path."""
    _makedirs_for(path)
    with open(path, "w") as f:
        json.dump(json_safe(data), f, indent=1, allow_nan=False, default=str)
        f.write("\n")
    return path


def write_raw(path: str, data) -> str:
    """Write raw data as compact gzipped strict JSON (folders created); return the path."""
    _makedirs_for(path)
    with gzip.open(path, "wt", compresslevel=9) as f:
        json.dump(json_safe(data), f, separators=(",", ":"), allow_nan=False, default=str)
    return path


def read_json(path: str):
    """A summary (.json) or raw file (.json.gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return json.load(f)
