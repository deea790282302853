"""The one-token GEMV on bulk-copy rings (engine/csrc/one_token_gemv.cu) against the engine's Triton
one-token kernel, INT8 and bf16 weights: results against a float32 product, then the 34 layers'
four projections of Gemma 3 4B back to back in one CUDA graph (the shape of a W1 step without its
short kernels), and each projection alone, for several ring shapes, with and without PDL.

    PYTHONPATH=packages python3 bench/tma_gemv_probe.py --out tma-gemv.json

Prints, last, one line a weight type: "best int8 16,2,5120,1 exact" (the GEMMA_CUDA_GEMV_SHAPE and
GEMMA_CUDA_GEMV_MATH of the fastest ring shape with PDL). `--maths exact,half2,none` times the INT8
products three ways ("none": the weight stream alone). Needs a CUDA GPU and nvcc. For scale (docs/benchmarks.md): the Triton
kernel's 34 layers took 1.00 ms (INT8) at one token; INT8 W1 at 1.6x bf16 needs ~0.13 ms less per step.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gemma_serve.bench import quant_bench
from gemma_serve.engine import quantization as quant
from gemma_serve.engine.cuda_gemv import MATHS, MAX_SHARED_BYTES, OneTokenGemv

# (warps, slots, chunk bytes, blocks per SM, PDL). With INT8 K = 2560, a 4096-byte chunk holds one
# row (the first version's best, at 57% of the copy rate), 5120 and 6144 two, 8192 three, 12288 four.
VARIANTS = [(16, 2, 4096, 1, True), (16, 2, 5120, 1, True), (16, 2, 5120, 1, False), (16, 2, 6144, 1, True),
            (16, 3, 4096, 1, True), (12, 2, 8192, 1, True), (8, 2, 12288, 1, True), (8, 2, 5120, 2, True)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def weight_of(w) -> tuple[torch.Tensor, torch.Tensor | None]:
    return w if isinstance(w, tuple) else (w, None)


def chain(gemv: OneTokenGemv, weights: list[dict], xs: dict[int, torch.Tensor], outs: dict[int, torch.Tensor]):
    def run() -> None:
        for layer in weights:
            for w in layer.values():
                q, s = weight_of(w)
                gemv(xs[q.shape[1]], q, s, outs[q.shape[0]])
    return run


def probe(method: str, layers: int, copy: float, variants: list[tuple], maths: list[str]) -> dict:
    """Errors and timings of one weight type ("int8" or "bf16"), INT8 products each way in `maths`."""
    shapes = quant_bench.SHAPES
    weights = quant_bench.make_weights(method, shapes, layers)
    xs_2d = quant_bench.inputs(1)
    xs = {k: v[0].contiguous() for k, v in xs_2d.items()}
    outs = {n: torch.empty(n, device="cuda") for n, _ in shapes.values()}
    res: dict = dict(method=method, variants=[])

    errs, vs_triton = {}, {}
    for name, w in weights[0].items():
        q, s = weight_of(w)
        ref = (q.float() * s[:, None] if s is not None else q.float()) @ xs[q.shape[1]].float()
        cfg = None if s is not None else quant.one_token_config(*q.shape)
        tri = quant.triton_weight_only_linear(xs_2d[q.shape[1]], q, s, cfg, out_dtype=torch.float32)[0]
        vs_triton[name] = rel_err(tri, ref)
        for math in maths if method == "int8" else ["exact"]:
            if math != "none":
                mine = OneTokenGemv(math=math)(xs[q.shape[1]], q, s, torch.empty(q.shape[0], device="cuda"))
                errs[f"{name} {math}"] = rel_err(mine, ref)
    res.update(errors=errs, triton_errors=vs_triton)
    print(f"[{method}] rel max err vs float32, CUDA: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
          + "; Triton: " + ", ".join(f"{k} {v:.1e}" for k, v in vs_triton.items()))

    gemv_flag = method == "bf16"  # 16-bit weights on the Triton one-token kernel, as the engine runs them
    triton_ms = quant_bench.graph_ms(quant_bench.step_fn(weights, xs_2d, gemv=gemv_flag))
    bound_ms = quant_bench.weight_bytes(weights) / (copy * 1e9) * 1e3
    per_triton = {}
    for name in shapes:
        only = [{name: layer[name]} for layer in weights]
        per_triton[name] = quant_bench.graph_ms(quant_bench.step_fn(only, xs_2d, gemv=gemv_flag)) * 1e3 / layers
    res.update(triton_ms=triton_ms, bound_ms=bound_ms, triton_us=per_triton)
    print(f"[{method}] {layers} layers, 4 projections: copy bound {bound_ms:.3f} ms; Triton one-token "
          f"{triton_ms:.3f} ms ({100 * bound_ms / triton_ms:.1f}%)")
    print(f"[{method}] per projection, us a layer, Triton: " + ", ".join(f"{k} {v:.2f}" for k, v in per_triton.items()))
    print(f"[{method}] variant (warps, slots, chunk, blocks/SM, PDL) math | all ms | % of copy | " + " | ".join(shapes))
    runs = [(*v, m) for m in (maths if method == "int8" else ["exact"]) for v in variants]
    for nwarps, nslots, chunk, per_sm, pdl, math in runs:
        gemv = OneTokenGemv(nwarps, nslots, chunk, per_sm, pdl, math)
        if gemv.shared_bytes(max(k for _, k in shapes.values())) > MAX_SHARED_BYTES:
            continue
        ms = quant_bench.graph_ms(chain(gemv, weights, xs, outs))
        per = {}
        for name in shapes:
            only = [{name: layer[name]} for layer in weights]
            per[name] = quant_bench.graph_ms(chain(gemv, only, xs, outs)) * 1e3 / layers
        row = dict(nwarps=nwarps, nslots=nslots, chunk=chunk, blocks_per_sm=per_sm, pdl=pdl, math=math, ms=ms,
                   pct_copy=100 * bound_ms / ms, us=per)
        res["variants"].append(row)
        print(f"[{method}] ({nwarps}, {nslots}, {chunk}, {per_sm}, {pdl}) {math} | {ms:.3f} | {row['pct_copy']:.1f}% | "
              + " | ".join(f"{v:.2f}" for v in per.values()))
    best = min((r for r in res["variants"] if r["pdl"] and r["math"] != "none"), key=lambda r: r["ms"])
    res["best_shape"] = f"{best['nwarps']},{best['nslots']},{best['chunk']},{best['blocks_per_sm']}"
    res["best_math"] = best["math"]
    res["ok"] = all(v < (2e-3 if "half2" in k else 1e-4) for k, v in errs.items())
    del weights
    torch.cuda.empty_cache()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=34)
    ap.add_argument("--methods", default="int8,bf16")
    ap.add_argument("--maths", default="exact", help=f"INT8 products, comma-separated: {', '.join(MATHS)}")
    ap.add_argument("--variants", default=None,
                    help="ring shapes, 'warps,slots,chunk,blocks per SM,pdl' separated by ';' (default: VARIANTS)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    copy = quant_bench.copy_rate_gbps()
    result: dict = dict(device=torch.cuda.get_device_name(), copy_gbps=copy, methods={})
    for method in args.methods.split(","):
        variants = VARIANTS if args.variants is None else [
            tuple(int(p) for p in v.split(",")[:4]) + (v.split(",")[4] != "0",) for v in args.variants.split(";")]
        result["methods"][method] = probe(method, args.layers, copy, variants, args.maths.split(","))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    for method, res in result["methods"].items():
        print(f"best {method} {res['best_shape']} {res['best_math']}")
    return 0 if all(r["ok"] for r in result["methods"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
