"""Weight-only quantization of the decoder's linear layers and of the tied embedding / LM head: INT8
(any device) and FP8 e4m3 (CUDA, compute capability 8.9+), one scale per output channel.

`quantize_model` swaps every `nn.Linear` of the decoder layers (fused QKV, output projection, fused
gate/up, down projection) for a `QuantizedLinear` that holds the 8-bit matrix [N, K] and a float32
scale [N]. The embedding table [vocab, hidden], tied to the output projection, becomes a
`QuantizedEmbedding`: stored once in 8 bits with one scale per vocabulary row (per output channel of
the LM head), read by the input embedding lookup (the rows of the step's tokens, dequantized) and by
the LM head (the whole table, through the same matmul as the layers). For Gemma 3 4B that table is
1.34 GB of bf16, 17% of the weights a decode step reads. `quantize_model(..., lm_head=False)`
(`EngineConfig.quantize_lm_head`) keeps it in the model's dtype. The model code does not know: it
calls its projections, and its table's `lookup` and `project`, as before.

The matmul keeps the activations in their dtype and the weights in 8 bits in memory:

- on CUDA with bf16 (or fp16) activations, up to `TRITON_MAX_ROWS` rows (decode steps, CUDA-graphed up to
  256 rows, and short prefills), Triton kernels read the 8-bit weights, widen them in registers
  with bit operations (exact, and several times the rate of conversion instructions), accumulate in
  float32 and apply the per-channel scale in the epilogue. One token runs on the FMA units with a
  few output rows per program; more tokens run on the matrix units. Projections whose output has
  few tiles split K across programs; the float32 partial sums are added in a fixed order by a
  second small kernel, so results do not depend on timing (no atomics). Decode with few streams is
  bound by reading the weights, which halve against bf16 (docs/benchmarks.md has the measured
  kernels: faster than bf16 for one token, slower from 16 tokens up).
- above that (long prefill chunks, compute bound) and on CPU: the matrix is dequantized to the
  activations' dtype and multiplied by the framework (cuBLAS, or the CPU BLAS).

FP8 is weight-only too: the e4m3 weights are widened in the same kernels, so the activations keep
full precision and no per-token activation scales are needed (`torch._scaled_mm` would need both
operands in fp8). FP8's 3 mantissa bits round weights more coarsely than INT8's per-channel grid
(relative step 2^-4 against about amax/127 absolute), so INT8 is the more accurate of the two; FP8
is offered for parity with checkpoints and engines that use it.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gemma_serve.engine.fused_kernels import gelu_mul
from gemma_serve.engine.pdl import pdl_launch

try:  # CUDA builds of PyTorch ship Triton; CPU-only installs use the PyTorch path alone.
    import triton
    import triton.language as tl

    from gemma_serve.engine.fused_kernels import gelu_tanh_mul
    from gemma_serve.engine.pdl import pdl_wait
except ImportError:  # pragma: no cover - depends on the install
    triton = None

logger = logging.getLogger(__name__)

QUANTIZATION_METHODS = ("none", "int8", "fp8")
# Largest representable magnitude of each 8-bit format; a channel's absmax maps onto it.
_QMAX = {"int8": 127.0, "fp8": 448.0}
# Rows (tokens) up to which the Triton kernel runs on CUDA; longer inputs dequantize and use cuBLAS.
TRITON_MAX_ROWS = 256


def check_quantization(method: str, device: torch.device) -> None:
    """Refuse, at engine start, a method this engine or this device cannot run."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"unknown quantization {method!r}; the portable engine supports "
                         f"{', '.join(QUANTIZATION_METHODS)} (weight-only, per-output-channel scales)")
    if method == "fp8":
        if device.type != "cuda":
            raise ValueError(f"quantization 'fp8' needs a CUDA GPU of compute capability 8.9 or newer (Ada, "
                             f"Hopper); this engine runs on {device.type}: use 'int8' instead")
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ValueError(f"quantization 'fp8' needs compute capability 8.9 or newer (Ada, Hopper); "
                             f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: "
                             f"use 'int8' instead")


def _storage_dtype(method: str) -> torch.dtype:
    return torch.int8 if method == "int8" else torch.float8_e4m3fn


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float weight -> (8-bit weight [N, K], float32 scale [N]) with weight ~= q * scale[:, None].
    Symmetric, one scale per output row: INT8 rounds to the nearest step (error <= scale / 2)."""
    if method not in _QMAX:
        raise ValueError(f"cannot quantize to {method!r}; use one of {', '.join(_QMAX)}")
    w = weight.detach().float()
    qmax = _QMAX[method]
    # An all-zero row keeps a tiny positive scale: its values quantize to 0 and come back as 0.
    scale = (w.abs().amax(dim=1) / qmax).clamp_(min=1e-12)
    scaled = (w / scale[:, None]).clamp_(-qmax, qmax)
    if method == "int8":
        scaled = scaled.round_()
    else:
        # Below e4m3's smallest normal (2^-6) round to 0 or +-2^-6 rather than to a subnormal, so the
        # kernel's bit-level widening is exact; the error there stays under 2^-7 * scale (amax/57344).
        tiny = scaled.abs() < 2.0 ** -6
        scaled = torch.where(tiny, (scaled * 2.0 ** 6).round_() * 2.0 ** -6, scaled)
    return scaled.to(_storage_dtype(method)).contiguous(), scale


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(8-bit weight [N, K], scale [N]) -> weight [N, K] in `dtype`. 8-bit values are exact in bf16,
    fp16 and fp32, so the only rounding is that of the product."""
    return qweight.to(dtype) * scale.to(dtype)[:, None]


def output_dtype(x: torch.Tensor, wanted: torch.dtype | None, max_rows: int | None = None) -> torch.dtype:
    """The dtype a projection of x returns: `wanted` (float32 for a 16-bit model whose layers keep
    matmul outputs unrounded) for up to `max_rows` rows (None: any number), else x's."""
    if wanted is None or (max_rows is not None and x.numel() > max_rows * x.shape[-1]):
        return x.dtype
    return wanted


def matmul(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T in `out_dtype`. A float32 output from 16-bit operands is the
    float32 accumulator unrounded: cuBLAS's `out_dtype` on CUDA, float32 operands elsewhere (16-bit
    products are exact in float32, so both are the same sum)."""
    if out_dtype == x.dtype:
        return F.linear(x, weight)
    if x.is_cuda:
        y = torch.mm(x.reshape(-1, x.shape[-1]), weight.t(), out_dtype=out_dtype)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x.to(out_dtype), weight.to(out_dtype))


@dataclass(frozen=True)
class OneTokenPlan:
    """The one-token kernel's arguments for a projection (see `projected_gelu_mul`)."""

    weight: torch.Tensor
    scale: torch.Tensor | None
    config: KernelConfig


