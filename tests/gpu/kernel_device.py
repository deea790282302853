"""Where the kernel tests run: the GPU, or, without one, the CPU through Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 there). The interpreter is faithful in float32 only:
16-bit cases need the GPU."""

import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def needs_gpu(dtype: torch.dtype, tensor_cores: bool = False) -> None:
    """Skip a case the interpreter cannot check: 16-bit products, tensor-core dots."""
    if not ON_GPU and (dtype != torch.float32 or tensor_cores):
        pytest.skip("16-bit kernels need a CUDA GPU (Triton's interpreter is faithful in float32 only)")


def generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)
