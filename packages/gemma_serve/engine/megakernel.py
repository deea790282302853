"""The batch-1 decode step as one persistent CUDA kernel (`csrc/decode_megakernel.cu`), experimental.

The library is compiled with `nvcc` on first use (`cuda_build.py`) and called through ctypes with raw
device pointers. `DecodeMegakernel` holds one model's per-layer pointer table and the
step's scratch buffers; `step` runs all layers for one token of one sequence and returns the
residual stream after the last layer (the final norm and the LM head stay outside).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from gemma_serve.engine.cuda_build import CSRC, build_shared_library

SOURCE = CSRC / "decode_megakernel.cu"
HEAD_DIM = 256


# `struct LayerWeights` of the .cu file, field by field: (C name, LayerTensors attribute). Every
# field is 8 bytes, so the table is an int64 tensor [layers, 15].
LAYER_FIELDS = (("qkv", "qkv"), ("o", "o"), ("gate_up", "gate_up"), ("down", "down"), ("in_ln", "input_norm"),
                ("post_attn", "post_attn_norm"), ("pre_ffn", "pre_ffn_norm"), ("post_ffn", "post_ffn_norm"),
                ("q_norm", "q_norm"), ("k_norm", "k_norm"), ("k_cache", "k_cache"), ("v_cache", "v_cache"),
                ("cos", "cos"), ("sin", "sin"), ("window", "window"))


class _Params(ctypes.Structure):
    """Mirrors `struct Params` in the .cu file, field for field."""

    _fields_ = [(name, ctypes.c_void_p) for name in (
        "layers", "block_table", "ctx", "hidden_in", "hidden_out", "h1", "h2", "qkv_out", "part",
        "attn_out", "o_out", "act", "down_out", "barrier", "trace")] + [
        (name, ctypes.c_longlong) for name in ("n_layers", "H", "I", "NQ", "NKV", "block_size", "splits")] + [
        (name, ctypes.c_float) for name in ("eps", "scale", "softcap", "pad")]


def build_library(defines: dict[str, int] | None = None) -> Path:
    """The kernel's library for `defines`: the .cu file's compile-time switches (NSLOT, CH_BYTES,
    BARRIER_THREAD, PF_AHEAD, BARRIER_PF, and the timing experiments NO_GRID_BARRIER, SKIP_ATTENTION,
    STREAM_ONLY)."""
    return build_shared_library(SOURCE, defines)


@dataclass
class LayerTensors:
    """One layer's weights (bf16, [out, in] as nn.Linear) and cache, as the kernel reads them."""

    qkv: torch.Tensor
    o: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    input_norm: torch.Tensor  # float32 [H]
    post_attn_norm: torch.Tensor
    pre_ffn_norm: torch.Tensor
    post_ffn_norm: torch.Tensor
    q_norm: torch.Tensor  # float32 [D]
    k_norm: torch.Tensor
    k_cache: torch.Tensor  # bf16 [blocks, block_size, kv_heads, D]
    v_cache: torch.Tensor
    cos: torch.Tensor  # float32 [max_positions, D]
    sin: torch.Tensor
    window: int  # 0: global attention


