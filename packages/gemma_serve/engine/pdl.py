"""Programmatic dependent launch (PDL) of the engine's Triton kernels, on Hopper and newer GPUs.

A decode step at batch 1 is ~170 kernels in a row, most of them a few microseconds long, and
between two of them the GPU drains one grid before it ramps up the next. Launched with PDL, a
kernel's programs are scheduled while the previous kernel's last programs still run; they wait on
the device (`griddepcontrol.wait`) until that kernel has finished and its writes are visible, and
then let the kernel after them be scheduled the same way. Kernels not launched this way (cuBLAS,
PyTorch's own) keep the plain stream order. GEMMA_PDL=0 turns it off, for comparison.

What a kernel may touch before its wait: nothing it writes, and only what the kernel directly
before it does not write. Because every kernel lets its successor be scheduled only after its own
wait, all kernels before the previous one have finished by the time a kernel starts; so weights,
and tensors made before the step's previous kernel (RoPE tables, slot mappings, block tables), may
be read early. The norms read their weights, `qkv_to_cache` its tables and slots, the decode
attention its context lengths, and the one-token GEMV its first tile of 16-bit weights that way
(W1 +2.8% on an H200; for 8-bit weights the loop with its first step taken out compiled slower,
and asking L2 for weights before the wait was slower too: docs/benchmarks.md, fifth run).

A kernel lets the next one be scheduled after its wait, not before: scheduled before, a projection's
programs and their first weight tile sit beside the kernel two before them, which measured 1.5-2%
slower on W1 (docs/benchmarks.md, fifteenth run).

A kernel cannot usefully hand work to its own last program instead of to the next kernel: counting
programs with a GPU-scope atomic (a release fence each) and running the next kernel's work on one
program after the grid measured slower than the next kernel launched this way (docs/benchmarks.md,
sixth run).
"""

from __future__ import annotations

import functools
import os

import torch

try:  # CUDA builds of PyTorch ship Triton; CPU-only installs use the PyTorch paths alone.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Off in Triton's interpreter (CPU checks), which has no grid dependency control.
PDL = os.environ.get("GEMMA_PDL", "1") == "1" and os.environ.get("TRITON_INTERPRET") != "1"


@functools.lru_cache(maxsize=None)
def _supported(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def pdl_launch(t: torch.Tensor) -> dict:
    """Keyword arguments for launching one of the engine's kernels on `t`'s device: the kernel's
    PDL switch and Triton's launch flag, when the device has PDL; none otherwise."""
    if PDL and triton is not None and t.is_cuda and _supported(t.device.index or 0):
        return {"PDL": True, "launch_pdl": True}
    return {}


if triton is not None:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Wait for the kernel before it (PDL launches only), then let the kernel after it be
        scheduled. Before it: at most reads of what the previous kernel does not write."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()

