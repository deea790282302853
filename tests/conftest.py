import os
from pathlib import Path

import pytest

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
    # Keep CPU-only machines fast and quiet: GPU tests skip themselves without CUDA.
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda and not os.environ.get("GEMMA_SERVE_FORCE_GPU_TESTS"):
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
