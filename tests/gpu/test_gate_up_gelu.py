"""The gate_up projection with GELU x up in its epilogue (`engine/gate_up_gelu.py`) against the
exact product: ragged rows, channels and K, several tile shapes, and the engine's MLP routing to it
at GEMMA_GATE_UP_GELU_MIN_ROWS rows. Without a GPU the float32 cases run in Triton's interpreter."""

import pytest
import torch
import torch.nn.functional as F
from gemma_serve.engine import gate_up_gelu as gug
from gemma_serve.engine import quantization as quant
from gemma_serve.engine.fused_kernels import gelu_mul

from tests.gpu.kernel_device import DEVICE, ON_GPU, generator

pytestmark = [pytest.mark.gpu, pytest.mark.interpretable]


def exact(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up of the float64 products of the (rounded) inputs."""
    gate, up = (x.double() @ w.double().T).chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("m,inter,k", [(37, 48, 80), (64, 32, 64), (5, 72, 40)])
@pytest.mark.parametrize("tiles", [gug.GateUpTiles(16, 16, 32, 4, 2, group_m=2), gug.GateUpTiles(32, 32, 16, 4, 2),
                                   gug.GateUpTiles(16, 64, 64, 4, 3, group_m=1)])
def test_matches_the_exact_product(m, inter, k, tiles):
    dtype = torch.bfloat16 if ON_GPU else torch.float32  # the interpreter's dots are exact in float32
    if ON_GPU:
        m, inter, k = m * 64, inter * 64, k * 32  # W2-like sizes: ragged against every tile
    gen = generator(m + inter + k)
    w = (torch.randn(2 * inter, k, device=DEVICE, generator=gen) * 0.05).to(dtype)
    x = torch.randn(m, k, device=DEVICE, generator=gen).to(dtype)
    out = gug.gate_up_gelu(x, w, torch.float32, tiles)
    assert out.shape == (m, inter)
    ref = exact(x, w)
    # float32 sums of exact products, GELU on them: float32 rounding only. bf16 operands on the GPU:
    # the same products, in the matrix units' float32 accumulation order.
    assert rel_err(out, ref) < (1e-5 if dtype == torch.float32 else 1e-4), tiles
    # Rounded once to the activations' dtype.
    rounded = gug.gate_up_gelu(x, w, tiles=tiles)
    assert rounded.dtype == dtype and torch.equal(rounded, out.to(dtype))


def test_refuses_what_it_cannot_take():
    w = torch.zeros(6, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        gug.gate_up_gelu(torch.zeros(2, 8, device=DEVICE), torch.zeros(5, 8, device=DEVICE))  # odd rows
    with pytest.raises(ValueError, match="weight"):
        gug.gate_up_gelu(torch.zeros(2, 8, device=DEVICE, dtype=torch.float16), w)  # another dtype


def test_the_mlp_takes_it_from_the_row_threshold(monkeypatch):
    """projected_gelu_mul on a 16-bit gate_up layer: the fused kernel from MIN_ROWS rows on CUDA,
    the projection + GELU kernel below (and always with MIN_ROWS 0, the default)."""
    if not ON_GPU:
        pytest.skip("the engine routes CUDA tensors only")
    inter, k = 1024, 512
    layer = quant.OneTokenLinear(k, 2 * inter, bias=False, device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.weight, std=0.05, generator=torch.Generator(device="cuda").manual_seed(0))
    x = torch.randn(600, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).bfloat16()
    unfused = quant.projected_gelu_mul(layer, x)
    monkeypatch.setattr(gug, "MIN_ROWS", 512)
    fused = quant.projected_gelu_mul(layer, x)
    assert torch.equal(fused, gug.gate_up_gelu(x, layer.weight))
    assert rel_err(fused, exact(x, layer.weight)) < rel_err(unfused, exact(x, layer.weight)) + 1e-3
    below = x[:511]
    assert torch.equal(quant.projected_gelu_mul(layer, below), gelu_mul(layer(below), torch.bfloat16))
