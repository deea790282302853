"""Where one engine step's time goes, on a GPU: the numbers behind `docs/benchmarks.md`'s "where the
time goes" notes, measured rather than guessed.

    python -m gemma_serve.bench.step_profile --model bench/configs/gemma-3-4b-it --out DIR

On the engine_bench configuration (random bf16 weights, max_model_len 1024, 256 sequences, 8192
tokens a step) it measures:
  - a prefill step of 16 x 512 fresh prompts, with the Triton prefill kernel and with the PyTorch path;
  - the step that gives one fresh 128-token prompt its first token (W1's TTFT), wall and GPU time;
  - decode steps at batch 1 and 256, back to back: the wall time per step against the GPU's busy
    time per step, i.e. what the host adds;
  - the prefill kernel's tile sizes on one layer's shapes, against torch SDPA (flash) on dense tensors;
  - the top CUDA kernels of each step kind (torch.profiler), written to DIR/kernels-*.txt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from gemma_serve.engine import attention
from gemma_serve.engine.compile_log import CompileLog
from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.llm_engine import LLMEngine
from gemma_serve.engine.sampling_params import SamplingParams

GREEDY = dict(temperature=0.0, stop_token_ids=())


def _ms(fn, repeats: int = 5) -> float:
    """Median wall milliseconds of fn() (synchronised before and after)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _gpu_ms(fn, repeats: int = 20) -> float:
    """Median GPU milliseconds of fn(), from CUDA events (host time between launches not counted
    when the GPU is kept busy)."""
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class StepProbe:
    def __init__(self, engine: LLMEngine, vocab_limit: int) -> None:
        self.engine = engine
        self.gen = torch.Generator().manual_seed(0)
        self.vocab_limit = vocab_limit
        self.count = 0

    def add(self, n: int, length: int, max_tokens: int) -> list[str]:
        ids = []
        for prompt in torch.randint(10, self.vocab_limit, (n, length), generator=self.gen).tolist():
            rid = f"p{self.count}"
            self.count += 1
            self.engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, **GREEDY))
            ids.append(rid)
        return ids

    def clear(self) -> None:
        """Abort everything, and read the step still in flight (an overlapped decode step)."""
        for rid in list(self.engine.sequences):
            self.engine.abort(rid)
        while self.engine.has_unfinished():
            self.engine.step()


def prefill_step_ms(probe: StepProbe, kernel: bool, repeats: int = 3) -> float:
    """One step holding 16 fresh 512-token prompts (8192 tokens), prefill kernel on or off."""
    previous = attention.PREFILL_KERNEL
    attention.PREFILL_KERNEL = kernel
    times = []
    try:
        for _ in range(repeats + 1):
            probe.add(16, 512, 4)
            times.append(_ms(probe.engine.step, 1))
            probe.clear()
    finally:
        attention.PREFILL_KERNEL = previous
    return statistics.median(times[1:])


def _write_host_profile(profiler, path: Path, lines: int = 30) -> None:
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(lines)
    path.write_text(text.getvalue())


def first_token_step(probe: StepProbe, out_dir: Path, prompt_len: int = 128, repeats: int = 5) -> dict:
    """The step that gives a fresh prompt its first token (W1's TTFT): its wall time (median), the
    GPU's busy time in it (torch.profiler over one more such step), and where the host's time goes
    (cProfile over a third, DIR/host-first-token.txt)."""
    import cProfile

    from torch.profiler import ProfilerActivity, profile

    engine = probe.engine
    times = []
    for _ in range(repeats + 1):
        probe.add(1, prompt_len, 4)
        times.append(_ms(engine.step, 1))
        probe.clear()
    probe.add(1, prompt_len, 4)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    probe.clear()
    probe.add(1, prompt_len, 4)
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    engine.step()
    torch.cuda.synchronize()
    profiler.disable()
    probe.clear()
    _write_host_profile(profiler, out_dir / "host-first-token.txt")
    wall = statistics.median(times[1:])
    gpu = _kernel_ms(prof)
    return {"prompt_len": prompt_len, "step_wall_ms": wall, "gpu_busy_ms": gpu, "host_ms": wall - gpu}


