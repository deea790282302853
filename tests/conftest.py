import importlib.util
import os
from pathlib import Path

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:
    HAS_CUDA = False
# Without a GPU, Triton kernels run in Triton's interpreter (numpy, float32-exact; its 16-bit dots
# and libdevice are not faithful): the `interpretable` kernel tests then check the kernels' logic on
# CPU. Set before any kernel is defined, since `triton.jit` reads it then.
HAS_TRITON = importlib.util.find_spec("triton") is not None
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The deterministic tiny Gemma 3 checkpoint `make serve` uses (made once, reused)."""
    from gemma_serve.tiny_model import make_tiny_gemma

    return make_tiny_gemma(REPO / ".cache" / "tiny-gemma")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from gemma_serve.api.tokenizer import Tokenizer

    return Tokenizer.load(str(tiny_model_dir))


def pytest_collection_modifyitems(config, items):
    # Keep CPU-only machines fast and quiet: GPU tests skip themselves without CUDA, except the
    # `interpretable` ones (Triton kernels in float32), which run in Triton's interpreter.
    if not HAS_CUDA and not os.environ.get("GEMMA_SERVE_FORCE_GPU_TESTS"):
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords and not ("interpretable" in item.keywords and HAS_TRITON):
                item.add_marker(skip)
