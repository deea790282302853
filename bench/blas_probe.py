"""The engine's bf16 projections (torch.mm with float32 outputs, as `quantization.linear` calls it)
in Gemma 3 4B's shapes, timed per row count under whatever cuBLAS settings the environment sets (GPU).

cuBLAS(Lt) picks a kernel per shape from its heuristics; at 256 rows (a full decode batch) qkv and
o ran at 22-47% of the matmul rate in the tenth H200 run. Run it once per setting, e.g.

    PYTHONPATH=packages python3 bench/blas_probe.py --label default
    CUBLASLT_WORKSPACE_SIZE=65536 PYTHONPATH=packages python3 bench/blas_probe.py --label ws64m
    TORCH_BLAS_PREFER_CUBLASLT=1 PYTHONPATH=packages python3 bench/blas_probe.py --label lt

Each figure is one call's GPU time, from a CUDA graph of 50 back-to-back calls (no launch gaps).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

SHAPES = {"qkv": (4096, 2560), "o": (2560, 2048), "gate_up": (20480, 2560), "down": (2560, 10240)}


def graph_us(fn, calls: int = 50, repeats: int = 5) -> float:
    """Median over `repeats` replays of a graph holding `calls` calls of fn, per call."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="default")
    parser.add_argument("--rows", default="1,256,8192")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    table = {}
    total = {m: 0.0 for m in rows_list}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for m in rows_list:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            us = graph_us(lambda: torch.mm(x, w.t(), out_dtype=torch.float32))
            tflops = 2 * m * n * k / us / 1e6
            table[f"{name}@{m}"] = {"us": us, "tflops": tflops}
            total[m] += us
            print(f"{args.label:10s} {name:8s} m={m:5d}: {us:8.1f} us  {tflops:6.0f} TFLOP/s", flush=True)
    for m, us in total.items():
        print(f"{args.label:10s} layer    m={m:5d}: {us:8.1f} us (the four projections)", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"label": args.label, "table": table, "layer_us": total}, indent=1))


if __name__ == "__main__":
    main()