def mixed_step(probe: StepProbe, out_dir: Path, decodes: int = 240, prompts: int = 16, prompt_len: int = 512,
               repeats: int = 4) -> dict:
    """W2's steady state: `decodes` sequences decoding at ~`prompt_len` keys when `prompts` fresh
    prompts arrive, so one step carries both (the decode rows take their share of the token budget,
    the rest goes to the prompts). Wall time of that step (median), the GPU's busy time in it and its
    kernels (torch.profiler over one more, DIR/kernels-mixed.txt), against a decode-only step of the
    same sequences."""
    from torch.profiler import ProfilerActivity, profile

    engine = probe.engine
    probe.add(decodes, prompt_len, 64)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.sequences.values()):
        engine.step()
    engine.step()
    decode_ms = _ms(engine.step, 5)
    walls, rows = [], 0
    for i in range(repeats + 1):
        fresh = probe.add(prompts, prompt_len, 4)
        torch.cuda.synchronize()
        if i < repeats:
            walls.append(_ms(engine.step, 1))
        else:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                engine.step()
                torch.cuda.synchronize()
        rows = engine.last_step_prefill_rows
        for rid in fresh:
            engine.abort(rid)
        engine.step()
    probe.clear()
    (out_dir / "kernels-mixed.txt").write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
    wall = statistics.median(walls[1:])
    gpu = _kernel_ms(prof)
    return {"decodes": decodes, "prompt_rows": rows, "step_wall_ms": wall, "gpu_busy_ms": gpu,
            "host_ms": wall - gpu, "decode_only_step_ms": decode_ms}


def _kernel_ms(prof) -> float:
    """Milliseconds of GPU work (kernels, copies) that a torch.profiler run recorded."""
    total = 0.0
    for e in prof.key_averages():
        total += getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
    return total / 1e3


def decode_steps(probe: StepProbe, batch: int, prompt_len: int, steps: int) -> dict:
    """`batch` sequences prefilled, then `steps` decode steps back to back (as a serving loop runs
    them: overlapped when the engine overlaps): wall time per step against the GPU's busy time per
    step (kernels, recorded by torch.profiler over the same number of steps); the difference is
    what the host adds to each step."""
    from torch.profiler import ProfilerActivity, profile

    engine = probe.engine
    probe.add(batch, prompt_len, 2 * steps + 8)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.sequences.values()):
        engine.step()
    for _ in range(2):
        engine.step()
    with CompileLog() as compiled:
        wall = _ms(lambda: [engine.step() for _ in range(steps)], 1) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
    gpu = _kernel_ms(prof) / steps
    probe.clear()
    return {"batch": batch, "context": prompt_len + steps, "step_wall_ms": wall, "gpu_busy_ms": gpu,
            "host_ms": wall - gpu, "overlap_steps": engine.config.overlap_steps,
            "compiled_while_timed": compiled.summary()}


