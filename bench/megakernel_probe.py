"""The batch-1 decode megakernel (engine/csrc/decode_megakernel.cu) on random weights in a real
model's shapes: checks it against a float32 PyTorch reference of the same layers, then times all
layers at a few context lengths and prints what a W1 step would take with the LM head added.

    PYTHONPATH=packages python3 bench/megakernel_probe.py --out megakernel.json

Needs a CUDA GPU and nvcc. Timing only the layers; the engine's bf16 W1 step for comparison was
2.41 ms (docs/benchmarks.md, fifteenth run), of which ~2.07 ms were the layers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from gemma_serve.bench.megakernel_reference import HEAD_DIM, check, make_layers
from gemma_serve.engine.megakernel import DecodeMegakernel, LayerTensors
from gemma_serve.engine.model_config import ModelConfig


def time_step(mk: DecodeMegakernel, hidden: torch.Tensor, ctx: int, table: torch.Tensor, iters: int) -> float:
    ctx_t = torch.tensor([ctx], dtype=torch.int32, device=hidden.device)
    for _ in range(3):
        mk.step(hidden, ctx_t, table)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        mk.step(hidden, ctx_t, table)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def stage_trace(layers: list[LayerTensors], cfg: ModelConfig, scale: float, bs: int, hidden: torch.Tensor,
                table: torch.Tensor, ms_128: float | None) -> dict:
    """One traced launch at ctx 128: per stage, block 0's own work and its wait at the barrier after
    it (and the same for the last block), averaged over layers 1..n-1, in microseconds."""
    mk = DecodeMegakernel(layers, cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, scale,
                          cfg.attn_logit_softcapping, bs, trace=True)
    ms = time_step(mk, hidden, 128, table, 5)
    tr = mk.trace.cpu().tolist()
    names = ["norm+qkv", "attention", "combine", "o", "norm+gate_up", "down"]
    per_layer = len(names)
    out: dict = {}
    for row, who in ((0, "block0"), (1, "last")):
        t = tr[row]
        total_cycles = t[2 * per_layer * len(layers) + 1] - t[0]
        cyc_per_us = total_cycles / (ms * 1e3)
        stages = {}
        for j, name in enumerate(names):
            work, wait = [], []
            for layer in range(1, len(layers)):
                e = layer * per_layer + j + 1
                work.append(t[2 * e] - t[2 * e - 1] if e > 1 else t[2 * e] - t[0])
                wait.append(t[2 * e + 1] - t[2 * e])
            stages[name] = dict(work_us=sum(work) / len(work) / cyc_per_us, wait_us=sum(wait) / len(wait) / cyc_per_us)
        out[who] = dict(cycles_per_us=cyc_per_us, stages=stages)
        print(f"{who}: {cyc_per_us:.0f} cycles/us; " + ", ".join(
            f"{n} {v['work_us']:.2f}+{v['wait_us']:.2f}" for n, v in stages.items()) + " (us work + wait)")
    return out


def copy_rate(device: str) -> float:
    """Device-to-device copy, bytes read + written per second (the engine_bench yardstick)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).parent / "configs" / "gemma-3-4b-it"))
    ap.add_argument("--check-layers", type=int, default=6, help="layers in the correctness check (a global one at 6)")
    ap.add_argument("--ctx", default="128,384,640", help="context lengths to time (W1 averages ~384)")
    ap.add_argument("--check-window", type=int, default=100, help="sliding layers' window in the check")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--variants", default="base;NO_GRID_BARRIER=1;SKIP_ATTENTION=1;NO_GRID_BARRIER=1,SKIP_ATTENTION=1;"
                    "NSLOT=4,CH_BYTES=2560;BARRIER_THREAD=31",
                    help="';'-separated compile-time switch sets to time at W1's average context (384)")
    ap.add_argument("--quick", default=None, metavar="DEFINES",
                    help="only check 2 layers at ctx 17 built with these switches ('base' for none)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = ModelConfig.from_dict(json.loads((Path(args.config) / "config.json").read_text()))
    ctxs = [int(c) for c in args.ctx.split(",")]
    max_ctx = max(ctxs + [700])
    bs = args.block_size
    num_blocks = (max_ctx + bs - 1) // bs + 8
    table = torch.randperm(num_blocks, device=device)[: (max_ctx + bs - 1) // bs].to(torch.int32)
    result: dict = dict(device=torch.cuda.get_device_name(), config=Path(args.config).name)

    if args.quick:
        defines = {} if args.quick == "base" else {k: int(v) for k, v in (kv.split("=") for kv in args.quick.split(","))}
        small = make_layers(cfg, 2, num_blocks, bs, 4096, device, seed=1, window=args.check_window)
        mk = DecodeMegakernel(small, cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps,
                              cfg.query_pre_attn_scalar ** -0.5, cfg.attn_logit_softcapping, bs, defines=defines)
        print(args.quick, check(mk, small, cfg, 17, table, bs, device))
        return 0
    t0 = time.perf_counter()
    small = make_layers(cfg, args.check_layers, num_blocks, bs, 4096, device, seed=1, window=args.check_window)
    scale = cfg.query_pre_attn_scalar ** -0.5
    mk = DecodeMegakernel(small, cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, scale,
                          cfg.attn_logit_softcapping, bs)
    print(f"built and loaded in {time.perf_counter() - t0:.1f} s; {mk.blocks} blocks, {mk.splits} key splits")
    checks = [check(mk, small, cfg, c, table, bs, device) for c in (1, 17, 384, 700)]
    for c in checks:
        print(f"check {c['layers']} layers ctx {c['ctx']:4d}: rel max err {c['rel_max_err']:.2e}, cosine "
              f"{c['cosine']:.6f}, new k/v rel err {c['kv_rel_max_err']:.2e}, finite {c['finite']}")
    result["checks"] = checks
    ok = all(c["finite"] and c["rel_max_err"] < 2e-2 and c["cosine"] > 0.9999 and c["kv_rel_max_err"] < 2e-2
             for c in checks)
    result["checks_ok"] = ok
    del mk, small
    torch.cuda.empty_cache()

    layers = make_layers(cfg, cfg.num_layers, num_blocks, bs, 4096, device, seed=2)
    mk = DecodeMegakernel(layers, cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, scale,
                          cfg.attn_logit_softcapping, bs)
    full = check(mk, layers, cfg, 384, table, bs, device)
    print(f"check all {full['layers']} layers ctx 384: rel max err {full['rel_max_err']:.2e}, cosine {full['cosine']:.6f}")
    result["check_full"] = full
    rate = copy_rate(device)
    weight_bytes = sum(t.qkv.numel() + t.o.numel() + t.gate_up.numel() + t.down.numel() for t in layers) * 2
    vocab_bytes = cfg.vocab_size * cfg.hidden_size * 2
    head = torch.randn(cfg.vocab_size, cfg.hidden_size, device=device).to(torch.bfloat16)
    x = torch.randn(1, cfg.hidden_size, device=device).to(torch.bfloat16)
    for _ in range(3):
        (x @ head.T).float().argmax()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(50):
        (x @ head.T).float().argmax()
    e.record()
    e.synchronize()
    head_ms = s.elapsed_time(e) / 50
    hidden = torch.randn(cfg.hidden_size, device=device)
    rows = []
    print(f"copy rate {rate / 1e12:.2f} TB/s; layers' weights {weight_bytes / 1e9:.3f} GB; LM head + argmax {head_ms:.3f} ms")
    print("ctx | layers ms | weights+KV at copy rate ms | % of copy rate | step est. ms (+LM head) | tok/s | bound tok/s | % of bound")
    for ctx in ctxs:
        ms = time_step(mk, hidden, ctx, table, args.iters)
        kv_bytes = sum(2 * min(ctx, t.window or ctx) * cfg.num_kv_heads * HEAD_DIM * 2 for t in layers)
        copy_ms = (weight_bytes + kv_bytes) / rate * 1e3
        step = ms + head_ms
        bound = rate / (weight_bytes + kv_bytes + vocab_bytes)
        row = dict(ctx=ctx, layers_ms=ms, copy_ms=copy_ms, pct_copy=100 * copy_ms / ms, step_ms=step,
                   tok_s=1e3 / step, bound_tok_s=bound, pct_bound=100 * (1e3 / step) / bound)
        rows.append(row)
        print(f"{ctx:4d} | {ms:.3f} | {copy_ms:.3f} | {row['pct_copy']:.1f}% | {step:.3f} | {row['tok_s']:.1f} | "
              f"{bound:.1f} | {row['pct_bound']:.1f}%")
    result.update(copy_rate=rate, weight_bytes=weight_bytes, lm_head_ms=head_ms, timings=rows)
    result["stages"] = stage_trace(layers, cfg, scale, bs, hidden, table, rows[0]["layers_ms"] if rows else None)
    result["variants"] = []
    print("variant | layers ms at ctx 384 | % of copy rate")
    for spec in args.variants.split(";"):
        defines = {} if spec == "base" else {k: int(v) for k, v in (kv.split("=") for kv in spec.split(","))}
        var = DecodeMegakernel(layers, cfg.num_heads, cfg.num_kv_heads, cfg.rms_norm_eps, scale,
                               cfg.attn_logit_softcapping, bs, defines=defines)
        ms = time_step(var, hidden, 384, table, args.iters)
        kv_bytes = sum(2 * min(384, t.window or 384) * cfg.num_kv_heads * HEAD_DIM * 2 for t in layers)
        pct = 100 * (weight_bytes + kv_bytes) / rate * 1e3 / ms
        print(f"{spec} | {ms:.3f} | {pct:.1f}%")
        result["variants"].append(dict(spec=spec, layers_ms=ms, pct_copy=pct))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if ok and full["cosine"] > 0.999 else 1


if __name__ == "__main__":
    sys.exit(main())
