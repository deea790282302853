"""The one-token INT8 GEMV on bulk-copy rings (engine/csrc/one_token_gemv.cu) against the engine's
Triton one-token kernel: results against a float32 product, then the 34 layers' four projections
of Gemma 3 4B back to back in one CUDA graph (the shape of a W1 step without its short kernels), and
each projection alone, for a few ring shapes, with and without PDL.

    PYTHONPATH=packages python3 bench/tma_gemv_probe.py --out tma-gemv.json

Needs a CUDA GPU and nvcc. For scale (docs/benchmarks.md, thirteenth run): the Triton kernel's 34
layers took 0.998 ms at one token; INT8 W1 at 1.6x bf16 needs ~0.13 ms less per step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gemma_serve.bench import quant_bench
from gemma_serve.engine import quantization as quant
from gemma_serve.engine.cuda_gemv import OneTokenGemvInt8

# (nwarps, nslots, chunk bytes, blocks per SM, PDL)
VARIANTS = [(8, 2, 4096, 2, True), (8, 2, 4096, 2, False), (8, 2, 2048, 2, True), (4, 4, 4096, 2, True),
            (16, 2, 4096, 1, True), (8, 3, 4096, 1, True)]


def check(gemv: OneTokenGemvInt8, shapes: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Relative max error of each shape's product against float32 (the order of the sums differs)."""
    errs = {}
    gen = torch.Generator(device="cuda").manual_seed(1)
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
        q, s = quant.quantize_weight(w, "int8")
        x = torch.randn(k, device="cuda", generator=gen).bfloat16()
        ref = (q.float() * s[:, None]) @ x.float()
        out = torch.empty(n, device="cuda")
        gemv(x, q, s, out)
        torch.cuda.synchronize()
        errs[name] = ((out - ref).abs().max() / ref.abs().max()).item()
    return errs


def chain(gemv: OneTokenGemvInt8, weights: list[dict], xs: dict[int, torch.Tensor], outs: dict[int, torch.Tensor]):
    def run() -> None:
        for layer in weights:
            for q, s in layer.values():
                gemv(xs[q.shape[1]], q, s, outs[q.shape[0]])
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=34)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    shapes = quant_bench.SHAPES
    copy = quant_bench.copy_rate_gbps()
    result: dict = dict(device=torch.cuda.get_device_name(), copy_gbps=copy, variants=[])

    errs = check(OneTokenGemvInt8(), shapes)
    print("rel max err vs float32: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    result["errors"] = errs
    ok = all(v < 1e-3 for v in errs.values())

    weights = quant_bench.make_weights("int8", shapes, args.layers)
    xs_2d = quant_bench.inputs(1)
    xs = {k: v[0].contiguous() for k, v in xs_2d.items()}
    outs = {n: torch.empty(n, device="cuda") for n, _ in shapes.values()}
    # Triton's output for the same inputs, as a cross-check of the two kernels.
    q, s = weights[0]["qkv"]
    triton_y = quant.triton_weight_only_linear(xs_2d[q.shape[1]], q, s, out_dtype=torch.float32)[0]
    mine = OneTokenGemvInt8()(xs[q.shape[1]], q, s, torch.empty(q.shape[0], device="cuda"))
    result["vs_triton_rel_err"] = ((mine - triton_y).abs().max() / triton_y.abs().max()).item()
    print(f"qkv against the Triton kernel: rel max err {result['vs_triton_rel_err']:.1e}")

    def bytes_of(ws: list[dict]) -> int:
        return quant_bench.weight_bytes(ws)

    triton_ms = quant_bench.graph_ms(quant_bench.step_fn(weights, xs_2d))
    bound_ms = bytes_of(weights) / (copy * 1e9) * 1e3
    per_proj_triton = {}
    for name in shapes:
        only = [{name: layer[name]} for layer in weights]
        per_proj_triton[name] = quant_bench.graph_ms(quant_bench.step_fn(only, xs_2d)) * 1e3 / args.layers
    result.update(triton_ms=triton_ms, bound_ms=bound_ms, triton_us=per_proj_triton)
    print(f"{args.layers} layers, 4 projections: copy bound {bound_ms:.3f} ms; Triton one-token {triton_ms:.3f} ms "
          f"({100 * bound_ms / triton_ms:.1f}%)")
    print("per projection, us a layer, Triton: " + ", ".join(f"{k} {v:.2f}" for k, v in per_proj_triton.items()))
    print("variant (warps, slots, chunk, blocks/SM, PDL) | all ms | % of copy | " + " | ".join(shapes))
    for nwarps, nslots, chunk, per_sm, pdl in VARIANTS:
        gemv = OneTokenGemvInt8(nwarps, nslots, chunk, per_sm, pdl)
        ms = quant_bench.graph_ms(chain(gemv, weights, xs, outs))
        per = {}
        for name in shapes:
            only = [{name: layer[name]} for layer in weights]
            per[name] = quant_bench.graph_ms(chain(gemv, only, xs, outs)) * 1e3 / args.layers
        row = dict(nwarps=nwarps, nslots=nslots, chunk=chunk, blocks_per_sm=per_sm, pdl=pdl, ms=ms,
                   pct_copy=100 * bound_ms / ms, us=per)
        result["variants"].append(row)
        print(f"({nwarps}, {nslots}, {chunk}, {per_sm}, {pdl}) | {ms:.3f} | {row['pct_copy']:.1f}% | "
              + " | ".join(f"{v:.2f}" for v in per.values()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
