"""The one-token INT8 GEMV on bulk-copy rings (`csrc/one_token_gemv.cu`), experimental: measured
against the engine's Triton one-token kernel by `bench/tma_gemv_probe.py`; the engine's one-token
INT8 projections take it with GEMMA_CUDA_GEMV=1 (`quantization.triton_weight_only_linear`)."""

from __future__ import annotations

import ctypes
import functools

import torch

from gemma_serve.engine.cuda_build import CSRC, build_shared_library

SOURCE = CSRC / "one_token_gemv.cu"


@functools.lru_cache(maxsize=None)
def _library(nwarps: int, nslots: int, chunk_bytes: int) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build_shared_library(SOURCE, dict(NWARPS=nwarps, NSLOT=nslots, CH_BYTES=chunk_bytes))))
    lib.one_token_gemv_int8_launch.restype = ctypes.c_int
    lib.one_token_gemv_int8_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                               ctypes.c_int, ctypes.c_void_p]
    return lib


class OneTokenGemvInt8:
    """y [N] float32 = (qweight [N, K] int8 * scale [N]) @ x [K] bf16, one token, `blocks_per_sm`
    blocks of `nwarps` warps on each multiprocessor, each warp streaming its rows through `nslots`
    shared-memory slots of `chunk_bytes`."""

    def __init__(self, nwarps: int = 8, nslots: int = 2, chunk_bytes: int = 4096, blocks_per_sm: int = 2,
                 pdl: bool = True) -> None:
        self.lib = _library(nwarps, nslots, chunk_bytes)
        self.blocks_per_sm, self.pdl = blocks_per_sm, pdl

    def __call__(self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor,
                 gelu: bool = False) -> torch.Tensor:
        """out [n_out] (float32 or bf16) = the product; gelu: qweight is a gate_up matrix [2 n_out, K]
        and out = gelu_tanh(gate) * up."""
        n, k = qweight.shape
        n_out = n // 2 if gelu else n
        if qweight.dtype != torch.int8 or x.dtype != torch.bfloat16 or scale.dtype != torch.float32:
            raise ValueError("takes int8 weights, float32 scales and a bf16 input")
        if out.dtype not in (torch.float32, torch.bfloat16) or not out.is_contiguous():
            raise ValueError(f"the output must be contiguous float32 or bf16, got {out.dtype}")
        if (k % 16 or x.numel() != k or out.numel() != n_out or (gelu and n % 2)
                or not (qweight.is_contiguous() and x.is_contiguous())):
            raise ValueError(f"shapes: weight {tuple(qweight.shape)}, x {tuple(x.shape)}, out {tuple(out.shape)}")
        blocks = self.blocks_per_sm * _sm_count(x.device.index or 0)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        err = self.lib.one_token_gemv_int8_launch(qweight.data_ptr(), scale.data_ptr(), x.data_ptr(), out.data_ptr(),
                                                  n_out, k, int(gelu), int(out.dtype == torch.bfloat16), blocks,
                                                  int(self.pdl), stream)
        if err != 0:
            raise RuntimeError(f"one_token_gemv_int8 launch failed: cudaError {err}")
        return out


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def default_gemv() -> OneTokenGemvInt8:
    """The engine's instance (GEMMA_CUDA_GEMV=1): the probe's first variant."""
    return OneTokenGemvInt8()
