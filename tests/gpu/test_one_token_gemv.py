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


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gelu_mul_matches_triton(out_dtype: torch.dtype) -> None:
    inter, k = 10240, 2560
    gen = torch.Generator(device="cuda").manual_seed(7)
    w = (torch.randn(2 * inter, k, device="cuda", generator=gen) * 0.02).bfloat16()
    q, s = quant.quantize_weight(w, "int8")
    x = torch.randn(k, device="cuda", generator=gen).bfloat16()
    out = torch.empty(inter, dtype=out_dtype, device="cuda")
    OneTokenGemvInt8()(x, q, s, out, gelu=True)
    gu = (q.float() * s[:, None]) @ x.float()
    ref = torch.nn.functional.gelu(gu[:inter], approximate="tanh") * gu[inter:]
    assert ((out.float() - ref).abs().max() / ref.abs().max()).item() < (1e-4 if out_dtype == torch.float32 else 1e-2)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = quant.kernel_config(1, 2 * inter, k, sms, torch.int8)  # as QuantizedLinear.one_token_plan
    tri = quant.triton_weight_only_linear(x[None], q, s, cfg, out_dtype=out_dtype, gelu_mul=True)[0]
    assert ((out.float() - tri.float()).abs().max() / tri.float().abs().max()).item() < 1e-2


def test_engine_switch_takes_the_cuda_kernel(monkeypatch) -> None:
    # GEMMA_CUDA_GEMV=1: a QuantizedLinear and the fused gate_up + GELU at one token run the CUDA
    # kernel (a poisoned Triton path would otherwise show), with the same results within rounding.
    gen = torch.Generator(device="cuda").manual_seed(9)
    lin = torch.nn.Linear(2560, 2 * 10240, bias=False, device="cuda").bfloat16()
    lin.weight.data = (torch.randn(2 * 10240, 2560, device="cuda", generator=gen) * 0.02).bfloat16()
    qlin = quant.QuantizedLinear.from_linear(lin, "int8")
    x = torch.randn(1, 2560, device="cuda", generator=gen).bfloat16()
    off_y, off_act = qlin(x).float(), quant.projected_gelu_mul(qlin, x).float()
    monkeypatch.setattr(quant, "CUDA_GEMV", True)
    monkeypatch.setattr(quant, "_weight_only_gemv_kernel", None)  # the Triton one-token kernel must not run
    on_y, on_act = qlin(x).float(), quant.projected_gelu_mul(qlin, x).float()
    assert ((on_y - off_y).abs().max() / off_y.abs().max()).item() < 1e-2
    assert ((on_act - off_act).abs().max() / off_act.abs().max()).item() < 1e-2
