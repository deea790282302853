"""The decode floor of the linear layers, bf16 against weight-only INT8 / FP8: Gemma 3 4B's four
projections in each of its 34 layers (own weights per layer, so nothing is served from L2), replayed
as one CUDA graph per batch size. Prints ms per step, GB/s of weights read and the share of the
copy-rate bound; `--sweep` also times candidate tile shapes of the Triton kernel per projection.

    PYTHONPATH=packages python -m gemma_serve.bench.quant_bench --out quant.json [--sweep]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from gemma_serve.engine import quantization as quant

LAYERS = 34
# (N, K) of qkv_proj, o_proj, gate_up_proj, down_proj.
SHAPES = {"qkv": (4096, 2560), "o": (2560, 2048), "gate_up": (20480, 2560), "down": (2560, 10240)}


def copy_rate_gbps() -> float:
    a = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    end.synchronize()
    rate = 10 * 2 * a.numel() * a.element_size() / (start.elapsed_time(end) / 1e3) / 1e9
    del a, b
    torch.cuda.empty_cache()
    return rate


def graph_ms(fn, reps: int = 20) -> float:
    """Median-free but warm: capture `fn` once, replay `reps` times, ms per replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def make_weights(method: str, shapes: dict[str, tuple[int, int]], layers: int) -> list[dict]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = []
    for _ in range(layers):
        layer = {}
        for name, (n, k) in shapes.items():
            w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
            layer[name] = w if method.startswith("bf16") else quant.quantize_weight(w, method)
        out.append(layer)
    return out


def weight_bytes(weights: list[dict]) -> int:
    total = 0
    for layer in weights:
        for w in layer.values():
            total += sum(t.numel() * t.element_size() for t in (w if isinstance(w, tuple) else (w,)))
    return total


def step_fn(weights: list[dict], xs: dict[int, torch.Tensor], config: quant.KernelConfig | None = None,
            gemv: bool = False):
    """One decode step's projections. gemv: 16-bit weights on the one-token kernel (up to
    FEW_TOKEN_MAX_ROWS tokens) instead of cuBLAS."""
    def run() -> None:
        for layer in weights:
            for w in layer.values():
                if isinstance(w, tuple):
                    q, s = w
                    quant.triton_weight_only_linear(xs[q.shape[1]], q, s, config)
                elif gemv:
                    quant.triton_weight_only_linear(xs[w.shape[1]], w, None, quant.one_token_config(*w.shape))
                else:
                    F.linear(xs[w.shape[1]], w)
    return run


def inputs(m: int) -> dict[int, torch.Tensor]:
    return {k: torch.randn(m, k, device="cuda").bfloat16() for k in {k for _, k in SHAPES.values()}}


def sweep_candidates(m: int) -> list[quant.KernelConfig]:
    """Tile shapes to time at m rows; split_k holds -target: split K until target x SMs programs."""
    out = []
    if m == 1:
        for block_n, block_k, warps, stages in [(4, 1024, 4, 2), (8, 512, 4, 2), (8, 1024, 4, 2), (4, 2048, 8, 2),
                                                (8, 1024, 8, 2), (16, 512, 4, 2), (16, 1024, 8, 2), (2, 2048, 4, 2),
                                                (32, 256, 4, 2), (8, 512, 4, 1), (8, 512, 4, 3)]:
            for target in (0, 2, 4, 8):
                out.append(quant.KernelConfig(1, block_n, block_k, -target, warps, stages))
        return out
    if m <= 16:
        tiles = [(16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 512, 4, 3), (32, 512, 4, 4),
                 (64, 128, 4, 4), (64, 256, 4, 4), (64, 256, 8, 3), (64, 512, 8, 3), (128, 128, 4, 4),
                 (128, 256, 8, 3)]
        block_ms, swaps, targets = [16], [True], (0, 1, 2, 4)
    elif m <= 64:
        tiles = [(32, 256, 4, 4), (64, 128, 4, 4), (64, 256, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3),
                 (128, 64, 4, 4), (256, 64, 8, 3)]
        block_ms, swaps, targets = [max(16, 1 << (m - 1).bit_length())], [True, False], (0, 1, 2)
    else:
        tiles = [(128, 128, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3), (128, 128, 4, 3), (64, 128, 8, 3),
                 (64, 64, 8, 4)]
        block_ms, swaps, targets = [64, 128, 256], [True, False], (0, 2)
    for block_m in block_ms:
        for block_n, block_k, warps, stages in tiles:
            if block_m * block_n > 128 * 128:
                continue  # accumulator past the register file
            for swap in swaps:
                for target in targets:
                    out.append(quant.KernelConfig(block_m, block_n, block_k, -target, warps, stages, swap))
    return out


