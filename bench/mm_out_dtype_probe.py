"""cuBLAS bf16 matmuls with bf16 against float32 outputs (`torch.mm(..., out_dtype=torch.float32)`) on
Gemma 3 4B's projection shapes, in CUDA graphs: time and error against float32.

    PYTHONPATH=packages python3 bench/mm_out_dtype_probe.py [--full]
"""
import sys
import time

import torch

print(torch.__version__, torch.cuda.get_device_name())
dev = "cuda"
SHAPES = [(1, 262144, 2560), (1, 20480, 2560), (5, 4096, 2560), (256, 20480, 2560), (8192, 20480, 2560),
          (8192, 2560, 10240)]
if "--full" in sys.argv:  # every projection at prefill and decode sizes
    SHAPES = [(m, n, k) for m in (8192, 2048, 256, 64) for n, k in ((4096, 2560), (2560, 2048), (20480, 2560),
                                                                    (2560, 10240))]
for m, n, k in SHAPES:
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    try:
        y32 = torch.mm(x, w.t(), out_dtype=torch.float32)
    except Exception as e:
        print("mm out_dtype failed", type(e).__name__, e); break
    ref = x.float() @ w.float().t()
    yb = torch.mm(x, w.t())
    err32 = ((y32 - ref).norm() / ref.norm()).item(); errb = ((yb.float() - ref).norm() / ref.norm()).item()
    def t(f, reps=20):
        f(); torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(reps): f()
        g.replay(); torch.cuda.synchronize()
        s = time.perf_counter(); g.replay(); torch.cuda.synchronize(); return (time.perf_counter() - s) / reps * 1e6
    tb = t(lambda: torch.mm(x, w.t())); t32 = t(lambda: torch.mm(x, w.t(), out_dtype=torch.float32))
    print(f"m={m} n={n} k={k}: bf16-out {tb:.1f} us, fp32-out {t32:.1f} us; err bf16 {errb:.2e} fp32 {err32:.2e}; y32 dtype {y32.dtype}")