class _PhaseTimer:
    """Host seconds spent in wrapped callables, by phase name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        return timed


class _TimedGraph:
    def __init__(self, graph, timer: _PhaseTimer) -> None:
        self.replay = timer.wrap("graph launch (cudaGraphLaunch)", graph.replay)


def host_split(probe: StepProbe, batch: int, prompt_len: int, steps: int) -> dict:
    """Where the host's time goes in back-to-back decode steps of `batch` sequences: milliseconds
    per step in scheduling, the graph step's input preparation, the graph launch, sampling launches,
    waiting for the previous step's draws (the GPU ahead of the host) and post-processing. If the
    wait is near zero, the host paces the loop and the GPU idles for the difference between the
    step and the graph's replay time."""
    from gemma_serve.engine import model_runner
    from gemma_serve.engine.model_runner import PendingStep

    engine = probe.engine
    graphs = engine.runner.graphs
    probe.add(batch, prompt_len, steps + 16)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.sequences.values()):
        engine.step()
    for _ in range(3):
        engine.step()
    timer = _PhaseTimer()
    saved = (engine.scheduler.schedule, engine._postprocess, model_runner.sample_on_device, PendingStep.result,
             graphs.run if graphs else None, dict(graphs.graphs) if graphs else None)
    engine.scheduler.schedule = timer.wrap("schedule", engine.scheduler.schedule)
    engine._postprocess = timer.wrap("post-process", engine._postprocess)
    model_runner.sample_on_device = timer.wrap("sampling launches", model_runner.sample_on_device)
    PendingStep.result = timer.wrap("wait for the previous step's draws", PendingStep.result)
    if graphs is not None:
        graphs.run = timer.wrap("graph step (inputs, copies, launch)", graphs.run)
        graphs.graphs = {b: _TimedGraph(g, timer) for b, g in graphs.graphs.items()}
    try:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e3 / steps
    finally:
        (engine.scheduler.schedule, engine._postprocess, model_runner.sample_on_device, PendingStep.result) = saved[:4]
        if graphs is not None:
            graphs.run, graphs.graphs = saved[4], saved[5]
        for name in ("schedule", "_postprocess"):
            for obj in (engine.scheduler, engine):
                obj.__dict__.pop(name, None)
        if graphs is not None:
            graphs.__dict__.pop("run", None)
    probe.clear()
    phases = {k: v * 1e3 / steps for k, v in timer.seconds.items()}
    return {"batch": batch, "context": prompt_len + steps, "step_wall_ms": wall, "phases_ms": phases}


def kernel_table(probe: StepProbe, kind: str, out_dir: Path) -> list[dict]:
    """torch.profiler over one step of `kind` (prefill, or decode<batch> such as decode1, decode256;
    decode<batch>:<prompt_len> for other contexts than 512): the CUDA kernels by total time."""
    from torch.profiler import ProfilerActivity, profile

    engine = probe.engine
    if kind == "prefill":
        probe.add(16, 512, 4)
    else:
        batch, _, prompt_len = kind.removeprefix("decode").partition(":")
        probe.add(int(batch), int(prompt_len or 512), 16)
        while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.sequences.values()):
            engine.step()
        engine.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        engine.step()
        torch.cuda.synchronize()
    probe.clear()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
    (out_dir / f"kernels-{kind.replace(':', '-')}.txt").write_text(table)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t:
            rows.append({"name": e.key[:90], "count": e.count, "total_ms": t / 1e3})
    rows.sort(key=lambda r: -r["total_ms"])
    return rows[:15]


def _kernel_tables(probe: StepProbe, kinds: list[str], out_dir: Path) -> dict[str, list[dict]]:
    """`kernel_table` of each kind of step, its top kernels printed."""
    tables = {}
    for kind in kinds:
        tables[kind] = kernel_table(probe, kind, out_dir)
        print(f"\ntop kernels, {kind} step:")
        for r in tables[kind][:12]:
            print(f"  {r['total_ms']:8.3f} ms  x{r['count']:<5d} {r['name']}")
    return tables


