import os
import tempfile

import pytest
import torch

# Keep converted weights out of the user's cache unless the caller chose a folder.
os.environ.setdefault("XLLM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "xllm-test-cache"))
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: skipped where torch sees none (CI, this machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels_built():
    """Build the C++ CPU kernels into the test cache once (as scripts/setup.sh does for a user), so
    every model test runs the path users get; tests/ops/test_cpu_kernels.py pins it to torch.
    XLLM_TEST_NO_KERNEL_BUILD=1 skips the build (the GPU check, which runs only CUDA tests)."""
    from xllm.ops import cpu_kernels

    if cpu_kernels.load() is None and not os.environ.get("XLLM_TEST_NO_KERNEL_BUILD"):
        cpu_kernels.build()


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from xllm.models.loader.resolve import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers' own reading of the same GGUF: (tokenizer, float32 model). The reference."""
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(smollm2_gguf)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tokenizer, model


@pytest.fixture(scope="session")
def smollm2_llm():
    """Our engine on the default model, float32, default settings."""
    from xllm import LLM

    return LLM(dtype="float32", kv_cache_memory_gib=0.5)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """`xllm serve` on the default model (float32, as the GGUF is read), named "smollm2", shared by the tests."""
    from xllm.bench.launch import launch_xllm

    with launch_xllm(str(tmp_path_factory.mktemp("server")), "--served-model-name", "smollm2", "--kv-cache-memory", "0.25") as s:
        yield s