def resolve_split(cfg: quant.KernelConfig, m: int, n: int, k: int) -> quant.KernelConfig | None:
    """Sweep configs carry -target in split_k; turn it into the split that reaches target x SMs."""
    target = -cfg.split_k
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    k_tiles = -(-k // cfg.block_k)
    tiles = -(-n // cfg.block_n) * -(-m // cfg.block_m)
    split = 1
    while target and tiles * split < target * sms and k_tiles >= 2 * split * 2:
        split *= 2
    if target and split == 1:
        return None  # same as target 0
    return quant.KernelConfig(cfg.block_m, cfg.block_n, cfg.block_k, split, cfg.num_warps, cfg.num_stages,
                              cfg.swap_ab)


def sweep(ms: list[int], copy_gbps: float, layers: int) -> list[dict]:
    rows = []
    for m in ms:
        xs = inputs(m)
        for name, (n, k) in SHAPES.items():
            weights = make_weights("int8", {name: (n, k)}, layers)
            bf16 = make_weights("bf16", {name: (n, k)}, layers)
            nbytes = weight_bytes(weights)
            bound_us = nbytes / (copy_gbps * 1e9) * 1e6 / layers
            default = quant.kernel_config(m, n, k, torch.cuda.get_device_properties(0).multi_processor_count)
            timed = {"default " + str(default): graph_ms(step_fn(weights, xs, default)) * 1e3 / layers}
            for cand in sweep_candidates(m):
                cfg = resolve_split(cand, m, n, k)
                if cfg is None or str(cfg) in timed:
                    continue
                try:
                    timed[str(cfg)] = graph_ms(step_fn(weights, xs, cfg)) * 1e3 / layers
                except Exception as exc:  # out of shared memory and the like: report, go on
                    timed[str(cfg)] = float("inf")
                    print(f"  {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            bf16_us = graph_ms(step_fn(bf16, xs)) * 1e3 / layers
            best = min(timed, key=timed.get)
            row = dict(m=m, shape=name, n=n, k=k, bound_us=bound_us, bf16_us=bf16_us, best=best,
                       best_us=timed[best], default_us=timed["default " + str(default)],
                       top5=sorted(timed.items(), key=lambda kv: kv[1])[:5])
            rows.append(row)
            print(f"sweep m={m:4d} {name:8s} bound {bound_us:7.1f} us  bf16 {bf16_us:7.1f}  default "
                  f"{row['default_us']:7.1f}  best {row['best_us']:7.1f} {best}", flush=True)
            del weights, bf16
            torch.cuda.empty_cache()
    return rows


def time_one_token_tiles(step, n: int, k: int, layers: int, targets: tuple[int, ...],
                         tiles: list[tuple[int, int, int, int]], label: str = "") -> dict[str, float]:
    """us per layer of step(cfg) for each one-token tile (block_n, block_k, warps, stages) and split
    target that fits K; a config that fails to compile or run is timed as inf and reported."""
    timed: dict[str, float] = {}
    for block_n, block_k, warps, stages in tiles:
        if block_k > k:
            continue
        for target in targets:
            cfg = resolve_split(quant.KernelConfig(1, block_n, block_k, -target, warps, stages), 1, n, k)
            if cfg is None or str(cfg) in timed:
                continue
            try:
                timed[str(cfg)] = graph_ms(step(cfg)) * 1e3 / layers
            except Exception as exc:
                timed[str(cfg)] = float("inf")
                print(f"  {label} {cfg}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    return timed


def bf16_gemv_sweep(copy_gbps: float, layers: int) -> list[dict]:
    """One token, bf16 weights: cuBLAS (`F.linear`) against the Triton one-token kernel with 16-bit
    weights (no scales), per projection and tile shape."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    xs = inputs(1)
    rows = []
    for name, (n, k) in SHAPES.items():
        bf16 = make_weights("bf16", {name: (n, k)}, layers)
        nbytes = weight_bytes(bf16)
        bound_us = nbytes / (copy_gbps * 1e9) * 1e6 / layers

        def triton_step(cfg: quant.KernelConfig, weights: list[dict] = bf16, name: str = name, k: int = k):
            def run() -> None:
                for layer in weights:
                    quant.triton_weight_only_linear(xs[k], layer[name], None, cfg)
            return run

        timed = time_one_token_tiles(triton_step, n, k, layers, (0, 2, 4),
                                     [(4, 1024, 4, 2), (8, 512, 4, 2), (8, 512, 4, 3), (8, 1024, 8, 2), (16, 512, 8, 2),
                                      (4, 512, 4, 3), (2, 1024, 4, 3), (16, 256, 4, 3), (4, 256, 4, 4),
                                      (4, 2048, 4, 2), (4, 2048, 8, 2), (2, 2048, 4, 2)])
        cublas_us = graph_ms(step_fn(bf16, xs)) * 1e3 / layers
        best = min(timed, key=timed.get)
        # Same numbers as cuBLAS within bf16 rounding of the sum.
        w = bf16[0][name]
        ref = F.linear(xs[k].float(), w.float())
        got = quant.triton_weight_only_linear(xs[k], w, None, quant.KernelConfig(1, 8, 512, 1, 4, 2)).float()
        err = ((got - ref).norm() / ref.norm()).item()
        rows.append(dict(shape=name, n=n, k=k, bound_us=bound_us, cublas_us=cublas_us, best=best, best_us=timed[best],
                         rel_err=err, sms=sms, top5=sorted(timed.items(), key=lambda kv: kv[1])[:5]))
        print(f"bf16 one token {name:8s} bound {bound_us:6.1f} us  cuBLAS {cublas_us:6.1f} ({100 * bound_us / cublas_us:4.1f}%)"
              f"  Triton best {timed[best]:6.1f} ({100 * bound_us / timed[best]:4.1f}%) {best}  rel err {err:.1e}",
              flush=True)
        del bf16
        torch.cuda.empty_cache()
    return rows


def bf16_matrix_sweep(ms: list[int], copy_gbps: float, layers: int) -> list[dict]:
    """bf16 weights at decode batch sizes (64-256 rows), float32 outputs as the engine's qkv, o and
    down (and gate_up up to 256 rows) return them: cuBLAS (`quantization.matmul`) against the
    Triton matrix-unit kernel without scales, per projection and tile shape. At 256 rows a W2
    decode step spent 3.1 ms in these projections against 2.1 ms at the matmul rate (qkv, o and
    down at 43-65% of it, cuBLAS's split-K reduce another 0.15 ms); at 128 rows (W3) qkv, o and
    down read their weights at 32-52% of the copy rate. Each layer has its own weights. On an H200
    (2026-12-01) the best tiles were 0.60-0.85x cuBLAS everywhere, so the engine keeps cuBLAS."""
    rows = []
    for m in ms:
        xs = inputs(m)
        for name, (n, k) in SHAPES.items():
            stack = make_weights("bf16", {name: (n, k)}, layers)
            bound_us = weight_bytes(stack) / (copy_gbps * 1e9) * 1e6 / layers
            mats = [layer[name] for layer in stack]
            x = xs[k]

            def cublas(mats: list[torch.Tensor] = mats, x: torch.Tensor = x) -> None:
                for w in mats:
                    quant.matmul(x, w, torch.float32)

            def triton_step(cfg: quant.KernelConfig, mats: list[torch.Tensor] = mats, x: torch.Tensor = x):
                def run() -> None:
                    for w in mats:
                        quant.triton_weight_only_linear(x, w, None, cfg, out_dtype=torch.float32)
                return run

            cublas_us = graph_ms(cublas) * 1e3 / layers
            timed: dict[str, float] = {}
            configs: dict[str, quant.KernelConfig] = {}
            for cand in sweep_candidates(m):
                cfg = resolve_split(cand, m, n, k)
                if cfg is None or str(cfg) in timed:
                    continue
                configs[str(cfg)] = cfg
                try:
                    timed[str(cfg)] = graph_ms(triton_step(cfg)) * 1e3 / layers
                except Exception as exc:  # out of shared memory and the like: report, go on
                    timed[str(cfg)] = float("inf")
                    print(f"  {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            best = min(timed, key=timed.get)
            ref = x.double() @ mats[0].double().T
            got = quant.triton_weight_only_linear(x, mats[0], None, configs[best], out_dtype=torch.float32)
            err = float((got.double() - ref).norm() / ref.norm())
            rows.append(dict(m=m, shape=name, n=n, k=k, bound_us=bound_us, tflop=2 * m * n * k / 1e12,
                             cublas_us=cublas_us, best=best, best_config=asdict(configs[best]), best_us=timed[best],
                             speedup_vs_cublas=cublas_us / timed[best], rel_err=err,
                             top5=sorted(timed.items(), key=lambda kv: kv[1])[:5]))
            print(f"bf16 matrix m={m:4d} {name:8s} weights at the copy rate {bound_us:6.1f} us; cuBLAS {cublas_us:6.1f} us, "
                  f"Triton best {timed[best]:6.1f} us ({cublas_us / timed[best]:.2f}x) {best}  rel err {err:.1e}",
                  flush=True)
            mats.clear()
            stack.clear()
            torch.cuda.empty_cache()
    return rows


INT8_WIDENINGS = quant.INT8_GEMV_WIDENINGS


def int8_gemv_sweep(copy_gbps: float, layers: int, widenings: tuple[str, ...] = ()) -> list[dict]:
    """One token, INT8 weights: the one-token kernel's ways of widening the weights (float add
    after bit operations, or subnormals) per projection and tile shape, with each one's error
    against the dequantized matrix in float32. `widenings`: only these (names of INT8_WIDENINGS)."""
    xs = inputs(1)
    rows = []
    for name, (n, k) in SHAPES.items():
        int8 = make_weights("int8", {name: (n, k)}, layers)
        bound_us = weight_bytes(int8) / (copy_gbps * 1e9) * 1e6 / layers
        q, s = int8[0][name]
        ref = F.linear(xs[k].float(), quant.dequantize_weight(q, s, torch.float32))
        for label, widen in INT8_WIDENINGS.items():
            if widenings and label not in widenings:
                continue
            def step(cfg: quant.KernelConfig, name: str = name, k: int = k, widen: int = widen,
                     weights: list[dict] = int8):
                def run() -> None:
                    for layer in weights:
                        quant.triton_weight_only_linear(xs[k], *layer[name], cfg, int8_gemv_widen=widen)
                return run

            timed = time_one_token_tiles(step, n, k, layers, (0, 2),
                                         [(4, 1024, 4, 2), (8, 512, 4, 2), (8, 1024, 4, 2), (8, 1024, 8, 2),
                                          (16, 512, 8, 2), (4, 512, 4, 3), (4, 2048, 4, 2), (4, 2048, 8, 2),
                                          (2, 2048, 4, 2), (8, 2048, 8, 2)], label)
            best = min(timed, key=timed.get)
            try:
                got = quant.triton_weight_only_linear(xs[k], q, s, quant.KernelConfig(1, 8, 512, 1, 4, 2),
                                                      int8_gemv_widen=widen).float()
                err = ((got - ref).norm() / ref.norm()).item()
            except Exception as exc:
                err = float("nan")
                print(f"  {label}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            rows.append(dict(shape=name, n=n, k=k, widening=label, bound_us=bound_us, best=best,
                             best_us=timed[best], rel_err=err, top3=sorted(timed.items(), key=lambda kv: kv[1])[:3]))
            print(f"int8 one token {name:8s} {label:14s} bound {bound_us:6.1f} us  best {timed[best]:6.1f} us "
                  f"({100 * bound_us / timed[best]:4.1f}%) {best}  rel err {err:.1e}", flush=True)
        del int8
        torch.cuda.empty_cache()
    return rows


def prefetch_tiles_sweep(copy_gbps: float, layers: int) -> list[dict]:
    """One token, INT8 weights on the engine's tiles (`kernel_config`, half2): each projection with
    1 to MAX_PREFETCH_TILES weight tiles in flight per program (GEMV_PREFETCH_TILES; the engine uses
    several only where `prefetch_applies`: qkv), against its copy bound."""
    xs = inputs(1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for name, (n, k) in SHAPES.items():
        int8 = make_weights("int8", {name: (n, k)}, layers)
        bound_us = weight_bytes(int8) / (copy_gbps * 1e9) * 1e6 / layers
        cfg = quant.kernel_config(1, n, k, sms)
        timed = {}
        for tiles in range(1, quant.MAX_PREFETCH_TILES + 1):
            def run(tiles: int = tiles, weights: list[dict] = int8, k: int = k) -> None:
                for layer in weights:
                    quant.triton_weight_only_linear(xs[k], *layer[name], cfg, prefetch=tiles if tiles > 1 else False)
            timed[tiles] = graph_ms(run) * 1e3 / layers
        rows.append(dict(shape=name, n=n, k=k, config=asdict(cfg), bound_us=bound_us, us_by_tiles=timed))
        print(f"int8 one token {name:8s} {cfg.block_n}x{cfg.block_k} w{cfg.num_warps}, bound {bound_us:5.2f} us; "
              "tiles in flight " + ", ".join(f"{t}: {us:5.2f} us ({100 * bound_us / us:4.1f}%)" for t, us in timed.items()),
              flush=True)
        del int8
        torch.cuda.empty_cache()
    return rows


def one_token_tile_grid(method: str, name: str, k: int) -> list[quant.KernelConfig]:
    """Unsplit one-token tiles to time for a projection: 1-16 output rows, 256-2048-wide K steps
    that divide K, 4 warps or 8 (on 4096+ weights), 2 stages or 3 (on K steps up to 512); gate_up (GELU epilogue) needs an even row count,
    and 8-bit tiles stay within what half2 takes (`half2_applies`)."""
    grid = []
    for block_n in (1, 2, 4, 8, 16):
        for block_k in (256, 512, 1024, 2048):
            for warps in (4, 8):
                for stages in (2, 3):
                    cfg = quant.KernelConfig(1, block_n, block_k, 1, warps, stages)
                    elements = block_n * block_k
                    if k % block_k or not 512 <= elements <= 16384 or (name == "gate_up" and block_n % 2):
                        continue
                    if method == "int8" and elements < 512 * warps:  # the exact path: slower, not a candidate
                        continue
                    if (stages == 3 and block_k > 512) or (warps == 8 and elements < 4096):
                        continue  # measured slower before (s3 and s5 sweeps): keeps the compiles few
                    grid.append(cfg)
    return grid


def one_token_tiles_sweep(copy_gbps: float, layers: int) -> list[dict]:
    """One token, bf16 and INT8 weights, each projection as the engine runs it (gate_up with its
    GELU epilogue, the others with float32 outputs): the engine's tile against every tile of
    `one_token_tile_grid`. The tile must be the same at 1-4 tokens for 8-bit weights (batch
    invariance), so only the one-token time decides; the engine A/B (`bench/tile_override.py`) decides
    whether a faster tile alone is a faster decode step."""
    xs = inputs(1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for method in ("bf16", "int8"):
        for name, (n, k) in SHAPES.items():
            weights = make_weights(method, {name: (n, k)}, layers)
            bound_us = weight_bytes(weights) / (copy_gbps * 1e9) * 1e6 / layers
            engine = quant.one_token_config(n, k) if method == "bf16" else quant.kernel_config(1, n, k, sms)

            def step(cfg: quant.KernelConfig, weights: list[dict] = weights, name: str = name, k: int = k):
                kw = dict(gelu_mul=True) if name == "gate_up" else dict(out_dtype=torch.float32)

                def run() -> None:
                    for layer in weights:
                        w, scale = (layer[name], None) if method == "bf16" else layer[name]
                        quant.triton_weight_only_linear(xs[k], w, scale, cfg, **kw)
                return run

            engine_us = graph_ms(step(engine)) * 1e3 / layers
            timed = []
            for cfg in one_token_tile_grid(method, name, k):
                try:
                    timed.append(dict(config=asdict(cfg), us=graph_ms(step(cfg)) * 1e3 / layers))
                except Exception as exc:  # a tile that does not compile is reported, not fatal
                    print(f"  {method} {name} {cfg}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            timed.sort(key=lambda r: r["us"])
            best = timed[0]
            rows.append(dict(method=method, shape=name, n=n, k=k, bound_us=bound_us, engine_config=asdict(engine),
                             engine_us=engine_us, best_config=best["config"], best_us=best["us"], timed=timed))
            top = ", ".join(f"{r['config']['block_n']}x{r['config']['block_k']} w{r['config']['num_warps']} "
                            f"s{r['config']['num_stages']} {r['us']:.2f}" for r in timed[:4])
            print(f"{method} one token {name:7s} bound {bound_us:5.2f} us; engine {engine.block_n}x{engine.block_k} "
                  f"w{engine.num_warps} s{engine.num_stages} {engine_us:.2f} us ({100 * bound_us / engine_us:.1f}%); "
                  f"fastest {top} us", flush=True)
            del weights
            torch.cuda.empty_cache()
    return rows


def gemv_variants(copy_gbps: float, layers: int) -> list[dict]:
    """One token through every layer's four projections, as a decode step runs them (qkv, o,
    gate_up with its GELU, down), bf16 and INT8 weights: with the GELU kernel after gate_up, with
    the GELU in gate_up's epilogue, and with float32 outputs too. Then each projection alone, and
    gate_up with its GELU epilogue per tile shape."""
    from gemma_serve.engine.fused_kernels import gelu_mul

    xs = inputs(1)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = []
    for method in ("bf16", "int8"):
        weights = make_weights(method, SHAPES, layers)
        bound_us = weight_bytes(weights) / (copy_gbps * 1e9) * 1e6 / layers

        def project(w, x, **kw):
            q, s = (w, None) if method == "bf16" else w
            n, k = q.shape
            cfg = quant.one_token_config(n, k) if method == "bf16" else quant.kernel_config(1, n, k, sms)
            if widen is not None and method == "int8":
                kw["int8_gemv_widen"] = widen
            return quant.triton_weight_only_linear(x, q, s, cfg, **kw)

        def chain(fused: bool, out32: bool):
            def run() -> None:
                out = dict(out_dtype=torch.float32) if out32 else {}
                for layer in weights:
                    project(layer["qkv"], xs[2560], **out)
                    project(layer["o"], xs[2048], **out)
                    if fused:
                        project(layer["gate_up"], xs[2560], gelu_mul=True)
                    else:
                        gelu_mul(project(layer["gate_up"], xs[2560], **out), torch.bfloat16)
                    project(layer["down"], xs[10240], **out)
            return run

        # (GELU in the epilogue, float32 outputs, INT8 widening: None for the engine's)
        exact, half2 = quant._WIDEN_INT8, quant._WIDEN_INT8_HALF2
        variants = {"GELU kernel after gate_up": (False, False, None),
                    "GELU in gate_up's epilogue": (True, False, None),
                    "GELU in the epilogue, float32 outputs": (True, True, None),
                    "the same, INT8 float-add (exact)": (True, True, exact),
                    "the same, INT8 half2": (True, True, half2)}
        widen = None
        for label, (fused, out32, widen) in variants.items():
            if method == "bf16" and widen is not None:
                continue
            us = graph_ms(chain(fused, out32)) * 1e3 / layers
            rows.append(dict(method=method, variant=label, us_per_layer=us, bound_us=bound_us))
            print(f"{method:5s} layer of 4 projections, {label:38s} {us:6.1f} us/layer "
                  f"({100 * bound_us / us:4.1f}% of copy bound {bound_us:.1f})", flush=True)
        for widen in (exact, half2) if method == "int8" else (None,):
            for name, (n, k) in SHAPES.items():
                def one(name: str = name, k: int = k):
                    def run() -> None:
                        for layer in weights:
                            project(layer[name], xs[k])
                    return run
                us = graph_ms(one()) * 1e3 / layers
                label = {None: name, exact: f"{name}, float-add", half2: f"{name}, half2"}[widen]
                rows.append(dict(method=method, variant=label, us_per_layer=us))
                print(f"{method:5s} {label:36s} {us:6.1f} us", flush=True)
        widen = None
        n, k = SHAPES["gate_up"]
        for block_n, block_k, warps, stages in ((4, 512, 4, 3), (8, 512, 4, 2), (8, 512, 4, 3), (8, 512, 8, 2),
                                                (16, 512, 8, 2), (8, 256, 4, 4), (2, 512, 4, 3)):
            cfg = quant.KernelConfig(1, block_n, block_k, 1, warps, stages)

            def fused_step(cfg: quant.KernelConfig = cfg):
                def run() -> None:
                    for layer in weights:
                        q, s = (layer["gate_up"], None) if method == "bf16" else layer["gate_up"]
                        quant.triton_weight_only_linear(xs[k], q, s, cfg, gelu_mul=True)
                return run
            us = graph_ms(fused_step()) * 1e3 / layers
            rows.append(dict(method=method, variant=f"gate_up+GELU {cfg}", us_per_layer=us))
            print(f"{method:5s} gate_up+GELU {block_n}x{block_k} w{warps} s{stages} {us:6.1f} us", flush=True)
        weights.clear()
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,16,64,256", help="rows (decode batch sizes) to time")
    parser.add_argument("--methods", default="bf16,int8,fp8",
                        help="bf16 (cuBLAS), bf16-gemv (the one-token kernel, up to 4 rows), int8, fp8")
    parser.add_argument("--sweep", action="store_true", help="also time candidate tile shapes per projection")
    parser.add_argument("--sweep-batch", default="1,16,256", help="rows to sweep tile shapes at")
    parser.add_argument("--bf16-gemv", action="store_true",
                        help="only: one token on bf16 weights, cuBLAS against the Triton one-token kernel")
    parser.add_argument("--int8-gemv", action="store_true",
                        help="only: one token on INT8 weights, the one-token kernel's widenings and tile shapes")
    parser.add_argument("--int8-widenings", default="",
                        help="with --int8-gemv: only these widenings, e.g. half2 (default: all)")
    parser.add_argument("--prefetch-tiles", action="store_true",
                        help="only: one token on INT8 weights, each projection with 1-5 weight tiles in flight")
    parser.add_argument("--one-token-tiles", action="store_true",
                        help="only: one token on bf16 and INT8 weights, every projection on the engine's tile and "
                             "on every unsplit tile of one_token_tile_grid")
    parser.add_argument("--gemv-variants", action="store_true",
                        help="only: one token through each layer's projections, one change of the kernel at a time")
    parser.add_argument("--bf16-matrix", default="",
                        help="rows, e.g. 64,128,256: bf16 weights on the Triton matrix-unit kernel against cuBLAS, "
                             "float32 outputs, per projection and tile shape")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("quant_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    ms = [int(b) for b in args.batch.split(",")]
    methods = [m for m in args.methods.split(",")
               if m != "fp8" or torch.cuda.get_device_capability() >= (8, 9)]
    copy = copy_rate_gbps()
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gbps": copy,
                    "layers": args.layers, "stack": []}
    print(f"device {report['device']}: copy {copy:.0f} GB/s (read+write); {args.layers} layers x "
          f"{', '.join(f'{k} {n}x{kk}' for k, (n, kk) in SHAPES.items())}", flush=True)
    if (args.bf16_gemv or args.int8_gemv or args.gemv_variants or args.bf16_matrix or args.prefetch_tiles
            or args.one_token_tiles):
        if args.one_token_tiles:
            report["one_token_tiles"] = one_token_tiles_sweep(copy, args.layers)
        if args.prefetch_tiles:
            report["prefetch_tiles"] = prefetch_tiles_sweep(copy, args.layers)
        if args.bf16_matrix:
            report["bf16_matrix"] = bf16_matrix_sweep([int(b) for b in args.bf16_matrix.split(",")], copy,
                                                      args.layers)
        if args.gemv_variants:
            report["gemv_variants"] = gemv_variants(copy, args.layers)
        if args.bf16_gemv:
            report["bf16_gemv"] = bf16_gemv_sweep(copy, args.layers)
        if args.int8_gemv:
            report["int8_gemv"] = int8_gemv_sweep(copy, args.layers,
                                                  tuple(w for w in args.int8_widenings.split(",") if w))
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
        return 0
    print(f"{'method':6s} {'batch':>5s} {'ms/step':>8s} {'GB/s':>7s} {'% bound':>8s} {'vs bf16':>8s}")
    base: dict[int, float] = {}
    for method in methods:
        weights = make_weights(method, SHAPES, args.layers)
        nbytes = weight_bytes(weights)
        for m in ms:
            if method == "bf16-gemv" and m > quant.FEW_TOKEN_MAX_ROWS:
                continue
            ms_step = graph_ms(step_fn(weights, inputs(m), gemv=method == "bf16-gemv"))
            if method == "bf16":
                base[m] = ms_step
            gbps = nbytes / (ms_step / 1e3) / 1e9
            speedup = base[m] / ms_step if m in base else float("nan")
            report["stack"].append(dict(method=method, batch=m, ms=ms_step, weight_bytes=nbytes, gbps=gbps,
                                        pct_bound=100 * gbps / copy, speedup_vs_bf16=speedup))
            print(f"{method:6s} {m:5d} {ms_step:8.3f} {gbps:7.0f} {100 * gbps / copy:8.1f} {speedup:8.2f}",
                  flush=True)
        del weights
        torch.cuda.empty_cache()
    if args.sweep:
        report["sweep"] = sweep([int(b) for b in args.sweep_batch.split(",")], copy, args.layers)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
