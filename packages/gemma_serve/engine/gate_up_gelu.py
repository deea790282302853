"""The MLP's gate_up projection with GELU x up in its epilogue, for prompt-sized steps (CUDA, Triton).

In a W2 mixed step (~8,000 rows) on the H200, cuBLAS writes gate_up's [rows, 2 x 10240] output in
bf16 (335 MB a layer), and `fused_kernels.gelu_mul` reads it back and writes the [rows, 10240]
product: 131 us a layer, 4.5 ms of the ~99 ms step. Here one kernel computes, for a tile of rows and
channels, both the gate and the up accumulators from the same x tile, and stores gelu_tanh(gate) *
up, rounded once: the wide output never goes to memory, and the GELU kernel is not launched. It pays
only if the matmul itself stays near cuBLAS's rate, which `quant_bench --gate-up-gelu` measures;
the engine uses it where `GEMMA_GATE_UP_GELU_MIN_ROWS` says (0, off, by default until measured).

The accumulators are float32 and the GELU is computed on them unrounded (the path it replaces rounds
gate and up to 16 bits first), so the result is at least as close to the exact product.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gemma_serve.engine.pdl import pdl_launch

try:  # CUDA builds of PyTorch ship Triton; CPU-only installs never take this path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Steps of at least this many rows take the fused kernel (16-bit weights on CUDA); 0: never.
MIN_ROWS = int(os.environ.get("GEMMA_GATE_UP_GELU_MIN_ROWS", "0"))


@dataclass(frozen=True)
class GateUpTiles:
    block_m: int  # rows of x per program
    block_n: int  # output channels per program (the gate and the up rows of each)
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8  # programs along M that walk the same weight columns in turn (L2 reuse)


# Two [block_m, block_n] float32 accumulators: 128 x 128 with 8 warps is 128 registers a thread for
# them, as FlashAttention's output tile. Untimed until `quant_bench --gate-up-gelu` runs.
DEFAULT_TILES = GateUpTiles(128, 128, 64, 8, 3)


if triton is not None:
    from gemma_serve.engine.fused_kernels import gelu_tanh_mul
    from gemma_serve.engine.pdl import pdl_wait

    @triton.jit(do_not_specialize=["M"])
    def _gate_up_gelu_kernel(X, W, OUT, M, INTER, K, stride_xm, stride_wn, stride_om,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr = False):
        """OUT[m, c] = gelu_tanh(x[m] . W[c]) * (x[m] . W[INTER + c]) for a [BLOCK_M, BLOCK_N] tile,
        W = [gate rows; up rows] ([2 INTER, K]). Rows and channels past the ends are read wrapped
        around (in bounds, no load masks) and never stored."""
        pdl_wait(PDL)
        pid = tl.program_id(0)
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = tl.cdiv(INTER, BLOCK_N)
        per_group = GROUP_M * tiles_n
        first_m = (pid // per_group) * GROUP_M
        group_size = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % group_size
        pid_n = (pid % per_group) // group_size
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        rows_x = (offs_m % M).to(tl.int64)
        rows_g = (offs_n % INTER).to(tl.int64)
        x_ptrs = X + rows_x[:, None] * stride_xm + offs_k[None, :]
        g_ptrs = W + rows_g[None, :] * stride_wn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
        u_ptrs = g_ptrs + INTER * stride_wn
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                x = tl.load(x_ptrs)
                g = tl.load(g_ptrs)
                u = tl.load(u_ptrs)
            else:
                live = t * BLOCK_K + offs_k < K
                x = tl.load(x_ptrs, mask=live[None, :], other=0.0)
                g = tl.load(g_ptrs, mask=live[:, None], other=0.0)
                u = tl.load(u_ptrs, mask=live[:, None], other=0.0)
            acc_g = tl.dot(x, g, acc_g)
            acc_u = tl.dot(x, u, acc_u)
            x_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        y = gelu_tanh_mul(acc_g, acc_u)
        tl.store(OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], y.to(OUT.dtype.element_ty),
                 mask=(offs_m[:, None] < M) & (offs_n[None, :] < INTER))


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the engine's MLP takes the fused kernel for x (rows of the step) and this gate_up weight."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (MIN_ROWS > 0 and rows >= MIN_ROWS and triton is not None and x.is_cuda
            and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16))


def gate_up_gelu(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None,
                 tiles: GateUpTiles | None = None) -> torch.Tensor:
    """gelu_tanh(x @ gate.T) * (x @ up.T) for weight = [gate; up] ([2 * inter, K], rows contiguous)
    and x [..., K] of the weight's dtype, rounded once to `out_dtype` (default x's). Static shapes for
    a given x: CUDA-graph capturable."""
    k = x.shape[-1]
    if weight.shape[0] % 2 or weight.shape[1] != k or weight.stride(-1) != 1 or x.dtype != weight.dtype:
        raise ValueError(f"gate_up_gelu needs a [2 * inter, {k}] weight with contiguous rows, of x's dtype "
                         f"({x.dtype}); got {tuple(weight.shape)} {weight.dtype}")
    inter = weight.shape[0] // 2
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, inter), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], inter)
    t = tiles or DEFAULT_TILES
    grid = (triton.cdiv(m, t.block_m) * triton.cdiv(inter, t.block_n),)
    _gate_up_gelu_kernel[grid](x2, weight, out, m, inter, k, x2.stride(0), weight.stride(0), out.stride(0),
                               BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, GROUP_M=t.group_m,
                               EVEN_K=k % t.block_k == 0, num_warps=t.num_warps, num_stages=t.num_stages,
                               **pdl_launch(x2))
    return out.reshape(*x.shape[:-1], inter)
