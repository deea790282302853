"""engine_bench's bounds, on a tiny engine on the CPU: the numbers every % of bound and the W3
ceiling against transformers are printed from."""

from gemma_serve.bench.engine_bench import Ceilings, decode_bound, prefill_bound_s, workload_bound
from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.llm_engine import LLMEngine


def test_bounds_from_weights_kv_and_flops(checkpoints):
    folder, hf = checkpoints["gemma3"]
    engine = LLMEngine(EngineConfig(model=str(folder), device="cpu", dtype="float32", block_size=4,
                                    max_num_seqs=4, max_num_batched_tokens=64, cpu_kv_cache_tokens=256))
    cfg = hf.config
    params = sum(p.numel() for p in hf.parameters())  # tied: the table is counted once
    embed = cfg.vocab_size * cfg.hidden_size
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4  # float32
    ceil = Ceilings(copy_gbps=1e-3, bf16_tflops=1e-6)  # 1e6 B/s, 1e6 FLOP/s

    # One sequence: bandwidth-bound, weights + its KV once per step.
    step_bytes = 4 * params + 100 * kv_per_token
    assert abs(decode_bound(engine, ceil, 1, 100) - 1e6 / step_bytes) < 1e-9 * 1e6 / step_bytes
    # Many sequences at a short context: the matmul FLOPs bound, 2 per weight per row.
    big_batch = 10_000
    flops_bound = big_batch / (2 * params * big_batch / 1e6)
    bytes_bound = big_batch / ((4 * params + big_batch * kv_per_token) / 1e6)
    assert abs(decode_bound(engine, ceil, big_batch, 1) - min(flops_bound, bytes_bound)) < 1e-6

    # The prompts' FLOPs leave the embedding table out: a prompt row looks its token up.
    assert abs(prefill_bound_s(engine, ceil, 10) - 2 * (params - embed) * 10 / 1e6) < 1e-9

    # A workload: decode steps of min(requests, running) sequences at prompt + half the output,
    # then the prompts' time added for the bound of the whole run.
    decode, whole = workload_bound(engine, ceil, requests=8, prompt_len=20, output_len=10, max_running=4)
    assert decode == decode_bound(engine, ceil, 4, 25)
    seconds = 80 / decode + prefill_bound_s(engine, ceil, 160)
    assert abs(whole - 80 / seconds) < 1e-9 * whole
    assert whole < decode


def test_run_requests_splits_its_time_between_prompt_steps_and_decode_steps(checkpoints):
    """W2's diagnosis: the wall time of steps that scheduled prompt rows and of decode-only steps
    add up to the run's, and the bound's prompt share is the prompts' FLOPs time."""
    from gemma_serve.bench.engine_bench import WorkloadResult, _set_bounds, run_requests, step_counts
    from gemma_serve.engine.sampling_params import SamplingParams

    folder, _ = checkpoints["gemma3"]
    engine = LLMEngine(EngineConfig(model=str(folder), device="cpu", dtype="float32", block_size=4,
                                    max_num_seqs=4, max_num_batched_tokens=16, cpu_kv_cache_tokens=256))
    prompts = [[10 + i + j for j in range(20)] for i in range(3)]  # 60 prompt rows: several 16-row steps
    r = run_requests(engine, prompts, SamplingParams(max_tokens=6, temperature=0.0, stop_token_ids=()))
    prefill, decode = r.extra["prefill_steps_s"], r.extra["decode_steps_s"]
    assert prefill > 0 and decode > 0
    assert abs(prefill + decode - r.wall_s) < 0.05 * r.wall_s
    assert engine.last_step_prefill_rows == 0  # the last steps only decode
    # The per-step log: every prompt row is scheduled once, no step holds more rows than the budget
    # or more sequences than max_num_seqs, and the walls add up to the split.
    steps = r.extra["steps"]
    assert sum(s[0] for s in steps) == 60
    assert all(s[0] <= 16 and s[1] <= 4 for s in steps)  # 0 sequences: a step that only reads the one in flight
    assert abs(sum(s[2] for s in steps if s[0]) / 1e3 - prefill) < 1e-3 * len(steps)
    summary = step_counts(steps)
    assert summary.startswith(f"{sum(1 for s in steps if s[0])} steps with prompt rows")

    ceil = Ceilings(copy_gbps=1e-3, bf16_tflops=1e-6)
    w = WorkloadResult("w", 8, 20, 10, 1.0, 1.0, 1.0, 0, 0, 0, 0)
    _set_bounds(w, *workload_bound(engine, ceil, 8, 20, 10, 4))
    assert abs(w.extra["prefill_bound_s"] - prefill_bound_s(engine, ceil, 160)) < 1e-9 * w.extra["prefill_bound_s"]


def test_w2_repeats_draw_new_prompts_and_report_the_median(checkpoints):
    """W2 run twice on one engine: each run computes all its prompt rows (new prompts: the prefix
    cache would skip repeated ones), each row is named and bounded, and the summary holds both
    runs and their median."""
    import statistics

    from gemma_serve.bench.engine_bench import run_decode_workloads, w2_summary

    folder, _ = checkpoints["gemma3"]
    engine = LLMEngine(EngineConfig(model=str(folder), device="cpu", dtype="float32", block_size=4,
                                    max_num_seqs=4, max_num_batched_tokens=64, cpu_kv_cache_tokens=512))
    ceil = Ceilings(copy_gbps=1e-3, bf16_tflops=1e-6)
    rows = run_decode_workloads(engine, ceil, {"W2"}, w2_requests=3, w2_repeats=2, w2_lens=(24, 6))
    assert [r.name for r in rows] == [f"W2 throughput 3 x 24/6, <=256 running (run {k} of 2)" for k in (1, 2)]
    for r in rows:
        assert sum(s[0] for s in r.extra["steps"]) == 3 * 24  # no prompt row came from the prefix cache
        assert r.output_len == 6 and r.extra["pct_of_bound_with_prefill"] > 0
    summary = w2_summary(rows)[rows[0].quantization]
    assert summary["output_tok_s"] == [r.output_tok_s for r in rows]
    assert summary["median_output_tok_s"] == statistics.median(summary["output_tok_s"])
    # One run: named as before, no summary.
    single = run_decode_workloads(engine, ceil, {"W2"}, w2_requests=1, w2_lens=(24, 6))
    assert single[0].name == "W2 throughput 1 x 24/6, <=256 running" and w2_summary(single) == {}
