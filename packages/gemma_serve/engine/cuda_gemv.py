"""The one-token GEMV on bulk-copy rings (`csrc/one_token_gemv.cu`), experimental: INT8 weights with
float32 row scales, or bf16 weights, against a bf16 token. Measured against the engine's Triton
one-token kernel by `bench/tma_gemv_probe.py`, and slower on every shape and ring tried (seventeenth
run, H200, docs/benchmarks.md): Gemma 3 4B's 34 layers of projections take 1.26 ms (INT8, float16
pairs) and 1.76 ms (bf16) against Triton's 1.00 and 1.61; W1 INT8 502 against 616 tok/s. Even with
no products at all, its weight stream alone takes 0.95 ms. The engine's one-token projections take
it only with GEMMA_CUDA_GEMV=1 (`quantization.triton_weight_only_linear`), in the ring shape
GEMMA_CUDA_GEMV_SHAPE="warps,slots,chunk bytes,blocks per SM" (default 8,2,5120,2, the fastest),
INT8 products as GEMMA_CUDA_GEMV_MATH says (`MATHS`, default half2, as the Triton path)."""

from __future__ import annotations

import ctypes
import functools
import os

import torch

from gemma_serve.engine.cuda_build import CSRC, build_shared_library

SOURCE = CSRC / "one_token_gemv.cu"
# A block's shared memory: its rings, their barriers and x (2 K bytes), within the 227 KB a block may have.
MAX_SHARED_BYTES = 227 * 1024
# How INT8 products are computed: float32 (exact), float16 pairs as the engine's Triton half2 path
# (x in float16, ~5e-4 relative error), or not at all (the weight stream alone, for timing; wrong results).
MATHS = {"exact": 0, "half2": 1, "none": 2}


@functools.lru_cache(maxsize=None)
def _library(nwarps: int, nslots: int, chunk_bytes: int, math: int) -> ctypes.CDLL:
    defines = dict(NWARPS=nwarps, NSLOT=nslots, CH_BYTES=chunk_bytes, MATH=math)
    lib = ctypes.CDLL(str(build_shared_library(SOURCE, defines)))
    lib.one_token_gemv_launch.restype = ctypes.c_int
    lib.one_token_gemv_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                          ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return lib


class OneTokenGemv:
    """y [N] = (weight [N, K] (* scale [N] for INT8)) @ x [K] bf16, one token: `blocks_per_sm` blocks
    of `nwarps` warps on each multiprocessor, each warp streaming its rows through `nslots`
    shared-memory slots of `chunk_bytes` (as many whole rows as fit, or parts of one); INT8
    products as `math` says (a `MATHS` key)."""

    def __init__(self, nwarps: int = 8, nslots: int = 2, chunk_bytes: int = 5120, blocks_per_sm: int = 2,
                 pdl: bool = True, math: str = "exact") -> None:
        if chunk_bytes % 16 or not (1 <= nwarps <= 32 and nslots >= 1 and blocks_per_sm >= 1):
            raise ValueError(f"ring shape: {nwarps} warps, {nslots} slots of {chunk_bytes} bytes (a multiple of 16)")
        if math not in MATHS:
            raise ValueError(f"math={math!r}: one of {sorted(MATHS)}")
        self.nwarps, self.nslots, self.chunk_bytes, self.math = nwarps, nslots, chunk_bytes, math
        self.lib = _library(nwarps, nslots, chunk_bytes, MATHS[math])
        self.blocks_per_sm, self.pdl = blocks_per_sm, pdl

    def shared_bytes(self, k: int) -> int:
        return self.nwarps * self.nslots * (self.chunk_bytes + 8) + 2 * k

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, out: torch.Tensor,
                 gelu: bool = False) -> torch.Tensor:
        """out [n_out] (float32 or bf16) = the product; gelu: weight is a gate_up matrix [2 n_out, K]
        and out = gelu_tanh(gate) * up. INT8 weights take float32 scales, bf16 weights none."""
        n, k = weight.shape
        n_out = n // 2 if gelu else n
        int8 = weight.dtype == torch.int8
        if x.dtype != torch.bfloat16 or not ((int8 and scale is not None and scale.dtype == torch.float32)
                                             or (weight.dtype == torch.bfloat16 and scale is None)):
            raise ValueError(f"takes int8 weights with float32 scales or bf16 weights without, and a bf16 input; "
                             f"got {weight.dtype}, {None if scale is None else scale.dtype}, x {x.dtype}")
        if out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous():
            raise ValueError(f"the output must be contiguous float32 or bf16, got {out.dtype}")
        if (k % 16 or x.numel() != k or out.numel() != n_out or (gelu and n % 2)
                or not (weight.is_contiguous() and x.is_contiguous())):
            raise ValueError(f"shapes: weight {tuple(weight.shape)}, x {tuple(x.shape)}, out {tuple(out.shape)}")
        if self.shared_bytes(k) > MAX_SHARED_BYTES:
            raise ValueError(f"K={k}: {self.shared_bytes(k)} bytes of shared memory a block, more than {MAX_SHARED_BYTES}")
        blocks = self.blocks_per_sm * _sm_count(x.device.index or 0)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        err = self.lib.one_token_gemv_launch(weight.data_ptr(), 0 if scale is None else scale.data_ptr(),
                                             x.data_ptr(), out.data_ptr(), n_out, k, int(gelu), int(not int8),
                                             int(out.dtype == torch.bfloat16), blocks, int(self.pdl), stream)
        if err != 0:
            raise RuntimeError(f"one_token_gemv launch failed: cudaError {err}")
        return out


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def parse_shape(text: str) -> tuple[int, int, int, int]:
    """"warps,slots,chunk bytes,blocks per SM" -> a tuple of four ints."""
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 4:
        raise ValueError(f"GEMMA_CUDA_GEMV_SHAPE={text!r}: four integers, warps,slots,chunk bytes,blocks per SM")
    return tuple(parts)  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def default_gemv() -> OneTokenGemv:
    """The engine's instance (GEMMA_CUDA_GEMV=1): GEMMA_CUDA_GEMV_SHAPE's ring shape, GEMMA_CUDA_GEMV_MATH."""
    return OneTokenGemv(*parse_shape(os.environ.get("GEMMA_CUDA_GEMV_SHAPE", "8,2,5120,2")),
                        math=os.environ.get("GEMMA_CUDA_GEMV_MATH", "half2"))
