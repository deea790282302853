"""The fused per-layer kernels of `engine/fused_kernels.py` against the PyTorch computations they
replace, in float32 and bf16, on the layouts the model passes (strided views of one projection).
Without a GPU the float32 cases run in Triton's interpreter."""

import pytest
import torch
from gemma_serve.engine import fused_kernels as fk

from tests.gpu.kernel_device import DEVICE, ON_GPU, generator, needs_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.interpretable]


@pytest.fixture(autouse=True)
def kernels_on_this_device(monkeypatch):
    """On CPU, route the fused ops to their (interpreted) kernels, as CUDA tensors are."""
    if not ON_GPU:
        monkeypatch.setattr(fk, "use_triton", lambda t: True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def reference(monkeypatch, fn):
    """fn() with the kernels switched off: the PyTorch path on the same device."""
    with monkeypatch.context() as m:
        m.setattr(fk, "use_triton", lambda t: False)
        return fn()


# float32: reductions in another order; bf16: at most one rounding step apart.
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def dtype(request):
    needs_gpu(request.param)
    return request.param


def randn(*shape, dtype, scale=1.0, seed=0):
    gen = generator(seed + sum(shape))
    return (torch.randn(*shape, device=DEVICE, generator=gen) * scale).to(dtype)


def test_rms_norm(dtype, monkeypatch):
    w = randn(2560, dtype=torch.float32, scale=0.3)
    x = randn(7, 2560, dtype=dtype)
    q = randn(5, 16 * 256, dtype=dtype)[:, :8 * 256].view(5, 8, 256)  # a strided view
    for inp, weight in ((x, w), (q, w[:256])):
        got = fk.rms_norm(inp, weight, 1e-6)
        assert rel_err(got, reference(monkeypatch, lambda: fk.rms_norm(inp, weight, 1e-6))) < TOL[dtype]


@pytest.mark.parametrize("norm_x,norm_out", [(True, True), (False, True), (True, False), (False, False)])
def test_add_rms_norm(dtype, norm_x, norm_out, monkeypatch):
    r, x = randn(9, 2560, dtype=dtype, seed=1), randn(9, 2560, dtype=dtype, seed=2)
    wx = randn(2560, dtype=torch.float32, scale=0.3, seed=3) if norm_x else None
    wo = randn(2560, dtype=torch.float32, scale=0.3, seed=4) if norm_out else None
    h, y = fk.add_rms_norm(r, x, wx, wo, 1e-6)
    h_ref, y_ref = reference(monkeypatch, lambda: fk.add_rms_norm(r, x, wx, wo, 1e-6))
    assert rel_err(h, h_ref) < TOL[dtype]
    assert (y is None) == (not norm_out)
    if norm_out:
        assert rel_err(y, y_ref) < TOL[dtype]


def test_add_rms_norm_float32_residual(monkeypatch):
    """A float32 residual stream with bf16 activations: h stays float32, y comes out in bf16."""
    needs_gpu(torch.bfloat16)
    r, x = randn(9, 2560, dtype=torch.float32, seed=1), randn(9, 2560, dtype=torch.bfloat16, seed=2)
    wx, wo = randn(2560, dtype=torch.float32, scale=0.3, seed=3), randn(2560, dtype=torch.float32, scale=0.3, seed=4)
    h, y = fk.add_rms_norm(r, x, wx, wo, 1e-6)
    h_ref, y_ref = reference(monkeypatch, lambda: fk.add_rms_norm(r, x, wx, wo, 1e-6))
    assert h.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert rel_err(h, h_ref) < 1e-6
    assert rel_err(y, y_ref) < 1e-2


def test_gelu_mul(dtype, monkeypatch):
    gate_up = randn(11, 2 * 10240, dtype=dtype, scale=2.0)
    got = fk.gelu_mul(gate_up)
    ref = reference(monkeypatch, lambda: fk.gelu_mul(gate_up))
    assert got.shape == (11, 10240)
    assert rel_err(got, ref) < TOL[dtype]


@pytest.mark.parametrize("qk_norm", [True, False])
def test_qkv_to_cache(dtype, qk_norm, monkeypatch):
    heads, kv_heads, dim, page = 8, 4, 256, 16
    tokens = 6
    qkv = randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype)
    qw = randn(dim, dtype=torch.float32, scale=0.3, seed=5) if qk_norm else None
    kw = randn(dim, dtype=torch.float32, scale=0.3, seed=6) if qk_norm else None
    positions = torch.tensor([0, 3, 17, 40, 63, 5], device=DEVICE)
    angles = positions[:, None].float() * torch.linspace(0.01, 1.0, dim // 2, device=DEVICE)[None, :]
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos()[:, None, :].to(dtype), emb.sin()[:, None, :].to(dtype)
    slots = torch.tensor([5, 17, 18, 100, 3, 64], device=DEVICE)

    def run():
        k_cache = torch.zeros(8, page, kv_heads, dim, device=DEVICE, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        q = fk.qkv_to_cache(qkv, heads, kv_heads, dim, qw, kw, 1e-6, cos, sin, k_cache, v_cache, slots)
        return q, k_cache, v_cache

    q, k_cache, v_cache = run()
    q_ref, k_ref, v_ref = reference(monkeypatch, run)
    assert rel_err(q, q_ref) < TOL[dtype]
    assert rel_err(k_cache, k_ref) < TOL[dtype]
    assert torch.equal(v_cache, v_ref)  # a copy
    untouched = torch.ones(8 * page, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    assert k_cache.view(-1, kv_heads, dim)[untouched].abs().max() == 0


@pytest.mark.parametrize("step", [2, 4])
def test_qkv_to_cache_with_several_heads_per_program_changes_no_bits(dtype, step):
    """Grouping a token's heads into one program (prompt steps, GEMMA_QKV_HEADS_PER_PROGRAM) shares
    the loads of the norm weights and the RoPE row and nothing else: q and both caches are bit-equal
    to one head per program. A grouping that does not divide the head counts is refused."""
    heads, kv_heads, dim, page, tokens = 8, 4, 256, 16, 5
    qkv = randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype, seed=9)
    qw, kw = randn(dim, dtype=torch.float32, scale=0.3, seed=5), randn(dim, dtype=torch.float32, scale=0.3, seed=6)
    angles = torch.arange(tokens, device=DEVICE)[:, None].float() * torch.linspace(0.01, 1.0, dim // 2, device=DEVICE)
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos()[:, None, :].to(dtype), emb.sin()[:, None, :].to(dtype)
    slots = torch.tensor([7, 0, 33, 16, 2], device=DEVICE)

    def run(heads_per_program):
        k_cache = torch.zeros(4, page, kv_heads, dim, device=DEVICE, dtype=dtype)
        v_cache = torch.zeros_like(k_cache)
        q = fk.qkv_to_cache(qkv, heads, kv_heads, dim, qw, kw, 1e-6, cos, sin, k_cache, v_cache, slots,
                            heads_per_program=heads_per_program)
        return q, k_cache, v_cache

    for got, want in zip(run(step), run(1)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="divide"):
        run(3)
    assert fk.qkv_heads_per_program(8192, heads, kv_heads, wanted=4) == 4
    assert fk.qkv_heads_per_program(8192, 8, 1, wanted=4) == 1  # Gemma 2B: one kv head
    assert fk.qkv_heads_per_program(256, heads, kv_heads, wanted=4) == 1  # a decode step keeps its programs


def test_float32_matmul_outputs_are_rounded_once_on_the_way_out(monkeypatch):
    """A 16-bit model whose matmuls return float32: gelu_mul, add_rms_norm and qkv_to_cache take the
    float32 inputs and give 16-bit outputs (bf16 activations, a bf16 cache) as the PyTorch path does."""
    needs_gpu(torch.bfloat16)
    bf16 = torch.bfloat16
    gate_up = randn(3, 2 * 10240, dtype=torch.float32, scale=2.0)
    got = fk.gelu_mul(gate_up, bf16)
    assert got.dtype == bf16
    assert rel_err(got, reference(monkeypatch, lambda: fk.gelu_mul(gate_up, bf16))) < 1e-2
    r, x = randn(3, 2560, dtype=torch.float32, seed=1), randn(3, 2560, dtype=torch.float32, seed=2)
    wx, wo = randn(2560, dtype=torch.float32, scale=0.3, seed=3), randn(2560, dtype=torch.float32, scale=0.3, seed=4)
    h, y = fk.add_rms_norm(r, x, wx, wo, 1e-6, bf16)
    h_ref, y_ref = reference(monkeypatch, lambda: fk.add_rms_norm(r, x, wx, wo, 1e-6, bf16))
    assert h.dtype == torch.float32 and y.dtype == bf16 and y_ref.dtype == bf16
    assert rel_err(h, h_ref) < 1e-6 and rel_err(y, y_ref) < 1e-2
    heads, kv_heads, dim = 8, 4, 256
    qkv = randn(2, (heads + 2 * kv_heads) * dim, dtype=torch.float32)
    qw, kw = randn(dim, dtype=torch.float32, scale=0.3, seed=5), randn(dim, dtype=torch.float32, scale=0.3, seed=6)
    angles = torch.tensor([[3.0], [40.0]], device=DEVICE) * torch.linspace(0.01, 1.0, dim // 2, device=DEVICE)
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    slots = torch.tensor([5, 17], device=DEVICE)

    def run():
        k_cache = torch.zeros(2, 16, kv_heads, dim, device=DEVICE, dtype=bf16)
        v_cache = torch.zeros_like(k_cache)
        return fk.qkv_to_cache(qkv, heads, kv_heads, dim, qw, kw, 1e-6, cos, sin, k_cache, v_cache, slots), k_cache, v_cache

    (q, k_cache, v_cache), (q_ref, k_ref, v_ref) = run(), reference(monkeypatch, run)
    assert q.dtype == bf16 and q_ref.dtype == bf16
    # Rounded once from float32: the kernel and the PyTorch path agree to the last bit or one step.
    assert rel_err(q, q_ref) < 1e-2 and rel_err(k_cache, k_ref) < 1e-2
    assert torch.equal(v_cache, v_ref)
    assert torch.equal(v_cache.view(-1, kv_heads, dim)[slots], qkv[:, (heads + kv_heads) * dim:].view(2, kv_heads, dim).to(bf16))
