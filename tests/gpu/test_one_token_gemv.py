"""The experimental one-token INT8 GEMV on bulk-copy rings (engine/csrc/one_token_gemv.cu): its
product against float32 and against the engine's Triton kernel on Gemma 3 4B's four projection
shapes, for every ring shape `bench/tma_gemv_probe.py` times, with and without PDL. Needs a GPU and
nvcc."""

import shutil
from pathlib import Path

import pytest
import torch
from gemma_serve.engine import quantization as quant
from gemma_serve.engine.cuda_gemv import OneTokenGemvInt8

pytestmark = pytest.mark.gpu

SHAPES = {"qkv": (4096, 2560), "o": (2560, 2048), "gate_up": (20480, 2560), "down": (2560, 10240), "odd": (37, 272)}
VARIANTS = [(8, 2, 4096, 2, True), (8, 2, 4096, 2, False), (8, 2, 2048, 2, True), (4, 4, 4096, 2, True),
            (16, 2, 4096, 1, True), (8, 3, 4096, 1, True)]


@pytest.fixture(scope="module", autouse=True)
def needs_cuda_and_nvcc():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("needs nvcc to build the kernel")


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_gemv_matches_float32_and_triton(name: str, variant: tuple) -> None:
    n, k = SHAPES[name]
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
    q, s = quant.quantize_weight(w, "int8")
    x = torch.randn(k, device="cuda", generator=gen).bfloat16()
    out = torch.full((n,), float("nan"), device="cuda")
    OneTokenGemvInt8(*variant)(x, q, s, out)
    ref = (q.float() * s[:, None]) @ x.float()
    assert torch.isfinite(out).all()
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4
    tri = quant.triton_weight_only_linear(x[None], q, s, out_dtype=torch.float32)[0]
    assert ((out - tri).abs().max() / tri.abs().max()).item() < 1e-4
