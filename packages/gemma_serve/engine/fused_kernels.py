"""The small per-layer operations of a Gemma layer, fused into a few Triton kernels on CUDA.

A decode step at batch 1 is about 20 kernels per layer, most of them tiny (norms, residual adds,
RoPE, the K/V cache write, GELU, a product): in a CUDA graph each still costs its launch gap. Fused:

- `rms_norm`: Gemma's RMSNorm (float32 inside, scaled by 1 + weight), one kernel;
- `add_rms_norm`: residual + norm(x) (or residual + x), then the next norm of the sum: the sandwich
  norms of Gemma 2/3 around the residual add, and a layer's tail with the next layer's input norm;
- `gelu_mul`: GELU (tanh) of the gate half times the up half of the gate_up projection;
- `qkv_to_cache`: QK-norm (Gemma 3) and rotary embedding of q and k, k and v written to the paged
  cache; returns q.

Each has the PyTorch computation it stands for (used on CPU and for layouts the kernels do not take),
and the kernels round where that computation rounds, so bf16 results match it to the last bit or
within one rounding. Values that stay inside one kernel are not rounded on the way (QK-norm into
RoPE, the GELU into its product): in bf16 each such rounding added about as much error to the
logits as a matmul's (bench/bf16_error_attribution.py), and keeping them costs nothing.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gemma_serve.engine.attention import write_kv
from gemma_serve.engine.pdl import pdl_launch

try:  # CUDA builds of PyTorch ship Triton; CPU-only installs use the PyTorch path alone.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:
    from gemma_serve.engine.pdl import pdl_wait

    try:
        from triton.language.extra import libdevice
    except ImportError:  # pragma: no cover - older Triton
        libdevice = None


# qkv_to_cache: heads of one token per program on steps of at least QKV_GROUP_MIN_TOKENS tokens
# (prompt steps). 4 (Gemma 3 4B: its 8 q heads in two programs, its 4 k and 4 v heads in one each):
# W2 on an H200 15,080-15,098 against 14,958 tok/s with one head per program, its 68 prompt steps
# 6.52-6.58 s against 6.72-6.80 (docs/benchmarks.md, tenth run). 1: one head per program everywhere.
QKV_HEADS_PER_PROGRAM = int(os.environ.get("GEMMA_QKV_HEADS_PER_PROGRAM", "4"))
QKV_GROUP_MIN_TOKENS = 512
# Warps of a program that takes several heads (0: as for one head, head_dim / 128 up to 4).
QKV_GROUP_WARPS = int(os.environ.get("GEMMA_QKV_GROUP_WARPS", "0"))


def use_triton(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


# -- PyTorch reference computations ---------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    x32 = x.float()
    out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (out * (1.0 + weight.float())).to(out_dtype or x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x: [T, heads, D]; cos/sin: [T, 1, D]. Computed in float32 (as the kernel), rounded once to
    `out_dtype` (default x's)."""
    x32 = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos.float() + rotated * sin.float()).to(out_dtype or x.dtype)