def prefill_tile_sweep(engine: LLMEngine) -> list[dict]:
    """paged_prefill on one layer's shapes (16 x 512 fresh prompts) for several tile sizes, against
    torch SDPA (flash, causal, GQA) on the same rows laid out densely."""
    cfg = engine.runner.model_config
    dev = engine.runner.device
    dtype = engine.runner.dtype
    page, n, length = engine.runner.block_size, 16, 512
    blocks = length // page
    k_cache, v_cache = (torch.randn(n * blocks + 1, page, cfg.num_kv_heads, cfg.head_dim, device=dev, dtype=dtype)
                        for _ in range(2))
    starts = [i * length for i in range(n + 1)]
    tables = torch.arange(n * blocks, device=dev).view(n, blocks)
    meta = attention.AttentionMetadata(
        slot_mapping=torch.arange(n * length, device=dev), block_tables=tables,
        context_lens=torch.full((n,), length, device=dev), query_start=torch.tensor(starts, device=dev),
        num_decodes=0, max_decode_context_len=0, query_start_host=starts, context_lens_host=[length] * n)
    q = torch.randn(n * length, cfg.num_heads, cfg.head_dim, device=dev, dtype=dtype)
    out = torch.empty_like(q)
    scale = cfg.query_pre_attn_scalar ** -0.5
    rows = []
    ref = attention.paged_prefill(q, k_cache, v_cache, meta, scale, None, None, torch.empty_like(q)).float()
    for bm, bn, warps, stages in [(64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2),
                                  (64, 64, 4, 3), (32, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 3)]:
        tiles = attention.KernelTiles(bm, bn, warps, stages)
        name = f"{bm}x{bn} w{warps} s{stages}"
        try:
            ms = _gpu_ms(lambda: attention.paged_prefill(q, k_cache, v_cache, meta, scale, None, None, out, tiles))
            err = float((out.float() - ref).abs().max())
            rows.append({"tiles": name, "ms": ms, "max_abs_diff": err})
        except Exception as exc:  # a tile that does not fit shared memory: report it, go on
            rows.append({"tiles": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
    values = v_cache[:n * blocks].view(n, length, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    keys = k_cache[:n * blocks].view(n, length, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    dense_q = q.view(n, length, cfg.num_heads, cfg.head_dim).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ms = _gpu_ms(lambda: sdpa(dense_q, keys, values, is_causal=True, scale=scale, enable_gqa=True))
    dense = sdpa(dense_q, keys, values, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2).reshape_as(q)
    rows.append({"tiles": "torch SDPA dense (reference)", "ms": ms,
                 "max_abs_diff": float((dense.float() - ref).abs().max())})
    flops = 4 * n * cfg.num_heads * cfg.head_dim * length * length / 2
    for r in rows:
        if "ms" in r:
            r["tflops"] = flops / (r["ms"] / 1e3) / 1e12
    return rows


def _print_prefill_sweep(rows: list[dict]) -> None:
    for r in rows:
        print(f"prefill attention {r['tiles']:30s} " + (f"{r['ms']:.3f} ms {r['tflops']:.0f} TFLOP/s "
              f"diff {r['max_abs_diff']:.2e}" if "ms" in r else r["error"]), flush=True)


def _graph_us(fn, launches: int) -> float:
    """Microseconds per call of fn(), from a CUDA graph of `launches` calls (as a decode step replays
    them: no launch overhead, one layer after another)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    return _gpu_ms(graph.replay, 10) * 1e3 / launches


DECODE_SWEEP = [(256, 32, 4, 3, "node"), (256, 32, 4, 3, "leaf"), (256, 64, 4, 2, "node"), (256, 64, 4, 2, "leaf"),
                (256, 16, 4, 3, "leaf"), (256, 32, 8, 3, "node"), (128, 32, 4, 3, "node"), (512, 32, 4, 3, "node"),
                (512, 32, 4, 3, "leaf"), (512, 64, 4, 2, "node"), (1024, 32, 4, 3, "node")]


def decode_tile_sweep(engine: LLMEngine, copy_gbps: float,
                      shapes: tuple[tuple[int, int], ...] = ((256, 512), (1, 384), (1, 160))) -> list[dict]:
    """paged_decode on one layer's shapes (batch, keys) for several node lengths and tiles, one
    program per node or per leaf (the modes of `attention.paged_decode`), timed in CUDA
    graphs of 34 launches (the combine kernel included where the mode has one): GB/s of K/V against
    the copy rate."""
    cfg = engine.runner.model_config
    dev, dtype, page = engine.runner.device, engine.runner.dtype, engine.runner.block_size
    layers = cfg.num_layers
    rows = []
    for batch, ctx in shapes:
        blocks = -(-ctx // page)
        k_cache, v_cache = (torch.randn(batch * blocks + 1, page, cfg.num_kv_heads, cfg.head_dim, device=dev,
                                        dtype=dtype) for _ in range(2))
        tables = torch.randperm(batch * blocks, device=dev).view(batch, blocks)
        lens = torch.full((batch,), ctx, device=dev)
        q = torch.randn(batch, cfg.num_heads, cfg.head_dim, device=dev, dtype=dtype)
        out = torch.empty_like(q)
        kv_bytes = 2 * batch * ctx * cfg.num_kv_heads * cfg.head_dim * k_cache.element_size()
        for node, bn, warps, stages, mode in DECODE_SWEEP:
            tiles = attention.KernelTiles(0, bn, warps, stages)
            name = f"node {node} n{bn} w{warps} s{stages} {mode}"
            try:
                us = _graph_us(lambda: attention.paged_decode(q, k_cache, v_cache, tables, lens, 1024, 0.0625, None,
                                                              None, node, out, tiles=tiles, leaf_mode=mode == "leaf"),
                               layers)
                gbps = kv_bytes / (us / 1e6) / 1e9
                rows.append({"batch": batch, "context": ctx, "config": name, "us": us, "gbps": gbps,
                             "pct_copy": 100 * gbps / copy_gbps})
            except Exception as exc:
                rows.append({"batch": batch, "context": ctx, "config": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
    return rows


def _print_decode_sweep(rows: list[dict]) -> None:
    for r in rows:
        print(f"decode attention batch {r['batch']:3d} ctx {r['context']} {r['config']:28s} " +
              (f"{r['us']:8.1f} us {r['gbps']:6.0f} GB/s {r['pct_copy']:5.1f}% of copy" if "us" in r else r["error"]),
              flush=True)


def host_profile(probe: StepProbe, out_dir: Path, batch: int = 256, steps: int = 24) -> None:
    """cProfile of back-to-back decode steps at `batch`: where the host's time per step goes."""
    import cProfile

    engine = probe.engine
    probe.add(batch, 512, steps + 8)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.sequences.values()):
        engine.step()
    engine.step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        engine.step()
    torch.cuda.synchronize()
    profiler.disable()
    probe.clear()
    _write_host_profile(profiler, out_dir / f"host-decode{batch}.txt")


def copy_rate_gbps() -> float:
    a = torch.empty(1 << 30, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = _gpu_ms(lambda: b.copy_(a), 10)
    return 2 * a.numel() * 2 / (ms / 1e3) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench/configs/gemma-3-4b-it")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--out", type=Path, required=True, help="folder for profile.json and kernels-*.txt")
    parser.add_argument("--skip-sweeps", action="store_true", help="leave out the attention tile sweeps")
    parser.add_argument("--prefill-sweep-only", action="store_true",
                        help="only the prefill attention sweep (tile sizes, against SDPA)")
    parser.add_argument("--decode-sweep-only", action="store_true",
                        help="only the decode attention sweep (modes and tiles at W2's batches, and batch 1)")
    parser.add_argument("--decode", default="1:128:64,256:512:24",
                        help="decode steps to time, batch:prompt_len:steps,... (wall against GPU busy per step)")
    parser.add_argument("--host-split", default="",
                        help="batch:prompt_len:steps,...: where the host's time goes in back-to-back decode steps")
    parser.add_argument("--mixed", action="store_true",
                        help="also time W2's mixed step (240 decodes + 16 fresh 512-token prompts) and list its kernels")
    parser.add_argument("--decode-only", action="store_true",
                        help="only the decode steps of --decode (no prefill, sweeps, host profile or kernel tables)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("step_profile needs a CUDA GPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    engine = LLMEngine(EngineConfig(model=args.model, load_format="random", device="cuda", dtype="bfloat16",
                                    max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=1024,
                                    max_queue_len=1 << 20, quantization=args.quantization))
    probe = StepProbe(engine, 255_000)
    report: dict = {"device": torch.cuda.get_device_name(), "quantization": args.quantization}
    if args.decode_sweep_only:
        report["copy_gbps"] = copy_rate_gbps()
        report["decode_tiles"] = decode_tile_sweep(engine, report["copy_gbps"],
                                                   ((256, 512), (256, 768), (128, 640), (64, 640), (1, 384)))
        _print_decode_sweep(report["decode_tiles"])
        (args.out / "profile.json").write_text(json.dumps(report, indent=2))
        return 0
    if args.prefill_sweep_only:
        report["prefill_tiles"] = prefill_tile_sweep(engine)
        _print_prefill_sweep(report["prefill_tiles"])
        (args.out / "profile.json").write_text(json.dumps(report, indent=2))
        return 0
    report["decode"] = [decode_steps(probe, *map(int, spec.split(":"))) for spec in args.decode.split(",")]
    for d in report["decode"]:
        print(f"decode batch {d['batch']:3d} ctx ~{d['context']}: step {d['step_wall_ms']:.2f} ms, GPU busy "
              f"{d['gpu_busy_ms']:.2f} ms, host adds {d['host_ms']:.2f} ms ({d['compiled_while_timed']})", flush=True)
    report["host_split"] = [host_split(probe, *map(int, spec.split(":"))) for spec in args.host_split.split(",") if spec]
    for h in report["host_split"]:
        print(f"host, decode batch {h['batch']} ctx ~{h['context']}: step {h['step_wall_ms']:.2f} ms; "
              + ", ".join(f"{k} {v:.2f}" for k, v in h["phases_ms"].items()), flush=True)
    if args.mixed:
        report["mixed"] = m = mixed_step(probe, args.out)
        print(f"mixed step, {m['decodes']} decodes + {m['prompt_rows']} prompt rows: {m['step_wall_ms']:.1f} ms, "
              f"GPU busy {m['gpu_busy_ms']:.1f} ms, host adds {m['host_ms']:.1f} ms (decode-only step "
              f"{m['decode_only_step_ms']:.2f} ms)", flush=True)
    if args.decode_only:
        kinds = [f"decode{spec.split(':')[0]}:{spec.split(':')[1]}" for spec in args.decode.split(",")]
        report["kernels"] = _kernel_tables(probe, kinds, args.out)
        (args.out / "profile.json").write_text(json.dumps(report, indent=2))
        return 0
    report["prefill_step_ms"] = {"kernel": prefill_step_ms(probe, True), "pytorch": prefill_step_ms(probe, False)}
    print(f"prefill step 16 x 512: kernel {report['prefill_step_ms']['kernel']:.1f} ms, "
          f"PyTorch path {report['prefill_step_ms']['pytorch']:.1f} ms", flush=True)
    report["first_token"] = first_token_step(probe, args.out)
    ft = report["first_token"]
    print(f"first token of a {ft['prompt_len']}-token prompt: step {ft['step_wall_ms']:.2f} ms, GPU busy "
          f"{ft['gpu_busy_ms']:.2f} ms, host adds {ft['host_ms']:.2f} ms", flush=True)
    report["prefill_tiles"] = [] if args.skip_sweeps else prefill_tile_sweep(engine)
    _print_prefill_sweep(report["prefill_tiles"])
    report["copy_gbps"] = copy_rate_gbps()
    report["decode_tiles"] = [] if args.skip_sweeps else decode_tile_sweep(engine, report["copy_gbps"])
    _print_decode_sweep(report["decode_tiles"])
    host_profile(probe, args.out)
    report["kernels"] = _kernel_tables(probe, ["prefill", "decode1", "decode256"], args.out)
    (args.out / "profile.json").write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
