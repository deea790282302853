"""The one-token INT8 GEMV on bulk-copy rings (`csrc/one_token_gemv.cu`), experimental: measured
against the engine's Triton one-token kernel by `bench/tma_gemv_probe.py`, not on the engine's path."""

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
                                               ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return lib


class OneTokenGemvInt8:
    """y [N] float32 = (qweight [N, K] int8 * scale [N]) @ x [K] bf16, one token, `blocks_per_sm`
    blocks of `nwarps` warps on each multiprocessor, each warp streaming its rows through `nslots`
    shared-memory slots of `chunk_bytes`."""

    def __init__(self, nwarps: int = 8, nslots: int = 2, chunk_bytes: int = 4096, blocks_per_sm: int = 2,
                 pdl: bool = True) -> None:
        self.lib = _library(nwarps, nslots, chunk_bytes)
        self.blocks_per_sm, self.pdl = blocks_per_sm, pdl

    def __call__(self, x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        n, k = qweight.shape
        if qweight.dtype != torch.int8 or x.dtype != torch.bfloat16 or scale.dtype != torch.float32:
            raise ValueError("takes int8 weights, float32 scales and a bf16 input")
        if k % 16 or x.numel() != k or out.numel() != n or not (qweight.is_contiguous() and x.is_contiguous()):
            raise ValueError(f"shapes: weight {tuple(qweight.shape)}, x {tuple(x.shape)}, out {tuple(out.shape)}")
        device = x.device.index or 0
        blocks = self.blocks_per_sm * torch.cuda.get_device_properties(device).multi_processor_count
        stream = torch.cuda.current_stream(x.device).cuda_stream
        err = self.lib.one_token_gemv_int8_launch(qweight.data_ptr(), scale.data_ptr(), x.data_ptr(), out.data_ptr(),
                                                  n, k, blocks, int(self.pdl), stream)
        if err != 0:
            raise RuntimeError(f"one_token_gemv_int8 launch failed: cudaError {err}")
        return out