# -- kernels ----------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(X, W, Y, rows_per_t, stride_t, stride_r, eps, DIM: tl.constexpr, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
        """One row of x ([T, R, DIM] with strided T and R) per program; float32 inside."""
        row = tl.program_id(0)
        t = row // rows_per_t
        r = row % rows_per_t
        cols = tl.arange(0, BLOCK)
        mask = cols < DIM
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)  # a weight: read before the wait
        pdl_wait(PDL)
        x = tl.load(X + t.to(tl.int64) * stride_t + r * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        inv = tl.math.rsqrt(tl.sum(x * x, axis=0) / DIM + eps)
        y = (x * inv) * (1.0 + w)
        tl.store(Y + row.to(tl.int64) * DIM + cols, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _add_rms_norm_kernel(X, R, WX, WO, H, Y, stride_x, stride_r, eps, DIM: tl.constexpr, BLOCK: tl.constexpr,
                             NORM_X: tl.constexpr, NORM_OUT: tl.constexpr, PDL: tl.constexpr = False):
        """h = r + norm(x) (or r + x), rounded; y = norm(h). One row per program."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < DIM
        # The norm weights are read before the wait: no kernel writes them.
        if NORM_X:
            wx = tl.load(WX + cols, mask=mask, other=0.0).to(tl.float32)
        if NORM_OUT:
            wo = tl.load(WO + cols, mask=mask, other=0.0).to(tl.float32)
        pdl_wait(PDL)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if NORM_X:
            inv = tl.math.rsqrt(tl.sum(x * x, axis=0) / DIM + eps)
            x = ((x * inv) * (1.0 + wx)).to(H.dtype.element_ty).to(tl.float32)
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        h = (r + x).to(H.dtype.element_ty)
        tl.store(H + row * DIM + cols, h, mask=mask)
        if NORM_OUT:
            h = h.to(tl.float32)
            inv = tl.math.rsqrt(tl.sum(h * h, axis=0) / DIM + eps)
            tl.store(Y + row * DIM + cols, ((h * inv) * (1.0 + wo)).to(Y.dtype.element_ty), mask=mask)

    # libdevice's tanh is the one PyTorch's GELU uses; Triton's interpreter (CPU checks) lacks it.
    if libdevice is not None and os.environ.get("TRITON_INTERPRET") != "1":

        @triton.jit
        def _tanh(x):
            return libdevice.tanh(x)
    else:  # pragma: no cover - older Triton

        @triton.jit
        def _tanh(x):
            return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def gelu_tanh_mul(gate, up):
        """gelu_tanh(gate) * up in float32, as PyTorch's tanh GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x +
        0.044715 x^3))). Shared by the kernel below and the one-token GEMV's gate_up epilogue."""
        gate = gate.to(tl.float32)
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        return 0.5 * gate * (1.0 + _tanh(inner)) * up.to(tl.float32)

    @triton.jit
    def _gelu_mul_kernel(GU, O, inter, stride_gu, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """out[t, i] = gelu_tanh(gate[t, i]) * up[t, i], gate and up the halves of one gate_up row."""
        pdl_wait(PDL)
        t = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        gate = tl.load(GU + t * stride_gu + cols, mask=mask, other=0.0)
        up = tl.load(GU + t * stride_gu + inter + cols, mask=mask, other=0.0)
        tl.store(O + t * inter + cols, gelu_tanh_mul(gate, up).to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def _qkv_to_cache_kernel(QKV, QW, KW, COS, SIN, SLOT, Q, KC, VC, stride_qkv, stride_cos, eps,
                             HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr, HALF: tl.constexpr,
                             QK_NORM: tl.constexpr, HEAD_STEP: tl.constexpr = 1, PDL: tl.constexpr = False):
        """HEAD_STEP heads of one token per program, heads ordered q..., k..., v... (HEAD_STEP
        divides HEADS and KV_HEADS, so a program's heads are all q, all k or all v): q and k get
        QK-norm then rotary (float32, rounded once); k and v go to the token's cache slot. qkv may
        be float32 (a matmul's unrounded output) or the caches' dtype; q is written in Q's. A
        program's heads share its loads of the norm weights and the RoPE row."""
        t = tl.program_id(0).to(tl.int64)
        j0 = tl.program_id(1) * HEAD_STEP
        cols = tl.arange(0, DIM)
        # Before the wait: what the qkv projection (the kernel before this one) does not write. The
        # norm weights, and the RoPE tables and slots, made at the start of the step.
        slot = tl.load(SLOT + t).to(tl.int64)
        if j0 < HEADS + KV_HEADS:
            partner = (cols + HALF) % DIM
            if QK_NORM:
                if j0 < HEADS:
                    w = tl.load(QW + cols).to(tl.float32)
                    wp = tl.load(QW + partner).to(tl.float32)
                else:
                    w = tl.load(KW + cols).to(tl.float32)
                    wp = tl.load(KW + partner).to(tl.float32)
            c = tl.load(COS + t * stride_cos + cols).to(tl.float32)
            s = tl.load(SIN + t * stride_cos + cols).to(tl.float32)
            pdl_wait(PDL)
            for h in tl.static_range(HEAD_STEP):
                j = j0 + h
                base = QKV + t * stride_qkv + j * DIM
                x = tl.load(base + cols).to(tl.float32)
                xp = tl.load(base + partner).to(tl.float32)
                if QK_NORM:
                    inv = tl.math.rsqrt(tl.sum(x * x, axis=0) / DIM + eps)
                    x = (x * inv) * (1.0 + w)
                    xp = (xp * inv) * (1.0 + wp)
                rotated = tl.where(cols < HALF, -xp, xp)
                y = x * c + rotated * s
                if j0 < HEADS:
                    tl.store(Q + (t * HEADS + j) * DIM + cols, y.to(Q.dtype.element_ty))
                else:
                    tl.store(KC + (slot * KV_HEADS + (j - HEADS)) * DIM + cols, y.to(KC.dtype.element_ty))
        else:
            pdl_wait(PDL)
            for h in tl.static_range(HEAD_STEP):
                j = j0 + h
                v = tl.load(QKV + t * stride_qkv + j * DIM + cols)
                tl.store(VC + (slot * KV_HEADS + (j - HEADS - KV_HEADS)) * DIM + cols, v.to(VC.dtype.element_ty))


# -- public operations ----------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of [T, dim] or [T, R, dim] (last dim contiguous for the kernel), in
    `out_dtype` (default x's: a float32 residual stream gives 16-bit inputs to the next matmul)."""
    if not use_triton(x) or x.stride(-1) != 1 or x.dim() not in (2, 3):
        return rms_norm_reference(x, weight, eps).to(out_dtype or x.dtype)
    dim = x.shape[-1]
    if x.dim() == 2:
        t, r, stride_t, stride_r = x.shape[0], 1, x.stride(0), 0
    else:
        t, r, stride_t, stride_r = x.shape[0], x.shape[1], x.stride(0), x.stride(1)
    y = torch.empty(x.shape, dtype=out_dtype or x.dtype, device=x.device)
    if y.numel():
        block = triton.next_power_of_2(dim)
        _rms_norm_kernel[(t * r,)](x, weight, y, r, stride_t, stride_r, float(eps), DIM=dim, BLOCK=block,
                                   num_warps=max(1, min(8, block // 256)), **pdl_launch(x))
    return y


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, x_weight: torch.Tensor | None,
                 out_weight: torch.Tensor | None, eps: float,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(h, y): h = residual + rms_norm(x, x_weight) (residual + x when x_weight is None), and
    y = rms_norm(h, out_weight) (None when out_weight is None). [T, dim] inputs. h has the residual's
    dtype, y `out_dtype` (default x's): with a float32 residual stream the sum is not rounded to 16
    bits, x may be a matmul's float32 output, and the next matmul still gets 16-bit inputs."""
    out_dtype = out_dtype or x.dtype
    if not use_triton(x) or x.stride(-1) != 1 or residual.stride(-1) != 1 or x.dim() != 2:
        # As the kernel: norm(x) is rounded to the residual's dtype only (not first to x's).
        normed = rms_norm_reference(x, x_weight, eps, residual.dtype) if x_weight is not None else x
        h = residual + normed.to(residual.dtype)
        return h, (rms_norm_reference(h, out_weight, eps, out_dtype) if out_weight is not None else None)
    t, dim = x.shape
    h = torch.empty_like(residual, memory_format=torch.contiguous_format)
    y = torch.empty(h.shape, dtype=out_dtype, device=h.device) if out_weight is not None else None
    if t:
        block = triton.next_power_of_2(dim)
        _add_rms_norm_kernel[(t,)](x, residual, x_weight if x_weight is not None else x,
                                   out_weight if out_weight is not None else x, h, y if y is not None else h,
                                   x.stride(0), residual.stride(0), float(eps), DIM=dim, BLOCK=block,
                                   NORM_X=x_weight is not None, NORM_OUT=out_weight is not None,
                                   num_warps=max(1, min(8, block // 256)), **pdl_launch(x))
    return h, y


def gelu_mul(gate_up: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """gelu_tanh(gate) * up for gate_up = [gate | up] of shape [T, 2 * inter], in float32, rounded
    once to `out_dtype` (default gate_up's; gate_up may be a matmul's float32 output)."""
    out_dtype = out_dtype or gate_up.dtype
    if not use_triton(gate_up) or gate_up.stride(-1) != 1 or gate_up.dim() != 2:
        gate, up = gate_up.float().chunk(2, dim=-1)
        return (F.gelu(gate, approximate="tanh") * up).to(out_dtype)
    t, width = gate_up.shape
    inter = width // 2
    out = torch.empty(t, inter, dtype=out_dtype, device=gate_up.device)
    if t:
        block = 1024
        _gelu_mul_kernel[(t, triton.cdiv(inter, block))](gate_up, out, inter, gate_up.stride(0), BLOCK=block,
                                                         num_warps=4, **pdl_launch(gate_up))
    return out


def qkv_heads_per_program(tokens: int, num_heads: int, num_kv_heads: int, wanted: int | None = None) -> int:
    """Heads of one token per program of the qkv_to_cache kernel: 1 up to QKV_GROUP_MIN_TOKENS
    tokens (a decode step's few tokens need many programs in flight), else the largest divisor of
    both head counts up to `wanted` (default QKV_HEADS_PER_PROGRAM): a prompt step's 8K tokens x 16
    heads of one head each made ~131K tiny programs."""
    wanted = QKV_HEADS_PER_PROGRAM if wanted is None else wanted
    if tokens < QKV_GROUP_MIN_TOKENS:
        return 1
    step = 1
    for d in range(1, max(1, wanted) + 1):
        if num_heads % d == 0 and num_kv_heads % d == 0:
            step = d
    return step


def qkv_to_cache(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, q_norm: torch.Tensor | None,
                 k_norm: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                 k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 heads_per_program: int | None = None) -> torch.Tensor:
    """Split the qkv projection [T, (H + 2 KV) D], apply QK-norm (when the weights are given) and
    rotary to q and k (cos/sin [T, 1, D], float32 or the activations' dtype), write k and v to the cache at
    `slot_mapping`. Returns q [T, H, D] in the cache's dtype. qkv may be float32 over a 16-bit
    cache (a matmul's unrounded output): q, k and v are then rounded once, on the way out.
    heads_per_program: the kernel's grouping (default `qkv_heads_per_program`; tests force it);
    the results do not depend on it."""
    tokens = qkv.shape[0]
    fits = (use_triton(qkv) and qkv.stride(-1) == 1 and not head_dim & (head_dim - 1) and cos.stride(-1) == 1
            and sin.stride() == cos.stride() and k_cache.is_contiguous() and v_cache.is_contiguous())
    if not fits:
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(tokens, num_heads, head_dim)
        k = k.view(tokens, num_kv_heads, head_dim)
        v = v.view(tokens, num_kv_heads, head_dim)
        if q_norm is not None:  # float32 into RoPE, as the kernel
            q, k = rms_norm(q, q_norm, eps, torch.float32), rms_norm(k, k_norm, eps, torch.float32)
        q, k = apply_rotary(q, cos, sin, k_cache.dtype), apply_rotary(k, cos, sin, k_cache.dtype)
        write_kv(k_cache, v_cache, k, v, slot_mapping)
        return q
    q = torch.empty(tokens, num_heads, head_dim, dtype=k_cache.dtype, device=qkv.device)
    if tokens:
        qk_norm = q_norm is not None
        step = (qkv_heads_per_program(tokens, num_heads, num_kv_heads) if heads_per_program is None
                else heads_per_program)
        if num_heads % step or num_kv_heads % step:
            raise ValueError(f"{step} heads per program must divide {num_heads} q and {num_kv_heads} kv heads")
        _qkv_to_cache_kernel[(tokens, (num_heads + 2 * num_kv_heads) // step)](
            qkv, q_norm if qk_norm else qkv, k_norm if qk_norm else qkv, cos, sin, slot_mapping, q, k_cache, v_cache,
            qkv.stride(0), cos.stride(0), float(eps), HEADS=num_heads, KV_HEADS=num_kv_heads, DIM=head_dim,
            HALF=head_dim // 2, QK_NORM=qk_norm, HEAD_STEP=step,
            num_warps=QKV_GROUP_WARPS if step > 1 and QKV_GROUP_WARPS else max(1, min(4, head_dim // 128)),
            **pdl_launch(qkv))
    return q
