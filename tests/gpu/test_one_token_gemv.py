"""The experimental one-token GEMV on bulk-copy rings (engine/csrc/one_token_gemv.cu): its product
against float32 and against the engine's Triton kernel, INT8 and bf16 weights, on Gemma 3 4B's four
projection shapes and an odd one, for ring shapes that put several rows in a chunk, one row, and
parts of a row; gate_up with GELU; the engine's switch. Needs a GPU and nvcc."""

import shutil
from pathlib import Path

import pytest
import torch
from gemma_serve.engine import quantization as quant
from gemma_serve.engine.cuda_gemv import OneTokenGemv

pytestmark = pytest.mark.gpu

SHAPES = {"qkv": (4096, 2560), "o": (2560, 2048), "gate_up": (20480, 2560), "down": (2560, 10240), "odd": (37, 272)}
# (warps, slots, chunk bytes, blocks per SM, PDL): INT8 K=2560 gets 2 rows a chunk at 5120, 4 at
# 12288, 1 at 4096 and 3 parts at 1024 (bf16 5 parts); K=10240 parts everywhere.
VARIANTS = [(8, 2, 5120, 2, True), (16, 2, 5120, 1, True), (8, 2, 4096, 2, False), (8, 2, 12288, 1, True), (8, 2, 1024, 2, True)]
# The Triton kernel's INT8 path multiplies in float16 pairs (half2): 5e-4 off float32 on qkv (H200).
TRITON_TOL = 2e-3


@pytest.fixture(scope="module", autouse=True)
def needs_cuda_and_nvcc():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("needs nvcc to build the kernel")


def _weights(n: int, k: int, dtype: str, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
    x = torch.randn(k, device="cuda", generator=gen).bfloat16()
    if dtype == "int8":
        q, s = quant.quantize_weight(w, "int8")
        return q, s, (q.float() * s[:, None]), x
    return w, None, w.float(), x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_gemv_matches_float32_and_triton(name: str, variant: tuple, dtype: str) -> None:
    n, k = SHAPES[name]
    w, s, wf, x = _weights(n, k, dtype, n + k)
    out = torch.full((n,), float("nan"), device="cuda")
    OneTokenGemv(*variant)(x, w, s, out)
    ref = wf @ x.float()
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < 1e-4  # float32 sums in another order
    cfg = None if dtype == "int8" else quant.one_token_config(n, k)
    tri = quant.triton_weight_only_linear(x[None], w, s, cfg, out_dtype=torch.float32)[0]
    assert _rel(out, tri) < TRITON_TOL


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
@pytest.mark.parametrize("variant", [(16, 2, 5120, 1, True), (8, 2, 1024, 2, True)], ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gelu_mul_matches_float32(out_dtype: torch.dtype, variant: tuple, dtype: str) -> None:
    inter, k = 10240, 2560
    w, s, wf, x = _weights(2 * inter, k, dtype, 7)
    out = torch.full((inter,), float("nan"), dtype=out_dtype, device="cuda")
    OneTokenGemv(*variant)(x, w, s, out, gelu=True)
    gu = wf @ x.float()
    ref = torch.nn.functional.gelu(gu[:inter], approximate="tanh") * gu[inter:]
    assert _rel(out, ref) < (1e-4 if out_dtype == torch.float32 else 1e-2)


def test_rejects_what_it_cannot_run() -> None:
    w, s, _, x = _weights(64, 256, "int8", 3)
    out = torch.empty(64, device="cuda")
    with pytest.raises(ValueError):
        OneTokenGemv()(x, w, None, out)  # INT8 without scales
    with pytest.raises(ValueError):
        OneTokenGemv()(x, w.float(), None, out)  # float32 weights
    with pytest.raises(ValueError):
        OneTokenGemv(16, 2, 8192, 1)(torch.zeros(40960, dtype=torch.bfloat16, device="cuda"),
                                     torch.zeros(64, 40960, dtype=torch.int8, device="cuda"),
                                     torch.ones(64, device="cuda"), out)  # 256 KB of rings + x


@pytest.mark.parametrize("dtype", ["int8", "bf16"])
def test_engine_switch_takes_the_cuda_kernel(monkeypatch, dtype: str) -> None:
    # GEMMA_CUDA_GEMV=1: a one-token projection and the fused gate_up + GELU run the CUDA kernel
    # (a poisoned Triton path would otherwise show), with the same results within rounding.
    gen = torch.Generator(device="cuda").manual_seed(9)
    lin = torch.nn.Linear(2560, 2 * 10240, bias=False, device="cuda").bfloat16()
    lin.weight.data = (torch.randn(2 * 10240, 2560, device="cuda", generator=gen) * 0.02).bfloat16()
    if dtype == "int8":
        layer = quant.QuantizedLinear.from_linear(lin, "int8")
    else:
        layer = quant.OneTokenLinear(2560, 2 * 10240, bias=False, device="cuda", dtype=torch.bfloat16)
        layer.weight.data = lin.weight.data
    x = torch.randn(1, 2560, device="cuda", generator=gen).bfloat16()
    off_y, off_act = layer(x).float(), quant.projected_gelu_mul(layer, x).float()
    monkeypatch.setattr(quant, "CUDA_GEMV", True)
    monkeypatch.setattr(quant, "_weight_only_gemv_kernel", None)  # the Triton one-token kernel must not run
    on_y, on_act = layer(x).float(), quant.projected_gelu_mul(layer, x).float()
    assert _rel(on_y, off_y) < 1e-2
    assert _rel(on_act, off_act) < 1e-2


@pytest.mark.parametrize("variant", [(16, 2, 5120, 1, True), (8, 2, 1024, 2, True)], ids=str)
@pytest.mark.parametrize("name", list(SHAPES))
def test_half2_products_within_the_triton_paths_error(name: str, variant: tuple) -> None:
    # INT8 products in float16 pairs (math="half2", as the engine's Triton half2 path): ~5e-4 off
    # float32 there; wrong byte order or a missing 1024 would be off by ~1.
    n, k = SHAPES[name]
    w, s, wf, x = _weights(n, k, "int8", n + k)
    out = torch.full((n,), float("nan"), device="cuda")
    OneTokenGemv(*variant, math="half2")(x, w, s, out)
    assert _rel(out, wf @ x.float()) < TRITON_TOL
    if n % 2:
        return
    act = torch.full((n // 2,), float("nan"), device="cuda")
    OneTokenGemv(*variant, math="half2")(x, w, s, act, gelu=True)
    gu = wf @ x.float()
    assert _rel(act, torch.nn.functional.gelu(gu[:n // 2], approximate="tanh") * gu[n // 2:]) < 1e-2
