"""Offline engine benchmark: the card's ceilings, the bound of each workload, and the engine against
transformers on one machine in one run. No server in the way: this measures the engine itself.

    python -m gemma_serve.bench.engine_bench --model bench/configs/gemma-3-4b-it --out results.json

Workloads (random weights with the real shapes unless --load-format auto):
  W1  single stream: 128-token prompt, 512 new tokens; decode tok/s and TTFT
  W2  throughput: 1024 requests x (512 in, 256 out), at most 256 running; output/total tok/s, TTFT, ITL
  W3  baseline: 128 requests x (128 in, 128 out) through this engine, transformers generate() and
      transformers generate_batch(), so the ratio is measured side by side; W3's bound over
      transformers' best is the most any engine could reach against it on this card
  W4  long context (not in the default list): 64 requests x (16,384 in, 256 out), max_model_len 32,768,
      on an engine whose sliding-window layers keep only their window and on one that keeps every
      layer's whole context: KV capacity, most sequences running at once, output tok/s

W1 and W2 run once per `--quantization` (default bf16 and weight-only INT8, one engine after the
other), each against its own bound (INT8 reads half the linear layers' bytes); W3 runs on the first.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from gemma_serve.bench.gpu_monitor import ClockSampler
from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.gc_freeze import freeze_long_lived, unfreeze
from gemma_serve.engine.llm_engine import LLMEngine
from gemma_serve.engine.quantization import model_weight_bytes, model_weight_count
from gemma_serve.engine.sampling_params import SamplingParams


@dataclass
class Ceilings:
    copy_gbps: float  # bytes read + written per second, GB/s
    bf16_tflops: float  # a burst of 10 matmuls: the rate the bounds use
    # The same matmuls back to back for a few seconds (reported, not used in the bounds): under a
    # power cap the clock falls, and a long prompt-heavy run gets this rate rather than the burst's.
    bf16_tflops_sustained: float | None = None


@dataclass
class WorkloadResult:
    name: str
    requests: int
    prompt_len: int
    output_len: int
    wall_s: float
    output_tok_s: float
    total_tok_s: float
    ttft_ms_mean: float
    ttft_ms_p99: float
    itl_ms_mean: float
    itl_ms_p99: float
    bound_tok_s: float | None = None
    extra: dict = field(default_factory=dict)
    quantization: str = "none"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def measure_ceilings(sustained_s: float = 3.0) -> Ceilings:
    """A large device copy (bytes read + written) and a bf16 8192^3 matmul, medians of repeats; then
    the matmul for `sustained_s` seconds back to back (0: skip)."""
    n = 1 << 30  # 2 GiB of bf16 per buffer
    a = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    copy = 2 * a.numel() * a.element_size() / statistics.median(times[2:]) / 1e9
    del a, b
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        m @ k
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    flops = 2 * 8192 ** 3 / statistics.median(times[2:]) / 1e12
    sustained = sustained_matmul_tflops(m, k, sustained_s) if sustained_s > 0 else None
    del m, k
    torch.cuda.empty_cache()
    return Ceilings(copy, flops, sustained)


def sustained_matmul_tflops(m: torch.Tensor, k: torch.Tensor, seconds: float, batch: int = 20) -> float:
    """[n, n] @ [n, n] back to back for `seconds` of GPU time, in batches of `batch` products timed by
    events; the rate of the last third of the batches (the clock has settled by then)."""
    n = m.shape[0]
    rates = []
    elapsed = 0.0
    while elapsed < seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(batch):
            m @ k
        end.record()
        end.synchronize()
        s = start.elapsed_time(end) / 1e3
        elapsed += s
        rates.append(2 * n ** 3 * batch / s / 1e12)
    return statistics.median(rates[-max(1, len(rates) // 3):])


def _param_bytes(engine: LLMEngine) -> int:
    """Weight bytes a decode step reads: parameters, plus 8-bit matrices and scales when quantized."""
    return model_weight_bytes(engine.runner.model)


def _kv_bytes_per_token(engine: LLMEngine) -> int:
    cfg = engine.runner.model_config
    itemsize = torch.finfo(engine.runner.dtype).bits // 8
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize


def decode_bound(engine: LLMEngine, ceil: Ceilings, batch: int, avg_context: int) -> float:
    """Tokens/s that bandwidth (weights + KV read once per step) and matmul rate allow at this batch."""
    step_bytes = _param_bytes(engine) + batch * avg_context * _kv_bytes_per_token(engine)
    params = model_weight_count(engine.runner.model)
    # The copy rate counts bytes read + written, i.e. bytes moved per second: the same yardstick as
    # ARCHITECTURE.md's 388 tok/s for 7.76 GB of bf16 weights on a 3.0 TB/s H100.
    t_bytes = step_bytes / (ceil.copy_gbps * 1e9)
    t_flops = 2 * params * batch / (ceil.bf16_tflops * 1e12)
    return batch / max(t_bytes, t_flops)


def prefill_bound_s(engine: LLMEngine, ceil: Ceilings, prompt_tokens: int) -> float:
    """Seconds the prompts' matmul FLOPs need at the measured bf16 rate: 2 FLOPs per decoder weight
    per prompt token. The embedding table is left out (a prompt row looks its token up; only the
    last row of a prompt runs the LM head, and that row is counted as the first decode step's), as
    are attention's FLOPs (a few percent at these lengths)."""
    model = engine.runner.model
    weights = model_weight_count(model) - model.embed_tokens.weight.numel()
    return 2 * weights * prompt_tokens / (ceil.bf16_tflops * 1e12)


def workload_bound(engine: LLMEngine, ceil: Ceilings, requests: int, prompt_len: int, output_len: int,
                   max_running: int) -> tuple[float, float]:
    """(decode bound, bound with the prompts) in output tok/s for `requests` x (prompt_len in,
    output_len out), at most `max_running` at once. Decode steps run min(requests, max_running)
    sequences at the average context (prompt + half the output); the second bound adds the
    prompts' FLOPs, for an engine that runs prompts and decode steps in turn (no overlap)."""
    decode = decode_bound(engine, ceil, min(requests, max_running), prompt_len + output_len // 2)
    out_tokens = requests * output_len
    seconds = out_tokens / decode + prefill_bound_s(engine, ceil, requests * prompt_len)
    return decode, out_tokens / seconds


def run_requests(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams,
                 outputs: dict[str, list[int]] | None = None) -> WorkloadResult:
    """Add everything at t0 and step until done, recording when each request's tokens appear (and
    the tokens themselves into `outputs`). extra["max_running"]: most sequences running at once;
    extra["prefill_steps_s"] / ["decode_steps_s"]: the wall time of steps that scheduled prompt rows
    and of decode-only steps (from one step's return to the next's; with overlapped decode steps a
    step's time is its host side plus waiting for the step before it, so the split is approximate);
    extra["steps"]: per step, [prompt rows, sequences scheduled, wall ms], to see which steps are slow."""
    t0 = time.perf_counter()
    times: dict[str, list[float]] = {}
    for i, p in enumerate(prompts):
        engine.add_request(f"w{i}", p, params)
        times[f"w{i}"] = []
    max_running = 0
    split = {"prefill_steps_s": 0.0, "decode_steps_s": 0.0}
    steps: list[list[float]] = []
    last = t0
    while engine.has_unfinished():
        # No device sync here: step() returns once its tokens are on the host, and an overlapped
        # decode step must stay queued on the GPU while the host handles the previous one.
        deltas = engine.step()
        now = time.perf_counter()
        split["prefill_steps_s" if engine.last_step_prefill_rows else "decode_steps_s"] += now - last
        steps.append([engine.last_step_prefill_rows, engine.last_step_num_seqs, round((now - last) * 1e3, 3)])
        last = now
        max_running = max(max_running, len(engine.scheduler.running))
        for out in deltas:
            times[out.request_id].extend([now] * len(out.new_token_ids))
            if outputs is not None:
                outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
    wall = time.perf_counter() - t0
    ttft = [(t[0] - t0) * 1e3 for t in times.values() if t]
    itl = [(b - a) * 1e3 for t in times.values() for a, b in zip(t, t[1:])]
    out_tokens = sum(len(t) for t in times.values())
    prompt_tokens = sum(len(p) for p in prompts)
    return WorkloadResult("", len(prompts), len(prompts[0]), params.max_tokens, wall, out_tokens / wall,
                          (out_tokens + prompt_tokens) / wall, statistics.mean(ttft), _p99(ttft),
                          statistics.mean(itl) if itl else 0.0, _p99(itl) if itl else 0.0,
                          extra={"max_running": max_running, **split, "steps": steps})


def step_counts(steps: list[list[float]]) -> str:
    """'N steps with prompt rows (mean R rows, M ms), K decode-only (mean S sequences, D ms)' from the
    per-step log of `run_requests`."""
    mixed = [s for s in steps if s[0]]
    decode = [s for s in steps if not s[0]]

    def mean(rows: list[list[float]], i: int) -> float:
        return statistics.mean(s[i] for s in rows) if rows else 0.0
    return (f"{len(mixed)} steps with prompt rows: mean {mean(mixed, 0):.0f} rows, {mean(mixed, 1):.0f} sequences, "
            f"{mean(mixed, 2):.1f} ms; {len(decode)} decode-only: mean {mean(decode, 1):.0f} sequences, "
            f"{mean(decode, 2):.2f} ms")


def _p99(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


# Random text ids stay below Gemma 3's image tokens (<start_of_image> 255999 and up): an image token
# in a text prompt is refused by the engine.
TEXT_ID_LIMIT = 255_990


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, min(vocab, TEXT_ID_LIMIT) - 10, (n, length), generator=g).tolist()


def run_transformers(model_dir: str, prompts: list[list[int]], new_tokens: int, repeats: int = 1) -> dict:
    """transformers on the same workload: generate() with all prompts in one batch (`repeats` times,
    keeping the best: on the H200 its first W3 run gave 1,025 tok/s and the next two 2,674 and 2,750),
    and
    generate_batch() (its continuous batching) with defaults, once (it is the slower of the two)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    text = config.get_text_config()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(text, dtype=torch.bfloat16).eval()
    results = {}
    ids = torch.tensor(prompts, device="cuda")
    with torch.no_grad():
        model.generate(ids[:2, :8], max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0)
        _sync()
        walls = []
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0, eos_token_id=None)
            _sync()
            walls.append(time.perf_counter() - t)
    generated = (out.shape[1] - ids.shape[1]) * out.shape[0]
    results["generate"] = {"wall_s": min(walls), "output_tok_s": generated / min(walls), "batch": len(prompts),
                           "runs_tok_s": [generated / w for w in walls]}
    try:
        gen_config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      eos_token_id=-1, pad_token_id=0)
        t = time.perf_counter()
        batch_out = model.generate_batch(inputs=prompts, generation_config=gen_config, progress_bar=False)
        _sync()
        wall = time.perf_counter() - t
        tokens = sum(len(r.generated_tokens) for r in batch_out.values())
        results["generate_batch"] = {"wall_s": wall, "output_tok_s": tokens / wall}
    except Exception as exc:  # report, do not hide: the API moves between transformers releases
        results["generate_batch"] = {"error": f"{type(exc).__name__}: {exc}"}
    del model
    torch.cuda.empty_cache()
    return results


def run_long_context(base: dict, requests: int = 64, prompt_len: int = 16_384, output_len: int = 256,
                     max_model_len: int = 32_768) -> list[WorkloadResult]:
    """W4: the same long prompts on an engine whose sliding-window layers keep only their window and
    on one that keeps every layer's whole context (`base`: the other EngineConfig fields). Each row:
    KV capacity in tokens (full-attention pool; window pool), most sequences running at once, output
    tok/s; and whether both engines produced the same tokens."""
    rows, tokens = [], []
    for window_kv in (True, False):
        engine = LLMEngine(EngineConfig(**base, max_model_len=max_model_len, sliding_window_kv=window_kv))
        vocab = engine.runner.model_config.vocab_size
        # Warm-up: the long-prompt kernel variants compile here, not in the timed run (the first
        # engine would otherwise pay for both).
        run_requests(engine, _prompts(2, prompt_len, vocab, 5), SamplingParams(max_tokens=4, temperature=0.0,
                                                                               stop_token_ids=()))
        outputs: dict[str, list[int]] = {}
        r = run_requests(engine, _prompts(requests, prompt_len, vocab, 4),
                         SamplingParams(max_tokens=output_len, temperature=0.0, stop_token_ids=()), outputs)
        r.name = f"W4 long context {requests} x {prompt_len}/{output_len}, window KV {'on' if window_kv else 'off'}"
        runner = engine.runner
        r.extra.update(kv_tokens=runner.num_blocks * runner.block_size,
                       kv_window_tokens=runner.num_window_blocks * runner.block_size,
                       sliding_window_kv=runner.kv_layout.window is not None)
        rows.append(r)
        tokens.append([outputs[k] for k in sorted(outputs)])
        del engine, runner  # the next engine sizes its KV pool from the memory these free
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    rows[0].extra["same_tokens_as_whole_context"] = tokens[0] == tokens[1]
    return rows


# Suffix of a --quantization entry whose engine keeps the embedding / LM head in bf16.
HEAD16 = ":head16"


def _set_bounds(r: WorkloadResult, decode: float, with_prefill: float) -> None:
    """The decode bound is the table's; the one with the prompts' FLOPs is the one a whole run of
    prompts and decode steps can reach. prefill_bound_s: the prompts' share of the latter."""
    r.bound_tok_s = decode
    r.extra["bound_with_prefill_tok_s"] = with_prefill
    r.extra["pct_of_bound_with_prefill"] = 100 * r.output_tok_s / with_prefill
    out_tokens = r.requests * r.output_len
    r.extra["prefill_bound_s"] = out_tokens / with_prefill - out_tokens / decode


def run_decode_workloads(engine: LLMEngine, ceil: Ceilings, wanted: set[str], w2_requests: int,
                         w2_repeats: int = 1, w2_lens: tuple[int, int] = (512, 256)) -> list[WorkloadResult]:
    """W1 and W2 on one engine, each with the bound of that engine's weight bytes. W2 runs
    `w2_repeats` times, each with prompts of its own (the prefix cache would skip repeated ones):
    under the H200's power cap one W2 run moves by a few percent from the next. `w2_lens`: prompt
    and output tokens of a W2 request (tests shrink them)."""
    vocab = engine.runner.model_config.vocab_size
    greedy = dict(temperature=0.0, stop_token_ids=())
    quantization = engine.runner.config.quantization
    rows = []
    if "W1" in wanted:
        run_requests(engine, _prompts(1, 128, vocab, 0), SamplingParams(max_tokens=16, **greedy))  # warm-up
        r = run_requests(engine, _prompts(1, 128, vocab, 1), SamplingParams(max_tokens=512, **greedy))
        r.name = "W1 single stream 128/512"
        # Decode rate excludes the prefill: (tokens - 1) over the time after the first token.
        decode_s = r.wall_s - r.ttft_ms_mean / 1e3
        r.extra["decode_tok_s"] = 511 / decode_s
        r.bound_tok_s = decode_bound(engine, ceil, 1, 128 + 256)
        rows.append(r)
    for run in range(w2_repeats if "W2" in wanted else 0):
        with ClockSampler() as clocks:
            r = run_requests(engine, _prompts(w2_requests, w2_lens[0], vocab, 2 if run == 0 else 2000 + run),
                             SamplingParams(max_tokens=w2_lens[1], **greedy))
        stats = clocks.stats()
        r.extra["clocks"] = asdict(stats) if stats else None
        r.name = f"W2 throughput {w2_requests} x {w2_lens[0]}/{w2_lens[1]}, <=256 running"
        if w2_repeats > 1:
            r.name += f" (run {run + 1} of {w2_repeats})"
            r.extra["w2_run"] = run
        _set_bounds(r, *workload_bound(engine, ceil, w2_requests, *w2_lens, 256))
        r.extra["preemptions"] = engine.stats().extra.get("num_preemptions")
        rows.append(r)
    for r in rows:
        r.quantization = quantization
    return rows


def w2_summary(rows: list[WorkloadResult]) -> dict[str, dict]:
    """Per quantization with several W2 runs: each run's output tok/s and % of the bound with the
    prompts' FLOPs (of that run's engine and ceilings), and their medians."""
    out: dict[str, dict] = {}
    for r in rows:
        if "w2_run" in r.extra:
            s = out.setdefault(r.quantization, {"output_tok_s": [], "pct_of_bound_with_prefill": []})
            s["output_tok_s"].append(r.output_tok_s)
            s["pct_of_bound_with_prefill"].append(r.extra["pct_of_bound_with_prefill"])
    for s in out.values():
        s["median_output_tok_s"] = statistics.median(s["output_tok_s"])
        s["median_pct_of_bound_with_prefill"] = statistics.median(s["pct_of_bound_with_prefill"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench/configs/gemma-3-4b-it")
    parser.add_argument("--load-format", default="random", choices=["random", "auto"])
    parser.add_argument("--workloads", default="W1,W2,W3")
    parser.add_argument("--baseline-repeats", type=int, default=3,
                        help="W3: times transformers' generate() runs; its best counts (default 3)")
    parser.add_argument("--w2-requests", type=int, default=1024)
    parser.add_argument("--w2-repeats", type=int, default=1,
                        help="W2 runs per engine, each with new prompts; the summary gives every run and the median")
    parser.add_argument("--quantization", default="none,int8",
                        help="engines to run W1 and W2 on, in order: none (bf16), int8, fp8 (compute 8.9+); "
                             f"with '{HEAD16}' (e.g. int8{HEAD16}) the embedding / LM head stays bf16")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("engine_bench needs a CUDA GPU", file=sys.stderr)
        return 2
    quantizations = args.quantization.split(",")
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": args.model,
                    "load_format": args.load_format, "quantizations": quantizations, "workloads": {}}
    ceil = measure_ceilings()
    report["ceilings"] = asdict(ceil)
    print(f"device {report['device']}: copy {ceil.copy_gbps:.0f} GB/s (read+write), bf16 {ceil.bf16_tflops:.0f} TFLOP/s "
          f"(burst; the bounds use it), {ceil.bf16_tflops_sustained or float('nan'):.0f} TFLOP/s sustained over 3 s",
          flush=True)
    wanted = set(args.workloads.split(","))
    rows = []
    w3_prompts = None
    report["engines"] = {}
    for i, quantization in enumerate(quantizations):
        t = time.perf_counter()
        method = quantization.removesuffix(HEAD16)
        engine = LLMEngine(EngineConfig(model=args.model, load_format=args.load_format, device="cuda",
                                        dtype="bfloat16", max_num_seqs=256, max_num_batched_tokens=8192,
                                        max_model_len=1024, max_queue_len=1 << 20, quantization=method,
                                        quantize_lm_head=not quantization.endswith(HEAD16)))
        start_s = time.perf_counter() - t
        report["engines"][quantization] = {"start_s": start_s, "weight_bytes": _param_bytes(engine),
                                           "kv_blocks": engine.runner.num_blocks,
                                           "kv_window_blocks": engine.runner.num_window_blocks}
        if i == 0:
            report["engine_start_s"] = start_s
            report["param_bytes"] = _param_bytes(engine)
        print(f"engine quantization={quantization}: weights {_param_bytes(engine) / 1e9:.2f} GB, "
              f"{engine.runner.num_blocks} KV blocks ({engine.runner.num_window_blocks} more for sliding-window "
              f"layers), started in {start_s:.1f} s", flush=True)
        freeze_long_lived()  # as AsyncEngine.start() does when serving
        for r in run_decode_workloads(engine, ceil, wanted, args.w2_requests, args.w2_repeats):
            r.quantization = quantization  # the engine's label, LM head suffix included
            rows.append(r)
        if i == 0 and "W3" in wanted:
            vocab = engine.runner.model_config.vocab_size
            w3_prompts = _prompts(128, 128, vocab, 3)
            w3_params = SamplingParams(max_tokens=128, temperature=0.0, stop_token_ids=())
            # Warm-up on other prompts of the same shapes (the prompt kernels of a fresh engine
            # compile on first use), as transformers gets its best of `--baseline-repeats` runs.
            run_requests(engine, _prompts(128, 128, vocab, 6), SamplingParams(max_tokens=4, temperature=0.0,
                                                                               stop_token_ids=()))
            r = run_requests(engine, w3_prompts, w3_params)
            r.name = "W3 ours 128 x 128/128"
            _set_bounds(r, *workload_bound(engine, ceil, 128, 128, 128, 256))
            r.quantization = quantization
            rows.append(r)
        unfreeze()
        del engine
        gc.collect()  # the runner and its CUDA graphs reference each other
        torch.cuda.empty_cache()
    if "W4" in wanted:
        base = dict(model=args.model, load_format=args.load_format, device="cuda", dtype="bfloat16",
                    max_num_seqs=256, max_num_batched_tokens=8192, max_queue_len=1 << 20)
        for r in run_long_context(base):
            print(f"{r.name}: {r.output_tok_s:.1f} out tok/s, at most {r.extra['max_running']} running, KV "
                  f"{r.extra['kv_tokens']} tokens (+{r.extra['kv_window_tokens']} in the window pool)", flush=True)
            rows.append(r)
    if w3_prompts is not None:
        r = next(r for r in rows if r.name.startswith("W3"))
        hf = run_transformers(args.model, w3_prompts, 128, args.baseline_repeats)
        report["transformers_W3"] = hf
        best = max(v.get("output_tok_s", 0.0) for v in hf.values())
        r.extra["transformers_best_tok_s"] = best
        r.extra["speedup_vs_transformers"] = r.output_tok_s / best if best else None
        # The most any engine could reach against this baseline on this card: W3's bound over it.
        r.extra["bound_vs_transformers"] = r.extra["bound_with_prefill_tok_s"] / best if best else None
    # Each quantized engine against the first (bf16) on the same workload.
    for r in rows:
        base = next((b for b in rows if b.name == r.name and b.quantization == quantizations[0]), None)
        if base is not None and r is not base:
            rate, base_rate = (x.extra.get("decode_tok_s", x.output_tok_s) for x in (r, base))
            r.extra[f"speedup_vs_{quantizations[0]}"] = rate / base_rate
    report["workloads"] = [asdict(r) for r in rows]
    print(f"\n{'workload':44s} {'quant':>5s} {'out tok/s':>10s} {'total tok/s':>11s} {'TTFT ms':>9s} {'ITL ms':>8s} "
          f"{'bound tok/s':>11s} {'% bound':>8s} {'speedup':>8s}")
    for r in rows:
        rate = r.extra.get("decode_tok_s", r.output_tok_s)
        pct = f"{100 * rate / r.bound_tok_s:.1f}" if r.bound_tok_s else "-"
        speedup = r.extra.get(f"speedup_vs_{quantizations[0]}")
        speedup = f"{speedup:.2f}x" if speedup else "-"
        print(f"{r.name:44s} {r.quantization:>5s} {rate:10.1f} {r.total_tok_s:11.1f} {r.ttft_ms_mean:9.1f} "
              f"{r.itl_ms_mean:8.2f} {(r.bound_tok_s or 0):11.0f} {pct:>8s} {speedup:>8s}")
    for r in rows:
        if "bound_with_prefill_tok_s" in r.extra:
            print(f"{r.name} {r.quantization}: bound with the prompts' FLOPs added "
                  f"{r.extra['bound_with_prefill_tok_s']:.0f} tok/s, {r.extra['pct_of_bound_with_prefill']:.1f}% of it; "
                  f"steps with prompt rows {r.extra['prefill_steps_s']:.2f} s (the prompts' FLOPs alone: "
                  f"{r.extra['prefill_bound_s']:.2f} s), decode-only steps {r.extra['decode_steps_s']:.2f} s"
                  f" ({step_counts(r.extra.get('steps', []))})")
        if r.extra.get("clocks"):
            c = r.extra["clocks"]
            print(f"{r.name} {r.quantization}: SM clock mean {c['sm_clock_mean_mhz']:.0f} MHz (min "
                  f"{c['sm_clock_min_mhz']:.0f}), power mean {c['power_mean_w']:.0f} W (max {c['power_max_w']:.0f}), "
                  f"power cap slowing the clock in {c['power_capped_pct']:.0f}% of samples")
    report["w2_runs"] = w2_summary(rows)
    for quantization, s in report["w2_runs"].items():
        print(f"W2 {quantization}, {len(s['output_tok_s'])} runs: "
              + ", ".join(f"{x:.1f}" for x in s["output_tok_s"])
              + f" tok/s; median {s['median_output_tok_s']:.1f} tok/s, "
              f"{s['median_pct_of_bound_with_prefill']:.1f}% of the bound with the prompts' FLOPs")
    if "transformers_W3" in report:
        for k, v in report["transformers_W3"].items():
            runs = ", ".join(f"{x:.1f}" for x in v.get("runs_tok_s", []))
            print(f"W3 transformers {k:28s} {v.get('output_tok_s', float('nan')):10.1f}  {v.get('error', '')}"
                  + (f"(best of {runs})" if len(v.get("runs_tok_s", [])) > 1 else ""))
        w3 = next(r for r in rows if r.name.startswith("W3"))
        if w3.extra.get("speedup_vs_transformers"):
            print(f"W3 ratio: {w3.output_tok_s:.1f} / {w3.extra['transformers_best_tok_s']:.1f} (transformers' best) "
                  f"= {w3.extra['speedup_vs_transformers']:.1f}x; W3's bound with the prompts "
                  f"{w3.extra['bound_with_prefill_tok_s']:.0f} tok/s is {w3.extra['bound_vs_transformers']:.1f}x it")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
