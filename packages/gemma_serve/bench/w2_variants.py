"""W2 under several engine settings on one engine, interleaved, so that the settings are compared in
one call on the same engine and the same (power-capped) GPU (GPU). Every run has prompts of its own
(the same shapes, other random ids): the engine's prefix cache would skip prompts it has seen.

W2 is engine_bench's throughput workload: 1024 requests of 512 random prompt tokens and 256 new
tokens, at most 256 running, random bf16 weights in Gemma 3 4B's shapes. On the H200 its prompt steps
run under the 700 W power cap (SM clock 1,590-1,890 MHz instead of 1,980), which moves a W2 rate by a
few percent from one run to the next: a setting measured in another run, or after a different
warm-up, is not comparable. Here every variant gets a warm-up run, then the timed runs go round-robin
(A B C A B C ...), each with its SM clock and power sampled. In the tenth H200 run: qkv_heads=4
15,144 / 15,015 tok/s against 15,009 / 14,908 with one head (now the default), budget=4096 and
2048 1.6% and 11% slower.

A variant is `base` (the engine as configured) or comma-separated knob=value pairs:
  qkv_heads=N      heads of one token per program of the QK-norm/RoPE/cache-write kernel on prompt
                   steps (fused_kernels.QKV_HEADS_PER_PROGRAM, GEMMA_QKV_HEADS_PER_PROGRAM)
  qkv_warps=N      warps of such a program when it takes several heads (fused_kernels.QKV_GROUP_WARPS)
  budget=N         tokens per step (the scheduler's max_num_batched_tokens, at most the engine's 8192)
  overlap_eager=0|1  eager (prefill, mixed) steps overlapped (model_runner.OVERLAP_EAGER)
  node_len=N       keys per node of the decode attention (attention.MIN_DECODE_NODE_LEN); the CUDA
                   graphs bake it in, so it needs --fresh-engines

--fresh-engines builds one engine per run (the variant's knobs set first, a short warm-up run, then
the timed one), A B A B ..., for settings an engine fixes when it starts.

    PYTHONPATH=packages python3 -m gemma_serve.bench.w2_variants --variants "base;qkv_heads=4;budget=4096" \\
        --repeats 2 --out w2-variants.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from gemma_serve.bench.engine_bench import _prompts, measure_ceilings, run_requests, step_counts, workload_bound
from gemma_serve.bench.gpu_monitor import ClockSampler
from gemma_serve.engine import attention, fused_kernels, model_runner
from gemma_serve.engine.compile_log import CompileLog
from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.gc_freeze import freeze_long_lived, unfreeze
from gemma_serve.engine.llm_engine import LLMEngine
from gemma_serve.engine.sampling_params import SamplingParams


def _module_knob(module, name: str, cast: Callable[[str], object]):
    def apply(engine: LLMEngine, value: str) -> Callable[[], None]:
        old = getattr(module, name)
        setattr(module, name, cast(value))
        return lambda: setattr(module, name, old)
    return apply


def _budget(engine: LLMEngine, value: str) -> Callable[[], None]:
    scheduler = engine.scheduler
    old = scheduler.max_num_batched_tokens
    if not 0 < int(value) <= engine.config.max_num_batched_tokens:
        raise ValueError(f"budget={value}: must be in 1..{engine.config.max_num_batched_tokens} (the engine's)")
    scheduler.max_num_batched_tokens = int(value)
    return lambda: setattr(scheduler, "max_num_batched_tokens", old)


KNOBS = {
    "qkv_heads": _module_knob(fused_kernels, "QKV_HEADS_PER_PROGRAM", int),
    "qkv_warps": _module_knob(fused_kernels, "QKV_GROUP_WARPS", int),
    "budget": _budget,
    "overlap_eager": _module_knob(model_runner, "OVERLAP_EAGER", lambda v: v == "1"),
    "node_len": _module_knob(attention, "MIN_DECODE_NODE_LEN", int),
}
# Knobs read when an engine starts (its CUDA graphs bake them in).
START_KNOBS = {"node_len"}


def parse_variants(spec: str) -> list[dict[str, str]]:
    """'base;qkv_heads=4;budget=4096,qkv_heads=4' -> [{}, {'qkv_heads': '4'}, {...}]."""
    variants = []
    for part in spec.split(";"):
        part = part.strip()
        if not part or part == "base":
            variants.append({})
            continue
        knobs = dict(kv.split("=", 1) for kv in part.split(","))
        unknown = set(knobs) - set(KNOBS)
        if unknown:
            raise SystemExit(f"unknown knob(s) {sorted(unknown)}; known: {sorted(KNOBS)}")
        variants.append(knobs)
    return variants


def label(variant: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in variant.items()) or "base"


def run_variant(engine: LLMEngine, variant: dict[str, str], prompts: list[list[int]], params: SamplingParams) -> dict:
    undo = []
    try:
        for k, v in variant.items():
            undo.append(KNOBS[k](engine, v))
        with ClockSampler() as clocks, CompileLog() as compiled:
            r = run_requests(engine, prompts, params)
    finally:
        for u in reversed(undo):
            u()
    steps = r.extra["steps"]
    mixed = [s[2] for s in steps if s[0]]
    decode = [s[2] for s in steps if not s[0]]
    stats = clocks.stats()
    return {"variant": label(variant), "output_tok_s": r.output_tok_s, "wall_s": r.wall_s,
            "ttft_ms_mean": r.ttft_ms_mean, "itl_ms_p99": r.itl_ms_p99,
            "prompt_steps": len(mixed), "prompt_steps_s": sum(mixed) / 1e3, "decode_steps": len(decode),
            "decode_steps_s": sum(decode) / 1e3, "decode_step_ms_median": statistics.median(decode) if decode else None,
            "step_counts": step_counts(steps), "compiled": compiled.summary(),
            "prompt_rows": sum(row[0] for row in steps),  # all of them: no prompt came from the prefix cache
            "clocks": asdict(stats) if stats else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench/configs/gemma-3-4b-it")
    parser.add_argument("--variants", default="base;qkv_heads=4")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each variant (round-robin)")
    parser.add_argument("--requests", type=int, default=1024)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--fresh-engines", action="store_true",
                        help="one engine per run, started under the variant's knobs (for node_len)")
    args = parser.parse_args()
    variants = parse_variants(args.variants)
    if not args.fresh_engines and any(START_KNOBS & set(v) for v in variants):
        raise SystemExit(f"knobs {sorted(START_KNOBS)} are fixed when an engine starts: add --fresh-engines")
    ceil = measure_ceilings(sustained_s=0)

    def start() -> LLMEngine:
        engine = LLMEngine(EngineConfig(model=args.model, load_format="random", device="cuda", dtype="bfloat16",
                                        max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=1024,
                                        max_queue_len=1 << 20))
        freeze_long_lived()
        return engine

    engine = start()
    vocab = engine.runner.model_config.vocab_size
    params = SamplingParams(max_tokens=256, temperature=0.0, stop_token_ids=())
    warm_params = SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=())
    _, bound = workload_bound(engine, ceil, args.requests, 512, 256, 256)
    report: dict = {"device": torch.cuda.get_device_name(), "ceilings": asdict(ceil), "bound_with_prefill_tok_s": bound,
                    "requests": args.requests, "fresh_engines": args.fresh_engines, "warm_up": [], "runs": []}
    t = time.perf_counter()
    # Every run gets prompts of its own (same lengths, other random ids): the engine keeps a prefix
    # cache, and prompts it has seen would skip their prefill.
    seeds = iter(range(1000, 10_000))
    if not args.fresh_engines:
        for variant in variants:  # each setting's kernels compile (and cuBLAS picks) before any timed run
            report["warm_up"].append(run_variant(engine, variant, _prompts(64, 512, vocab, next(seeds)), warm_params))
        print(f"warm-up of {len(variants)} variants: {time.perf_counter() - t:.1f} s", flush=True)
    for rep in range(args.repeats):
        for variant in variants:
            if args.fresh_engines:
                unfreeze()
                del engine
                gc.collect()  # the runner and its CUDA graphs reference each other
                torch.cuda.empty_cache()
                undo = [KNOBS[k](None, v) for k, v in variant.items() if k in START_KNOBS]
                try:
                    engine = start()
                finally:
                    for u in reversed(undo):
                        u()
                report["warm_up"].append(run_variant(engine, variant, _prompts(64, 512, vocab, next(seeds)),
                                                     warm_params))
            run = run_variant(engine, variant, _prompts(args.requests, 512, vocab, next(seeds)), params)
            run["repeat"] = rep
            run["pct_of_bound_with_prefill"] = 100 * run["output_tok_s"] / bound
            report["runs"].append(run)
            c = run["clocks"] or {}
            print(f"{run['variant']:32s} rep {rep}: {run['output_tok_s']:9.1f} tok/s ({run['pct_of_bound_with_prefill']:.1f}% "
                  f"of {bound:.0f}); {run['prompt_rows']} prompt rows in {run['prompt_steps']} steps, {run['prompt_steps_s']:.2f} s; decode-only "
                  f"{run['decode_steps']} in {run['decode_steps_s']:.2f} s (median {run['decode_step_ms_median']:.2f} ms); "
                  f"SM {c.get('sm_clock_mean_mhz', float('nan')):.0f} MHz, capped {c.get('power_capped_pct', float('nan')):.0f}%; "
                  f"{run['compiled']}", flush=True)
            args.out.write_text(json.dumps(report, indent=1))
    print("\nvariant                           mean tok/s  runs")
    for variant in variants:
        rates = [r["output_tok_s"] for r in report["runs"] if r["variant"] == label(variant)]
        print(f"{label(variant):32s} {statistics.mean(rates):10.1f}  " + ", ".join(f"{x:.0f}" for x in rates))


if __name__ == "__main__":
    main()