def projected_gelu_mul(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up of x's gate_up projection by `linear` ([2 * inter, K], gate rows then up
    rows), in x's dtype. As many tokens on CUDA as the layer runs on the one-token kernel (1; 8-bit
    weights up to FEW_TOKEN_ROWS, 16-bit up to BF16_FEW_TOKEN_ROWS): one kernel, the one-token GEMV
    with the GELU in its epilogue (the gate_up output never goes to memory). Otherwise the projection
    (float32 when the layer asks for it) and `fused_kernels.gelu_mul`, rounded once either way. (A
    Triton matmul with the GELU in its epilogue for prompt-sized steps was 0.82-0.84x cuBLAS + this
    kernel on an H200: branch `s11-experiments`.)"""
    plan = None
    if isinstance(linear, QuantizedLinear):
        plan = linear.one_token_plan(x, FEW_TOKEN_ROWS)
    elif isinstance(linear, OneTokenLinear):
        plan = linear.one_token_plan(x, BF16_FEW_TOKEN_ROWS)
    if FUSED_GELU and plan is not None and plan.config.split_k == 1 and plan.config.block_n % 2 == 0:
        return triton_weight_only_linear(x, plan.weight, plan.scale, plan.config, gelu_mul=True)
    return gelu_mul(linear(x), x.dtype)


class QuantizedLinear(nn.Module):
    """A bias-free linear layer with an 8-bit weight [out_features, in_features] and a float32 scale
    per output feature, both buffers (they are state, not trainable parameters). `out_dtype`: the
    outputs' dtype when set, for inputs of up to `out_dtype_max_rows` rows (see `output_dtype`);
    otherwise the input's."""

    out_dtype: torch.dtype | None = None
    out_dtype_max_rows: int | None = None

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("weight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str) -> QuantizedLinear:
        if linear.bias is not None:
            raise ValueError("weight-only quantization here covers bias-free linear layers (all of Gemma's)")
        return cls(*quantize_weight(linear.weight, method))

    @property
    def method(self) -> str:
        return "int8" if self.weight.dtype == torch.int8 else "fp8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return weight_only_linear(x, self.weight, self.scale, output_dtype(x, self.out_dtype, self.out_dtype_max_rows))

    def one_token_plan(self, x: torch.Tensor, max_rows: int = 1) -> OneTokenPlan | None:
        """The one-token kernel's arguments for x of 1 .. max_rows (at most FEW_TOKEN_ROWS) tokens."""
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not (_triton_rows(x) and 1 <= rows <= min(max_rows, FEW_TOKEN_ROWS)):
            return None
        n, k = self.weight.shape
        return OneTokenPlan(self.weight, self.scale,
                            kernel_config(1, n, k, _num_sms(x.device.index or 0), self.weight.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.method}"


def _triton_rows(x: torch.Tensor) -> bool:
    """Whether the weight-only kernels take x: 16-bit activations on CUDA, up to TRITON_MAX_ROWS rows."""
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and x.numel() <= TRITON_MAX_ROWS * x.shape[-1])


def weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [..., K] @ (qweight [N, K] * scale[:, None]).T -> [..., N] in `out_dtype` (default x's)."""
    if _triton_rows(x):
        return triton_weight_only_linear(x, qweight, scale, out_dtype=out_dtype)
    return matmul(x, dequantize_weight(qweight, scale, x.dtype), out_dtype or x.dtype)


# Rows of an embedding table quantized, or dequantized for the framework's matmul, at a time: all of
# Gemma 3's 262,144 x 2560 table would be a 2.7 GB float32 temporary (1.34 GB in bf16, every step).
TABLE_ROWS_PER_CHUNK = 16384


class QuantizedEmbedding(nn.Module):
    """A tied embedding table [vocab, hidden] in 8 bits with a float32 scale per row (per token's
    embedding, which is per output channel of the LM head), both buffers. It serves the table's two
    uses: `lookup` (input embeddings) and `project` (logits). `dtype`: the float table's, which the
    model's activations keep."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                 rows_per_chunk: int = TABLE_ROWS_PER_CHUNK) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.dtype = dtype
        self.rows_per_chunk = rows_per_chunk
        self.register_buffer("weight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, embedding: nn.Embedding, method: str,
                       rows_per_chunk: int = TABLE_ROWS_PER_CHUNK) -> QuantizedEmbedding:
        """`quantize_weight` of the table, `rows_per_chunk` rows at a time (each row has its own
        scale, so the result is the same), so the extra memory is a chunk in float32, not the table."""
        table = embedding.weight
        qweight = torch.empty(table.shape, dtype=_storage_dtype(method), device=table.device)
        scale = torch.empty(table.shape[0], dtype=torch.float32, device=table.device)
        for start in range(0, table.shape[0], rows_per_chunk):
            rows = slice(start, start + rows_per_chunk)
            qweight[rows], scale[rows] = quantize_weight(table[rows], method)
        return cls(qweight, scale, table.dtype, rows_per_chunk)

    @property
    def method(self) -> str:
        return "int8" if self.weight.dtype == torch.int8 else "fp8"

    def lookup(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The rows `ids` of the table in `dtype` [*ids.shape, hidden]: `dequantize_weight` of those
        rows. Gathered as bytes: older PyTorch builds do not index float8 tensors (CUDA since 2.7)."""
        flat = ids.reshape(-1)
        rows = self.weight.view(torch.uint8)[flat].view(self.weight.dtype)
        return dequantize_weight(rows, self.scale[flat], dtype).reshape(*ids.shape, self.embedding_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """As `nn.Embedding`: the rows in the float table's dtype."""
        return self.lookup(ids, self.dtype)

    def project(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The LM head: x [..., hidden] @ table.T -> [..., vocab] in `out_dtype` (default x's), by
        `weight_only_linear`. Where that dequantizes (off the Triton path: CPU, float32, more than
        TRITON_MAX_ROWS rows), it does so `rows_per_chunk` vocabulary rows at a time."""
        if _triton_rows(x) or self.num_embeddings <= self.rows_per_chunk:
            return weight_only_linear(x, self.weight, self.scale, out_dtype)
        chunks = zip(self.weight.split(self.rows_per_chunk), self.scale.split(self.rows_per_chunk))
        return torch.cat([weight_only_linear(x, q, s, out_dtype) for q, s in chunks], dim=-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.method}"


class OneTokenLinear(nn.Linear):
    """A bias-free linear layer with 16-bit weights whose one-token products (decode at batch 1)
    run on the Triton one-token kernel: on an H200 it streams Gemma 3 4B's projections at 69-92% of
    the copy rate where cuBLAS reaches 40-87% (`quant_bench --bf16-gemv`, docs/benchmarks.md).
    Everything else (more tokens, CPU, float32) is `F.linear` as before. GEMMA_ONE_TOKEN_GEMV=0
    keeps cuBLAS everywhere, for comparison. `out_dtype`, `out_dtype_max_rows`: as `QuantizedLinear`'s."""

    out_dtype: torch.dtype | None = None
    out_dtype_max_rows: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = output_dtype(x, self.out_dtype, self.out_dtype_max_rows)
        plan = self.one_token_plan(x, BF16_FEW_TOKEN_ROWS)
        if plan is not None:
            return triton_weight_only_linear(x, plan.weight, None, plan.config, out_dtype=out_dtype)
        return matmul(x, self.weight, out_dtype)

    def one_token_plan(self, x: torch.Tensor, max_rows: int = 1) -> OneTokenPlan | None:
        """The one-token kernel's arguments for x of 1 .. max_rows tokens, or None."""
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not (ONE_TOKEN_GEMV and triton is not None and x.is_cuda and x.dtype == self.weight.dtype
                and x.dtype in (torch.bfloat16, torch.float16) and 1 <= rows <= max_rows):
            return None
        return OneTokenPlan(self.weight, None, one_token_config(*self.weight.shape))


ONE_TOKEN_GEMV = os.environ.get("GEMMA_ONE_TOKEN_GEMV", "1") == "1"
# GEMMA_CUDA_GEMV=1: one-token projections of INT8 or bf16 weights (bf16 input) on the CUDA kernel
# of `cuda_gemv.py` (bulk-copy rings, built with nvcc on first use) instead of the Triton one-token
# kernel. Experimental and off: slower on an H200 (seventeenth run; W1 INT8 502 against 616 tok/s,
# bf16 382 against 419). Its sums run in another order than the Triton kernel's at 2-4 tokens, so
# a sequence alone and in a small batch would differ in the last bits.
CUDA_GEMV = os.environ.get("GEMMA_CUDA_GEMV", "0") == "1"
# gate_up's GELU in the one-token kernel's epilogue; GEMMA_FUSED_GELU=0 runs the GELU kernel after it.
FUSED_GELU = os.environ.get("GEMMA_FUSED_GELU", "1") == "1"
# The one-token kernel reads its first weight tile before the PDL wait, overlapping the kernel
# before it (16-bit weights and INT8 on the half2 path: W1 bf16 +2.8%, INT8 half2 590 against 550
# tok/s on an H200); GEMMA_GEMV_EARLY_WEIGHTS=0 waits first. Not for the other 8-bit paths by default:
# their loop with its first step taken out measured slower (INT8 float-add qkv 10.3 against 6.0 us);
# "all" reads every kind early. One tile is the best amount measured: each projection waiting first
# costs 0.3-3% of W1, and 2 or 4 tiles early (or the programs scheduled a kernel sooner) slow the
# short kernels they overlap, W1 1-8% (docs/benchmarks.md, fifteenth run).
GEMV_EARLY_WEIGHTS = os.environ.get("GEMMA_GEMV_EARLY_WEIGHTS", "1")
# The one-token kernel keeps several weight tiles in flight where its grid is small
# (`prefetch_applies`); GEMMA_GEMV_PREFETCH=0 keeps one. GEMMA_GEMV_PREFETCH_TILES: how many (2, the
# default: INT8 qkv 4.3 against 5.1 us on an H200; 3-5 not yet timed on a GPU).
GEMV_PREFETCH = os.environ.get("GEMMA_GEMV_PREFETCH", "1") == "1"
MAX_PREFETCH_TILES = 5
GEMV_PREFETCH_TILES = int(os.environ.get("GEMMA_GEMV_PREFETCH_TILES", "2"))
if not 2 <= GEMV_PREFETCH_TILES <= MAX_PREFETCH_TILES:
    raise ValueError(f"GEMMA_GEMV_PREFETCH_TILES={GEMV_PREFETCH_TILES}: use 2 to {MAX_PREFETCH_TILES}")
# ... for grids of fewer than this many programs per SM (4: INT8 qkv's 512 programs on 132 SMs, not
# o's and down's 640; GEMMA_GEMV_PREFETCH_PER_SM=8 takes those in too, for measuring).
GEMV_PREFETCH_PER_SM = int(os.environ.get("GEMMA_GEMV_PREFETCH_PER_SM", "4"))
# The one-token kernel takes up to 4 tokens at once (each weight tile read once for all): 8-bit
# weights at 2..GEMMA_FEW_TOKEN_ROWS rows run on it instead of the matrix-unit kernel, which is no
# faster than cuBLAS on bf16 there (H200, the layers' projections at 2 / 3 / 4 rows: 1.375 / 1.646 /
# 2.005 ms against 2.221 / - / 2.160 on the matrix units and bf16's 2.10; docs/benchmarks.md).
FEW_TOKEN_MAX_ROWS = 4
FEW_TOKEN_ROWS = min(int(os.environ.get("GEMMA_FEW_TOKEN_ROWS", "4")), FEW_TOKEN_MAX_ROWS)
# 16-bit weights at 2..GEMMA_BF16_FEW_TOKEN_ROWS tokens on the one-token kernel too (at most 4);
# 1 (the default until measured against cuBLAS, `quant_bench --methods bf16,bf16-gemv`): one token.
BF16_FEW_TOKEN_ROWS = min(int(os.environ.get("GEMMA_BF16_FEW_TOKEN_ROWS", "1")), FEW_TOKEN_MAX_ROWS)


# INT8 weights on the one-token kernel, where 2048 divides K (o and down): 2048-wide K steps on
# this many warps (GEMMA_GEMV_WIDE_K), twice the weight bytes in flight per program of the 1024-wide
# step on 4 warps (0). On an H200: W1 INT8 616.0-616.5 tok/s against 593.7-593.9 (8 warps; 604.1 on
# 4), down 7.9 against 9.7 us a layer. 16-bit weights keep 1024 (W1 bf16 382 against 407 with 2048
# on 8 warps; docs/benchmarks.md, twelfth run), and so does FP8: its layers took 3.45 / 4.24 ms
# against 2.90 / 3.92 at 3 / 4 tokens with the wide steps, for 1.64 against 1.67 at one (thirteenth).
_WIDE_K = os.environ.get("GEMMA_GEMV_WIDE_K", "8")
if _WIDE_K not in ("0", "4", "8"):
    raise ValueError(f"GEMMA_GEMV_WIDE_K={_WIDE_K!r}: use 8 or 4 (warps of a 2048-wide K step) or 0 (1024-wide steps)")
GEMV_WIDE_K_WARPS = int(_WIDE_K)


def _mlp_up_shape(n: int, k: int) -> bool:
    """Whether [n, k] has the shape of a Gemma MLP's fused gate + up projection (N 8-12x K), not
    of the LM head (N ~100x K: a vocabulary), whose tiles were measured separately. 16-bit only:
    the 8-bit tile must serve 1-4 tokens alike (see `kernel_config`)."""
    return 4 * k <= n <= 16 * k


def one_token_config(n: int, k: int) -> KernelConfig:
    """Tiles of the one-token kernel on 16-bit weights, from `quant_bench --one-token-tiles` on an
    H200: 4 output rows per program, 1024-wide K steps in 2 stages where 1024 divides K, else 512 in
    3. Two shapes differ (fourteenth run, Gemma 3 4B): the MLP's down projection (K at least 4x N)
    takes 2 rows, twice the programs on its narrow output (12.9 against 15.5 us a layer); its
    up projection (`_mlp_up_shape`) takes 8 rows on 256-wide steps (25.1 against 25.8 us)."""
    if k >= 4 * n and k % 1024 == 0:
        return KernelConfig(1, 2, 1024, 1, 4, 2)
    if _mlp_up_shape(n, k) and k % 256 == 0:
        return KernelConfig(1, 8, 256, 1, 4, 3)
    if k % 1024 == 0:
        return KernelConfig(1, 4, 1024, 1, 4, 2)
    return KernelConfig(1, 4, min(512, _pow2_at_least(k, 16)), 1, 4, 3)


# -- the model -------------------------------------------------------------------------------------


def _layer_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every linear layer in the decoder layers. Only `model.layers`:
    the embedding (tied output projection) has its own module, and anything outside the decoder
    stays as it is."""
    found = []
    for module in model.layers.modules():
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                found.append((module, name, child))
    return found


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _quantized(model: nn.Module) -> list[QuantizedLinear | QuantizedEmbedding]:
    return [m for m in model.modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))]


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the forward reads: parameters plus quantized matrices (the embedding
    table included, counted once: the LM head reads all of it) and their scales."""
    return sum(_bytes(p) for p in model.parameters()) + sum(_bytes(m.weight) + _bytes(m.scale)
                                                           for m in _quantized(model))


def model_weight_count(model: nn.Module) -> int:
    """Weights (multiply-adds per token): parameters plus the entries of quantized matrices."""
    return sum(p.numel() for p in model.parameters()) + sum(m.weight.numel() for m in _quantized(model))


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, out_dtype: torch.dtype | None = None, *,
                   lm_head: bool = True) -> None:
    """Replace the decoder layers' linear layers by `QuantizedLinear`s, one at a time so the extra
    memory is one matrix in float32; freed float weights go back to the device. With `lm_head`,
    also the tied embedding table `model.embed_tokens` (an `nn.Embedding`) by a `QuantizedEmbedding`,
    and the float table is freed. Without quantization the linear layers become `OneTokenLinear`s
    on the same weights and the table stays. `out_dtype`: the swapped layers' output dtype (float32:
    unrounded accumulators, see `output_dtype`), default the input's."""
    if method == "none":
        for parent, name, linear in _layer_linears(model):
            if type(linear) is nn.Linear and linear.bias is None:
                one = OneTokenLinear(linear.in_features, linear.out_features, bias=False, device="meta")
                one.weight = linear.weight
                one.out_dtype = out_dtype
                setattr(parent, name, one)
        return
    before = model_weight_bytes(model)
    linears = _layer_linears(model)
    count = len(linears)
    float_bytes = sum(_bytes(lin.weight) for _, _, lin in linears)
    # Popped, so that no list holds a float layer once it is swapped: each is freed before the next
    # is quantized, and all of them before `empty_cache` below.
    while linears:
        parent, name, linear = linears.pop()
        swapped = QuantizedLinear.from_linear(linear, method)
        swapped.out_dtype = out_dtype
        setattr(parent, name, swapped)
        del linear
    table_note = "; the embedding stays in the model's dtype"
    if lm_head:
        table = model.embed_tokens
        if not isinstance(table, nn.Embedding):
            raise TypeError(f"model.embed_tokens is a {type(table).__name__}, not an nn.Embedding: "
                            f"the table is quantized once, from its float weights")
        table_bytes = _bytes(table.weight)
        model.embed_tokens = QuantizedEmbedding.from_embedding(table, method)
        del table
        quantized = model.embed_tokens
        table_note = (f"; embedding / LM head {table_bytes / 1e9:.2f} GB -> "
                      f"{(_bytes(quantized.weight) + _bytes(quantized.scale)) / 1e9:.2f} GB")
    device = next(model.buffers()).device
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the KV cache is sized from free memory next
    after = model_weight_bytes(model)
    quant_bytes = sum(_bytes(m.weight) + _bytes(m.scale) for m in model.modules() if isinstance(m, QuantizedLinear))
    logger.info("%s weight-only quantization of %d linear layers%s: weights %.2f GB -> %.2f GB "
                "(linear layers %.2f GB -> %.2f GB%s)", method, count, " and the embedding" if lm_head else "",
                before / 1e9, after / 1e9, float_bytes / 1e9, quant_bytes / 1e9, table_note)
    if device.type == "cuda" and method == "int8":
        check_half2(model)


HALF2_CHECK_ROWS = 256  # output rows of each matrix the start-up check of the half2 path multiplies


@torch.no_grad()
def check_half2(model: nn.Module) -> bool:
    """Check the INT8 half2 path on this process's GPU and Triton, once, when a model is quantized:
    each distinct INT8 matrix shape of the model, at 1 and 2 tokens with the tiles the engine will
    use, its first HALF2_CHECK_ROWS output rows against float64. half2 relies on how
    Triton lays a weight tile out over threads (`half2_applies`), which its documentation leaves
    open; if another Triton version lays it out otherwise, the sums come out wrong, and this switches
    the engine to the exact float-add path (a warning says so) rather than serve wrong logits.
    True when half2 is in use and passed, or not in use."""
    global INT8_GEMV_WIDEN
    if INT8_GEMV_WIDEN != _WIDEN_INT8_HALF2 or triton is None:
        return True
    gen = None
    seen: set[tuple[int, int]] = set()
    for module in model.modules():
        if not isinstance(module, (QuantizedLinear, QuantizedEmbedding)) or module.weight.dtype != torch.int8:
            continue
        q, scale = module.weight, module.scale
        n, k = q.shape
        if not q.is_cuda or (n, k) in seen:
            continue
        seen.add((n, k))
        if gen is None:
            gen = torch.Generator(device=q.device).manual_seed(0)
        rows = min(n, HALF2_CHECK_ROWS)
        exact = q[:rows].double() * scale[:rows].double()[:, None]
        # One token (one asm block) and two (the other); more tokens run the same code as two.
        for m in (1, 2) if FEW_TOKEN_ROWS >= 2 else (1,):
            cfg = kernel_config(m, n, k, _num_sms(q.device.index or 0), q.dtype)
            if cfg.block_m != 1 or not half2_applies(cfg, q):
                continue
            x = torch.randn(m, k, device=q.device, generator=gen).bfloat16()
            try:
                got = triton_weight_only_linear(x, q[:rows], scale[:rows], cfg, out_dtype=torch.float32).double()
            except Exception as exc:  # unverified is unused: the exact path serves instead
                logger.warning("INT8 half2 one-token path failed on a %dx%d matrix (%s: %s): using the exact "
                               "float-add path instead", n, k, type(exc).__name__, exc)
                INT8_GEMV_WIDEN = _WIDEN_INT8
                return False
            ref = x.double() @ exact.T
            err = float((got - ref).norm() / ref.norm())
            if not err < 1e-2:  # half2 measures ~1e-3; a layout it does not expect gives ~1
                logger.warning("INT8 half2 one-token path gave relative error %.2e on a %dx%d matrix at %d "
                               "token(s) with %s (Triton %s): using the exact float-add path instead",
                               err, n, k, m, cfg, triton.__version__)
                INT8_GEMV_WIDEN = _WIDEN_INT8
                return False
    return True


# -- the CUDA kernel -------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    block_m: int  # rows of x (tokens) per program; 1: the one-token kernel (FMA units, no matrix unit)
    block_n: int  # output channels per program
    block_k: int
    split_k: int  # programs sharing one output tile, each summing a contiguous share of K
    num_warps: int
    num_stages: int
    # Matrix-unit kernel only: weight tile as the left operand ([N, K] @ [K, M]), so a few tokens
    # still fill the unit's rows; False multiplies [M, K] @ [K, N] as a plain matmul does.
    swap_ab: bool = True


def _pow2_at_least(n: int, low: int) -> int:
    return max(low, 1 << max(0, (n - 1).bit_length()))


def kernel_config(m: int, n: int, k: int, num_sms: int, weight_dtype: torch.dtype = torch.int8) -> KernelConfig:
    """Tile shapes for an [m, k] x [k, n] product, picked from the sweep of `gemma_serve.bench.quant_bench`
    on an H200 (docs/benchmarks.md). Decode sizes are bound by streaming the weights: up to
    FEW_TOKEN_ROWS tokens run on the FMA units with 4-8 output rows per program and 4 KB of weights
    per step of its K loop, 8 KB for INT8 where 2048 divides K (GEMV_WIDE_K_WARPS; thousands of programs keep
    every SM's loads in flight; K tiles that divide K, a ragged tile costs more than it saves); up
    to 16 tokens use narrow output tiles on the matrix units with long K tiles, and split K when the output has too few tiles to give every
    SM two programs. Larger m tiles the tokens too, as a plain matmul does."""
    swap = True
    split_target = 2 * num_sms  # programs to reach by splitting K
    if m <= FEW_TOKEN_ROWS:  # the one-token kernel (1 .. 4 tokens)
        block_m, warps, stages = 1, 4, 2
        block_n, block_k = (4, 1024) if k % 1024 == 0 else (8, 512)
        if GEMV_WIDE_K_WARPS > 0 and k % 2048 == 0 and weight_dtype == torch.int8:  # every row count
            block_k, warps = 2048, GEMV_WIDE_K_WARPS  # alike: a row's sums must not depend on the batch
        # (Fourteenth run: INT8 gate_up on 16 rows x 256 made W1 1.1% faster and the 2-4-token layers
        # 4-5% slower; o on 8 rows was slower on both. Both stay on these tiles: docs/benchmarks.md.)
    elif m <= 16:
        block_m, warps, stages = 16, 4, 3
        if n >= 8192 or k > 4096:  # gate_up, and down (split K: its 2560 outputs make few tiles)
            block_n, block_k, stages = 64, 128, 4
        else:  # qkv and o: K short enough that splitting it measured slower
            block_n, block_k, split_target = 32, 512, 0
    elif m <= 64:
        block_m, block_n, block_k, warps, stages = _pow2_at_least(m, 32), 64, 128, 4, 4
    elif n >= 8192:
        block_m, block_n, block_k, warps, stages = 128, 128, 64, 8, 4
    else:
        block_m, block_n, block_k, warps, stages, swap = 128, 64, 128, 8, 3, False
    block_n = min(block_n, _pow2_at_least(n, 1 if block_m == 1 else 16))
    block_k = min(block_k, _pow2_at_least(k, 16))
    tiles = -(-n // block_n) * (1 if block_m == 1 else -(-m // block_m))  # block_m 1: all m in one program
    k_tiles = -(-k // block_k)
    split = 1
    # Each share keeps at least two K tiles, so the loads still pipeline.
    while tiles * split < split_target and k_tiles >= 4 * split:
        split *= 2
    return KernelConfig(block_m, block_n, block_k, split, warps, stages, swap)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# How the kernel widens weights: the framework's conversion (to fp16 activations), or integer and
# float adds into bf16 for INT8 and for FP8 (see `_widen_exact`). The one-token kernel has one more
# way for INT8: weights and x as float16 pairs, multiplied two at a time (see `_int8_half2_dot16`).
_WIDEN_CONVERT, _WIDEN_INT8, _WIDEN_FP8, _WIDEN_INT8_HALF2 = 0, 1, 2, 3
# How the one-token kernel widens INT8 weights in the engine: GEMMA_INT8_GEMV_WIDEN=half2 (the
# default: W1 INT8 551 against 502 tok/s on an H200, docs/benchmarks.md "seventh run"; float16
# products, within bf16's output rounding for activations from ~1e-2 up, clamped at float16's
# 65504), or float-add (exact up to float32 accumulation at any scale; tests/gpu/test_quantization.py).
INT8_GEMV_WIDENINGS = {"float-add": _WIDEN_INT8, "half2": _WIDEN_INT8_HALF2}
_INT8_GEMV_WIDEN_NAME = os.environ.get("GEMMA_INT8_GEMV_WIDEN", "half2")
if _INT8_GEMV_WIDEN_NAME not in INT8_GEMV_WIDENINGS:
    raise ValueError(f"GEMMA_INT8_GEMV_WIDEN={_INT8_GEMV_WIDEN_NAME!r}: expected one of {sorted(INT8_GEMV_WIDENINGS)}")
INT8_GEMV_WIDEN = INT8_GEMV_WIDENINGS[_INT8_GEMV_WIDEN_NAME]

if triton is not None:
    _FP8_REBIAS = tl.constexpr(2.0 ** 120)  # float32 exponent bias 127 against e4m3's 7

    @triton.jit
    def _widen_exact(w, KIND: tl.constexpr):
        """8-bit weights -> bf16 without conversion instructions, which issue at a fraction of the
        rate of plain integer and float operations: at decode batch sizes widening every weight, not
        the matmul, is what the arithmetic units spend their time on. The float32 from
        `_widen_to_float32` is an INT8 or e4m3 value, so it fits bf16's 8-bit significand and its
        upper 16 bits are that bf16 exactly."""
        f = _widen_to_float32(w, KIND)
        return (f.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _widen_to_float32(w, KIND: tl.constexpr):
        """8-bit weights -> float32 holding exactly their value: bit operations and one float add
        (INT8) or multiply (fp8) each."""
        u = w.to(tl.uint8, bitcast=True).to(tl.uint32)
        if KIND == 1:
            # (q + 128) in the low mantissa bits of 2^23: the float is 2^23 + 128 + q, exactly.
            f = (u ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        else:
            # e4m3's sign, exponent and mantissa moved into float32's fields read as value * 2^-120;
            # exact because stored weights hold no e4m3 subnormals (`quantize_weight` rounds them).
            f = (((u & 0x80) << 24) | ((u & 0x7F) << 20)).to(tl.float32, bitcast=True) * _FP8_REBIAS
        return f

    # The half2 path holds weights as q / 1024 (exact in float16, and at most 1/8 in size, so a sum of
    # eight products of float16 activations stays finite) and multiplies the sum by 1024 at the end.
    _HALF2_DOWN = tl.constexpr(1024.0)

    def _half2_dot_lines(weights: list[str], x_first: int, acc_first: int) -> list[str]:
        """PTX of the half2 products for one pack of 16: eight packed multiply-adds of the weight
        pairs `weights` with x's pairs ($x_first on), their two float16 sums widened and added to the
        first two accumulators ($acc_first on), the other fourteen passed through."""
        lines = [f"mul.rn.f16x2 p, {weights[0]}, ${x_first};"]
        lines += [f"fma.rn.f16x2 p, {weights[i]}, ${x_first + i}, p;" for i in range(1, 8)]
        lines += ["mov.b32 {lo, hi}, p;", "cvt.f32.f16 f0, lo;", "cvt.f32.f16 f1, hi;",
                  f"add.f32 $0, ${acc_first}, f0;", f"add.f32 $1, ${acc_first + 1}, f1;"]
        return lines + [f"mov.b32 ${i}, ${acc_first + i};" for i in range(2, 16)]

    def _half2_asm() -> str:
        """PTX for `_int8_half2_dot16`: $0-$15 the new accumulators, $16-$19 the weights (4 bytes
        each), $20-$27 x (float16 pairs), $28-$43 the accumulators."""
        lines = [".reg .b32 t<4>, h<8>, p, c;", ".reg .f16 lo, hi;", ".reg .f32 f0, f1;",
                 "mov.b32 c, 0x3C803C80;"]
        for i in range(4):
            lines += [f"xor.b32 t{i}, ${16 + i}, 0x80808080;",
                      f"prmt.b32 h{2 * i}, t{i}, 0x3C3C3C3C, 0x4140;",
                      f"prmt.b32 h{2 * i + 1}, t{i}, 0x3C3C3C3C, 0x4342;"]
        lines += [f"sub.rn.f16x2 h{i}, h{i}, c;" for i in range(8)]
        lines += _half2_dot_lines([f"h{i}" for i in range(8)], 20, 28)
        return "{\n" + "\n".join(lines) + "\n}"

    _HALF2_ASM = tl.constexpr(_half2_asm())
    _HALF2_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 16 + ["r"] * 28))

    @triton.jit
    def _int8_half2_dot16(w, x, acc):
        """acc + w * x for 16 INT8 weights at a time (one row's, with the engine's 16-byte weight
        loads), in 32 instructions instead of ~90: each weight byte goes into the low mantissa of
        the float16 1 + byte / 1024 (one byte permute makes two), a packed subtract of 1.125 leaves
        q / 1024 exactly, eight packed multiply-adds with x (float16 pairs) leave two sums of eight
        products each, in float16 (11 bits, where bf16 activations carry 8), and those two are widened
        and added to the float32 accumulators. Only the first two of the sixteen accumulators change;
        the caller sums them all."""
        return tl.inline_asm_elementwise(asm=_HALF2_ASM, constraints=_HALF2_CONSTRAINTS,
                                         args=[w, x, acc], dtype=tl.float32, is_pure=True, pack=16)

    def _half2_dot_asm() -> str:
        """PTX for `_half2_dot16`: $0-$15 the new accumulators, $16-$23 the weights (float16 pairs),
        $24-$31 x (float16 pairs), $32-$47 the accumulators."""
        lines = [".reg .b32 p;", ".reg .f16 lo, hi;", ".reg .f32 f0, f1;"]
        lines += _half2_dot_lines([f"${16 + i}" for i in range(8)], 24, 32)
        return "{\n" + "\n".join(lines) + "\n}"

    _HALF2_DOT_ASM = tl.constexpr(_half2_dot_asm())
    _HALF2_DOT_CONSTRAINTS = tl.constexpr(",".join(["=r"] * 16 + ["r"] * 32))

    @triton.jit
    def _int8_to_half_q1024(w):
        """INT8 weights -> float16 q / 1024, exact (the first half of `_int8_half2_dot16`, for the
        few-token kernel, which multiplies each converted tile by several tokens' x)."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, c;
            mov.b32 c, 0x3C803C80;
            xor.b32 t, $2, 0x80808080;
            prmt.b32 $0, t, 0x3C3C3C3C, 0x4140;
            prmt.b32 $1, t, 0x3C3C3C3C, 0x4342;
            sub.rn.f16x2 $0, $0, c;
            sub.rn.f16x2 $1, $1, c;
            }""",
            constraints="=r,=r,r", args=[w], dtype=tl.float16, is_pure=True, pack=4)

    @triton.jit
    def _half2_dot16(w, x, acc):
        """acc + w * x for 16 float16 weights at a time, as in `_int8_half2_dot16` after its
        conversion: two sums of eight products in float16 added to the first two accumulators."""
        return tl.inline_asm_elementwise(asm=_HALF2_DOT_ASM, constraints=_HALF2_DOT_CONSTRAINTS,
                                         args=[w, x, acc], dtype=tl.float32, is_pure=True, pack=16)

    @triton.jit
    def _bf16_to_half_saturated(x):
        """bf16 -> float16, values past float16's range clamped to it (two shifts and one packed
        conversion per pair)."""
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 lo, hi;
            shl.b32 lo, $1, 16;
            and.b32 hi, $1, 0xFFFF0000;
            cvt.rn.satfinite.f16x2.f32 $0, hi, lo;
            }""",
            constraints="=r,r", args=[x], dtype=tl.float16, is_pure=True, pack=2)

    @triton.jit
    def _gemv_step(acc, w, x, WIDEN: tl.constexpr):
        """One K step of the one-token kernel: acc [N, K] += widened w [N, K] * x [K]."""
        if WIDEN == 0:
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        elif WIDEN == 3:
            acc = _int8_half2_dot16(w, _bf16_to_half_saturated(x)[None, :], acc)
        else:
            acc += _widen_to_float32(w, WIDEN) * x.to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _load_x(ptrs, mask):
        """A K tile of x: whole (mask None) or its valid columns, zeros past K."""
        if mask is None:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=mask, other=0.0)
        return x

    @triton.jit
    def _token_step(acc, wv, x, WIDEN: tl.constexpr):
        """acc += wv * x for one token of the few-token kernel, on weights `_tokens_step` widened."""
        if WIDEN == 3:
            return _half2_dot16(wv, _bf16_to_half_saturated(x)[None, :], acc)
        return acc + wv * x.to(tl.float32)[None, :]

    @triton.jit
    def _tokens_step(acc0, acc1, acc2, acc3, w, x_ptrs, stride_xm, x_mask, WIDEN: tl.constexpr,
                     M_TOK: tl.constexpr):
        """One K step for M_TOK (1-4) tokens: the weight tile is read and widened once and multiplied
        by each token's x (x_mask: the K tile's valid columns). One token runs `_gemv_step`."""
        if M_TOK == 1:
            acc0 = _gemv_step(acc0, w, _load_x(x_ptrs, x_mask), WIDEN)
        else:
            if WIDEN == 3:
                wv = _int8_to_half_q1024(w)
            elif WIDEN == 0:
                wv = w.to(tl.float32)
            else:
                wv = _widen_to_float32(w, WIDEN)
            acc0 = _token_step(acc0, wv, _load_x(x_ptrs, x_mask), WIDEN)
            acc1 = _token_step(acc1, wv, _load_x(x_ptrs + stride_xm, x_mask), WIDEN)
            if M_TOK > 2:
                acc2 = _token_step(acc2, wv, _load_x(x_ptrs + 2 * stride_xm, x_mask), WIDEN)
            if M_TOK > 3:
                acc3 = _token_step(acc3, wv, _load_x(x_ptrs + 3 * stride_xm, x_mask), WIDEN)
        return acc0, acc1, acc2, acc3

    @triton.jit
    def _tile_or_zeros(w_ptrs, t, i, last, offs_k, BLOCK_K: tl.constexpr):
        """Weight tile t + i of a multi-tile step; past the split's end it is zeros, which add
        nothing (the mask is constant along each row's 16 bytes, so the loads stay 16 bytes wide)."""
        more = (t + i) * BLOCK_K + offs_k < last * BLOCK_K
        return tl.load(w_ptrs + i * BLOCK_K, mask=more[None, :], other=0, eviction_policy="evict_first")

    @triton.jit
    def _x_or_zeros(x_ptrs, t, i, last, offs_k, BLOCK_K: tl.constexpr):
        more = (t + i) * BLOCK_K + offs_k < last * BLOCK_K
        return tl.load(x_ptrs + i * BLOCK_K, mask=more, other=0.0)

    @triton.jit
    def _gemv_store(acc, token, OUT, S, rows, offs_n, pid_n, pid_k, N, stride_om, stride_split,
                    BLOCK_N: tl.constexpr, WIDEN: tl.constexpr, HAS_SCALE: tl.constexpr, GELU_MUL: tl.constexpr):
        """One token's row of the one-token kernel's output: the sums across K, scaled, and (GELU_MUL)
        gelu(gate) * up."""
        y = tl.sum(acc, axis=1)
        if WIDEN == 3:
            y = y * _HALF2_DOWN
        if HAS_SCALE:
            y = y * tl.load(S + rows)
        if GELU_MUL:
            gate, up = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
            offs_c = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            tl.store(OUT + token * stride_om + offs_c, gelu_tanh_mul(gate, up).to(OUT.dtype.element_ty),
                     mask=offs_c < N)
        else:
            tl.store(OUT + pid_k * stride_split + token * stride_om + offs_n, y.to(OUT.dtype.element_ty),
                     mask=offs_n < N)

    @triton.jit
    def _weight_only_gemv_kernel(X, W, S, OUT, N, K, stride_wn, stride_split, split_k, stride_xm, stride_om,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                                 WIDEN: tl.constexpr, HAS_SCALE: tl.constexpr = True, GELU_MUL: tl.constexpr = False,
                                 EARLY_W: tl.constexpr = False, M_TOK: tl.constexpr = 1,
                                 PREFETCH: tl.constexpr = 0, PDL: tl.constexpr = False):
        """One token: OUT[split][n] = scale[n] * sum over this split's K of x[k] * W[n, k], on the FMA
        units (a matrix unit would idle 15 of its 16 rows). Weights go straight from memory to
        registers; the products accumulate per lane and are summed across K once, at the end.
        Without HAS_SCALE the weights are 16-bit floats used as they are.
        GELU_MUL (split_k 1): W is a gate_up matrix [2N, K]; each program takes BLOCK_N / 2 gate rows
        and the up rows of the same channels, and stores gelu_tanh(gate) * up [N]: the gate_up
        output never goes to memory, and the GELU kernel is not launched.
        EARLY_W (EVEN_K, the split's K range not empty): the first weight tile is read before the
        PDL wait. M_TOK (1-4): tokens (rows of x, stride_xm apart; of OUT, stride_om apart), each
        weight tile read once for all of them. PREFETCH (2-5; EVEN_K, one token): the loop takes
        that many tiles a step and issues all their loads before summing any, for grids too small to
        keep enough loads in flight with one tile a program (`prefetch_applies`); 0 or 1: one tile."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        lane = tl.arange(0, BLOCK_N)
        if GELU_MUL:  # rows gate c, up c, gate c + 1, up c + 1, ...
            offs_n = pid_n * (BLOCK_N // 2) + lane // 2
            rows = (offs_n % N).to(tl.int64) + (lane % 2) * N
        else:
            offs_n = pid_n * BLOCK_N + lane
            rows = (offs_n % N).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        k_tiles = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(k_tiles, split_k)
        first = pid_k * per_split
        last = tl.minimum(first + per_split, k_tiles)
        w_ptrs = W + rows[:, None] * stride_wn + (first * BLOCK_K + offs_k)[None, :]
        x_ptrs = X + first * BLOCK_K + offs_k
        acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        start = first
        if EARLY_W:
            # No kernel writes the weights: the first tile is read before the wait, while the kernel
            # before this one (a norm, the attention's combine) still runs (pdl.py).
            w_first = tl.load(w_ptrs, eviction_policy="evict_first")
        pdl_wait(PDL)
        if EARLY_W:  # the loop's first step, on the tile already read: the same sums in the same order
            acc0, acc1, acc2, acc3 = _tokens_step(acc0, acc1, acc2, acc3, w_first, x_ptrs, stride_xm, None,
                                                  WIDEN, M_TOK)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
            start = first + 1
        if PREFETCH > 1:  # (EVEN_K, M_TOK 1) PREFETCH tiles' loads issued before any is summed
            for t in range(start, last, PREFETCH):
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                w2 = _tile_or_zeros(w_ptrs, t, 1, last, offs_k, BLOCK_K)
                if PREFETCH > 2:
                    w3 = _tile_or_zeros(w_ptrs, t, 2, last, offs_k, BLOCK_K)
                if PREFETCH > 3:
                    w4 = _tile_or_zeros(w_ptrs, t, 3, last, offs_k, BLOCK_K)
                if PREFETCH > 4:
                    w5 = _tile_or_zeros(w_ptrs, t, 4, last, offs_k, BLOCK_K)
                # In K order, as the one-tile loop: the same sums, to the bit.
                acc0 = _gemv_step(acc0, w, tl.load(x_ptrs), WIDEN)
                acc0 = _gemv_step(acc0, w2, _x_or_zeros(x_ptrs, t, 1, last, offs_k, BLOCK_K), WIDEN)
                if PREFETCH > 2:
                    acc0 = _gemv_step(acc0, w3, _x_or_zeros(x_ptrs, t, 2, last, offs_k, BLOCK_K), WIDEN)
                if PREFETCH > 3:
                    acc0 = _gemv_step(acc0, w4, _x_or_zeros(x_ptrs, t, 3, last, offs_k, BLOCK_K), WIDEN)
                if PREFETCH > 4:
                    acc0 = _gemv_step(acc0, w5, _x_or_zeros(x_ptrs, t, 4, last, offs_k, BLOCK_K), WIDEN)
                w_ptrs += PREFETCH * BLOCK_K
                x_ptrs += PREFETCH * BLOCK_K
            start = last
        for t in range(start, last):
            if EVEN_K:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                acc0, acc1, acc2, acc3 = _tokens_step(acc0, acc1, acc2, acc3, w, x_ptrs, stride_xm, None,
                                                      WIDEN, M_TOK)
            else:
                cols = t * BLOCK_K + offs_k
                w = tl.load(W + rows[:, None] * stride_wn + tl.minimum(cols, K - 1)[None, :],
                            eviction_policy="evict_first")
                acc0, acc1, acc2, acc3 = _tokens_step(acc0, acc1, acc2, acc3, w, X + cols, stride_xm, cols < K,
                                                      WIDEN, M_TOK)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        _gemv_store(acc0, 0, OUT, S, rows, offs_n, pid_n, pid_k, N, stride_om, stride_split, BLOCK_N, WIDEN,
                    HAS_SCALE, GELU_MUL)
        if M_TOK > 1:
            _gemv_store(acc1, 1, OUT, S, rows, offs_n, pid_n, pid_k, N, stride_om, stride_split, BLOCK_N, WIDEN,
                        HAS_SCALE, GELU_MUL)
        if M_TOK > 2:
            _gemv_store(acc2, 2, OUT, S, rows, offs_n, pid_n, pid_k, N, stride_om, stride_split, BLOCK_N, WIDEN,
                        HAS_SCALE, GELU_MUL)
        if M_TOK > 3:
            _gemv_store(acc3, 3, OUT, S, rows, offs_n, pid_n, pid_k, N, stride_om, stride_split, BLOCK_N, WIDEN,
                        HAS_SCALE, GELU_MUL)

    @triton.jit(do_not_specialize=["M"])
    def _weight_only_matmul_kernel(X, W, S, OUT, M, N, K, stride_xm, stride_wn, stride_om, stride_split, split_k,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                   EVEN_K: tl.constexpr, WIDEN: tl.constexpr, SWAP_AB: tl.constexpr,
                                   HAS_SCALE: tl.constexpr = True, PDL: tl.constexpr = False):
        """OUT[split][m, n] = scale[n] * sum over this split's K of X[m, k] * W[n, k] on the matrix
        units. With SWAP_AB the product is computed transposed, [BLOCK_N, BLOCK_M] = W tile @ X
        tile^T, so the weight fills the unit's row dimension even for a few tokens. Out-of-range rows
        and columns are read wrapped around (always in bounds, no load masks) and never stored.
        Without HAS_SCALE, W is a float matrix of X's dtype, multiplied as it is."""
        pdl_wait(PDL)
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        rows_w = (offs_n % N).to(tl.int64)
        rows_x = (offs_m % M).to(tl.int64)
        k_tiles = tl.cdiv(K, BLOCK_K)
        per_split = tl.cdiv(k_tiles, split_k)
        first = pid_k * per_split
        last = tl.minimum(first + per_split, k_tiles)
        k0 = first * BLOCK_K
        if SWAP_AB:
            w_ptrs = W + rows_w[:, None] * stride_wn + (k0 + offs_k)[None, :]  # [BLOCK_N, BLOCK_K]
            x_ptrs = X + rows_x[None, :] * stride_xm + (k0 + offs_k)[:, None]  # [BLOCK_K, BLOCK_M]
            acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            w_ptrs = W + rows_w[None, :] * stride_wn + (k0 + offs_k)[:, None]  # [BLOCK_K, BLOCK_N]
            x_ptrs = X + rows_x[:, None] * stride_xm + (k0 + offs_k)[None, :]  # [BLOCK_M, BLOCK_K]
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t in range(first, last):
            if EVEN_K:
                w = tl.load(w_ptrs)
                x = tl.load(x_ptrs)
            else:
                # Ragged last tile: the weight is read at clamped columns (finite values, also for
                # fp8, whose `other=` fill Triton cannot build) against zeroed activations.
                cols = tl.minimum(t * BLOCK_K + offs_k, K - 1)
                live = t * BLOCK_K + offs_k < K
                if SWAP_AB:
                    w = tl.load(W + rows_w[:, None] * stride_wn + cols[None, :])
                    x = tl.load(x_ptrs, mask=live[:, None], other=0.0)
                else:
                    w = tl.load(W + rows_w[None, :] * stride_wn + cols[:, None])
                    x = tl.load(x_ptrs, mask=live[None, :], other=0.0)
            if WIDEN == 0:
                w = w.to(X.dtype.element_ty)
            else:
                w = _widen_exact(w, WIDEN)
            if SWAP_AB:
                acc = tl.dot(w, x, acc=acc)
            else:
                acc = tl.dot(x, w, acc=acc)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        out = OUT + pid_k * stride_split
        if SWAP_AB:
            if HAS_SCALE:
                acc = acc * tl.load(S + rows_w)[:, None]
            tl.store(out + offs_m[None, :].to(tl.int64) * stride_om + offs_n[:, None], acc.to(OUT.dtype.element_ty),
                     mask=(offs_n[:, None] < N) & (offs_m[None, :] < M))
        else:
            if HAS_SCALE:
                acc = acc * tl.load(S + rows_w)[None, :]
            tl.store(out + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], acc.to(OUT.dtype.element_ty),
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))

    @triton.jit
    def _sum_splits_kernel(P, Y, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        """Y = sum over splits of P [SPLIT_K, numel] (float32), added in split order."""
        pdl_wait(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(P + s * numel + offs, mask=mask, other=0.0)
        tl.store(Y + offs, acc.to(Y.dtype.element_ty), mask=mask)


def prefetch_applies(programs: int, tokens: int, even_k: bool, widen: int, device_index: int) -> bool:
    """Whether the one-token kernel keeps several tiles' loads in flight per program
    (GEMV_PREFETCH, GEMV_PREFETCH_TILES of them):
    one token, whole K tiles, INT8 on half2, and fewer than 4 programs per SM, where one tile a
    program is too few bytes in flight to cover DRAM latency. On an H200 that is qkv (512 programs):
    4.3 against 5.1 us; the projections with more programs were slower with it (docs/benchmarks.md,
    seventh and eighth runs)."""
    return (GEMV_PREFETCH and tokens == 1 and even_k and widen == _WIDEN_INT8_HALF2
            and programs < GEMV_PREFETCH_PER_SM * _num_sms(device_index))


def _prefetch_tiles(prefetch: bool | int | None, programs: int, tokens: int, even_k: bool, widen: int,
                    device_index: int) -> int:
    """The one-token kernel's PREFETCH: weight tiles in flight per program (0: one)."""
    if prefetch is None:
        prefetch = prefetch_applies(programs, tokens, even_k, widen, device_index)
    if not prefetch or tokens != 1 or not even_k:
        return 0
    tiles = GEMV_PREFETCH_TILES if prefetch is True else int(prefetch)
    if not 2 <= tiles <= MAX_PREFETCH_TILES:
        raise ValueError(f"prefetch={prefetch}: 2 to {MAX_PREFETCH_TILES} tiles in flight")
    return tiles


def half2_applies(cfg: KernelConfig, qweight: torch.Tensor) -> bool:
    """Whether the half2 INT8 path can take this one-token tile. Its inline PTX sums 16 weights of
    a pack, so a pack must hold 16 consecutive weights of one row: Triton gives each thread one
    16-byte load of a row (16 INT8 weights) when the weight rows are 16-byte aligned and the tile
    has at least 16 weights per thread (it spreads a smaller tile thinner), and K is whole tiles.
    Other tiles take the exact float-add path; tests/gpu/test_quantization.py covers both sides."""
    k = qweight.shape[1]
    return (k % cfg.block_k == 0 and cfg.block_k % 16 == 0 and qweight.stride(0) % 16 == 0
            and qweight.data_ptr() % 16 == 0 and cfg.block_n * cfg.block_k >= 16 * 32 * cfg.num_warps)


def triton_weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor | None,
                              config: KernelConfig | None = None, int8_gemv_widen: int | None = None,
                              out_dtype: torch.dtype | None = None, gelu_mul: bool = False,
                              prefetch: bool | int | None = None) -> torch.Tensor:
    """The Triton path of `weight_only_linear` (x bf16/fp16, qweight int8 or fp8 e4m3 [N, K] with
    contiguous rows, scale float32 [N]). Static shapes for a given x: CUDA-graph capturable.
    scale None: qweight is a float matrix of x's dtype, multiplied as it is (16-bit on the one-token
    kernel; any on the matrix-unit kernel, which only `quant_bench --bf16-matrix` uses: on an H200 it
    is 0.60-0.85x cuBLAS at 128-256 rows).
    out_dtype: the output's (default x's; float32 keeps the accumulators unrounded).
    gelu_mul (one token): qweight is a gate_up matrix [2 * inter, K]; returns gelu_tanh(gate) * up
    [..., inter] (rounded once to out_dtype), as `fused_kernels.gelu_mul` of the product.
    int8_gemv_widen: how the one-token kernel widens INT8 weights (a `_WIDEN_INT8*`; benchmarks).
    prefetch: several weight tiles in flight per program (one token, whole K tiles): True for
    GEMV_PREFETCH_TILES, or how many (2-5); default `prefetch_applies`; tests force it."""
    k = x.shape[-1]
    n = qweight.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    n_out = n // 2 if gelu_mul else n
    y = torch.empty((m, n_out), dtype=out_dtype or x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n_out)
    if (CUDA_GEMV and m == 1 and (config is None or config.block_m == 1) and x.dtype == torch.bfloat16
            and ((qweight.dtype == torch.int8 and scale is not None) or (qweight.dtype == x.dtype and scale is None))
            and k % 16 == 0 and x.is_cuda):
        from gemma_serve.engine.cuda_gemv import default_gemv  # built with nvcc on first use

        default_gemv()(x2[0], qweight, scale, y.view(-1), gelu=gelu_mul)
        return y.reshape(*x.shape[:-1], n_out)
    cfg = config or kernel_config(m, n, k, _num_sms(x.device.index or 0), qweight.dtype)
    widen = _WIDEN_CONVERT
    if scale is None and (qweight.dtype != x.dtype or (cfg.block_m == 1 and qweight.element_size() != 2)):
        raise ValueError(f"a weight without scales must have x's dtype ({x.dtype}, got {qweight.dtype}), and be "
                         f"16-bit on the one-token kernel")
    if gelu_mul and (cfg.block_m != 1 or cfg.split_k != 1 or cfg.block_n % 2 or n % 2):
        raise ValueError(f"gelu_mul runs on the one-token kernel without K splits, on an even output width: {cfg}")
    if x.dtype == torch.bfloat16 and scale is not None:
        widen = _WIDEN_INT8 if qweight.dtype == torch.int8 else _WIDEN_FP8
    # Splits cover whole K tiles, so only a ragged last tile needs masks.
    even_k = k % cfg.block_k == 0
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
    out = y if cfg.split_k == 1 else torch.empty((cfg.split_k, m, n), dtype=torch.float32, device=x.device)
    if cfg.block_m == 1 and qweight.dtype == torch.int8 and widen == _WIDEN_INT8:
        widen = int8_gemv_widen if int8_gemv_widen is not None else INT8_GEMV_WIDEN
        if widen == _WIDEN_INT8_HALF2 and not half2_applies(cfg, qweight):
            widen = _WIDEN_INT8
    if cfg.block_m == 1:
        if m > FEW_TOKEN_MAX_ROWS:
            raise ValueError(f"the one-token kernel (block_m 1) takes at most {FEW_TOKEN_MAX_ROWS} rows, got {m}")
        _weight_only_gemv_kernel[(grid[0], grid[2])](x2, qweight, scale, out, n_out, k, qweight.stride(0), m * n,
                                                     cfg.split_k, x2.stride(0), n_out, M_TOK=m,
                                                     BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                                                     EVEN_K=even_k, WIDEN=widen, HAS_SCALE=scale is not None,
                                                     GELU_MUL=gelu_mul, num_warps=cfg.num_warps,
                                                     EARLY_W=(even_k and cfg.split_k == 1 and (
                                                         GEMV_EARLY_WEIGHTS == "all" or (GEMV_EARLY_WEIGHTS == "1" and (
                                                             scale is None or widen == _WIDEN_INT8_HALF2)))),
                                                     PREFETCH=_prefetch_tiles(prefetch, grid[0] * cfg.split_k, m,
                                                                              even_k, widen, x.device.index or 0),
                                                     num_stages=cfg.num_stages, **pdl_launch(x2))
    else:
        _weight_only_matmul_kernel[grid](x2, qweight, scale, out, m, n, k, x2.stride(0), qweight.stride(0), n,
                                         m * n, cfg.split_k, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                         BLOCK_K=cfg.block_k, EVEN_K=even_k, WIDEN=widen, SWAP_AB=cfg.swap_ab,
                                         HAS_SCALE=scale is not None, num_warps=cfg.num_warps,
                                         num_stages=cfg.num_stages, **pdl_launch(x2))
    if cfg.split_k > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](out, y, m * n, SPLIT_K=cfg.split_k, BLOCK=block,
                                                          num_warps=4, **pdl_launch(x2))
    return y.reshape(*x.shape[:-1], n_out)