class DecodeMegakernel:
    """All layers of one batch-1 decode step in one launch. Gemma 3 shapes: head_dim 256, two q heads
    per kv head, hidden and intermediate sizes multiples of 256."""

    def __init__(self, layers: list[LayerTensors], num_heads: int, num_kv_heads: int, eps: float, scale: float,
                 softcap: float | None, block_size: int, defines: dict[str, int] | None = None,
                 trace: bool = False) -> None:
        first = layers[0]
        device = first.qkv.device
        self.hidden = first.qkv.shape[1]
        self.inter = first.down.shape[1]
        if num_heads != 2 * num_kv_heads or first.qkv.shape[0] != (num_heads + 2 * num_kv_heads) * HEAD_DIM:
            raise ValueError("the kernel takes head_dim 256 and two q heads per kv head")
        if self.hidden % 256 or self.inter % 256:
            raise ValueError("hidden and intermediate sizes must be multiples of 256")
        # The .cu file's register-held vectors: H in MAXV (2) float4s a thread, I in 4 uint4s.
        if self.hidden > 4096 or self.inter > 16384:
            raise ValueError(f"hidden {self.hidden} > 4096 or intermediate {self.inter} > 16384: not built for it")
        self.lib = ctypes.CDLL(str(build_library(defines)))
        self.lib.gemma_decode_smem_bytes.restype = ctypes.c_size_t
        self.lib.gemma_decode_smem_bytes.argtypes = [ctypes.c_longlong, ctypes.c_longlong]
        smem = self.lib.gemma_decode_smem_bytes(self.hidden, self.inter)
        optin = getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", smem)
        if smem > optin:
            raise ValueError(f"the kernel needs {smem} bytes of shared memory a block, the GPU allows {optin}")
        self.lib.gemma_decode_launch.restype = ctypes.c_int
        self.lib.gemma_decode_launch.argtypes = [ctypes.POINTER(_Params), ctypes.c_int, ctypes.c_void_p]
        self._layers = layers  # keeps the tensors alive
        rows = []
        for t in layers:
            for w in (t.qkv, t.o, t.gate_up, t.down):
                if w.dtype != torch.bfloat16 or not w.is_contiguous():
                    raise ValueError("weights must be contiguous bf16")
            values = [getattr(t, attr) for _, attr in LAYER_FIELDS]
            rows.append([v.data_ptr() if isinstance(v, torch.Tensor) else int(v) for v in values])
        self.table = torch.tensor(rows, dtype=torch.int64, device=device)
        props = torch.cuda.get_device_properties(device)
        self.blocks = props.multi_processor_count
        self.splits = self.blocks // num_kv_heads
        f32 = dict(dtype=torch.float32, device=device)
        h = self.hidden
        self.h1, self.h2, self.o_out, self.down_out, self.hidden_out = (torch.zeros(h, **f32) for _ in range(5))
        self.qkv_out = torch.zeros(first.qkv.shape[0], **f32)
        self.part = torch.zeros(num_kv_heads * self.splits * 2 * (HEAD_DIM + 4), **f32)  # PART_STRIDE
        self.attn_out = torch.zeros(num_heads * HEAD_DIM, dtype=torch.bfloat16, device=device)
        self.act = torch.zeros(self.inter, dtype=torch.bfloat16, device=device)
        self.barrier = torch.zeros(1, dtype=torch.int32, device=device)
        # clock64 at every grid barrier's arrival and exit, of block 0 (row 0) and the last block (row 1)
        self.trace = torch.zeros(2, 4096, dtype=torch.int64, device=device) if trace else None
        self.params = _Params(
            layers=self.table.data_ptr(), hidden_out=self.hidden_out.data_ptr(), h1=self.h1.data_ptr(),
            h2=self.h2.data_ptr(), qkv_out=self.qkv_out.data_ptr(), part=self.part.data_ptr(),
            attn_out=self.attn_out.data_ptr(), o_out=self.o_out.data_ptr(), act=self.act.data_ptr(),
            down_out=self.down_out.data_ptr(), barrier=self.barrier.data_ptr(),
            trace=self.trace.data_ptr() if trace else None, n_layers=len(layers), H=h,
            I=self.inter, NQ=num_heads, NKV=num_kv_heads, block_size=block_size, splits=self.splits, eps=eps,
            scale=scale, softcap=softcap or 0.0)

    def step(self, hidden_in: torch.Tensor, ctx: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """hidden_in: float32 [H] (the new token's scaled embedding); ctx: int32 [1], keys including the
        new token's (its position is ctx - 1); block_table: int32 [blocks] of the sequence. Writes the
        token's keys and values to the caches and returns the residual stream after the last layer."""
        self.params.hidden_in = hidden_in.data_ptr()
        self.params.ctx = ctx.data_ptr()
        self.params.block_table = block_table.data_ptr()
        self.barrier.zero_()
        stream = torch.cuda.current_stream(hidden_in.device).cuda_stream
        err = self.lib.gemma_decode_launch(ctypes.byref(self.params), self.blocks, stream)
        if err != 0:
            raise RuntimeError(f"decode megakernel launch failed: cudaError {err}")
        return self.hidden_out
