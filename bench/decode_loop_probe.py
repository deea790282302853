"""What a serving loop's decode step at batch 256 costs on the GPU beyond its CUDA graph (GPU).

In the ninth H200 run, back-to-back decode steps of 256 sequences (~540 keys) took 10.1 ms each
while the host waited 6.4 ms a step for the GPU, yet their graph replayed alone took 6.5 ms. This
times, on one engine and the same 256 sequences, per step:
  A. engine.step() back to back (overlapped, as served);
  B. the graph replayed alone;
  C. graphs.run(chunks): the host's input rows copied, then the replay;
  D. C plus sampling on the device (the argmax over [256, vocab] float32 logits);
  E. B with the Python garbage collector frozen and disabled, then A again with it frozen;
  H. where the GPU idles in A: a profiler trace of the loop, its kernels' busy union against the
     wall time, and the largest gaps with the kernels on either side.

The eleventh run (H200) measured A at 10.1-11.7 ms a step, drifting with the power-capped clock,
and the GPU idle 0.26 ms a step under the profiler: the loop is GPU-bound. Its argmax takes 84 us
at batch 256 (torch; a split Triton reduction took 81 us, and 66 us against 14 at batch 1: branch
`s11-experiments`).

    PYTHONPATH=packages python3 bench/decode_loop_probe.py --out probe.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch

from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.llm_engine import LLMEngine
from gemma_serve.engine.model_runner import sample_on_device
from gemma_serve.engine.sampling_params import SamplingParams


def gpu_ms(fn, steps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def wall_ms(fn, steps: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / steps


def gpu_gaps(step, steps: int, trace: Path) -> dict:
    """H: the GPU's idle time in `steps` calls of `step`, from a profiler trace (kernels and copies,
    graph kernels included), with the ten largest gaps and their neighbours."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1e6
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    gpu = sorted((e["ts"], e["ts"] + e.get("dur", 0), e["name"]) for e in events
                 if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    busy, gaps, end, last = 0.0, [], None, ""
    for t0, t1, name in gpu:
        if end is not None and t0 > end:
            gaps.append((t0 - end, last[:60], name[:60]))
        if end is None or t0 > end:
            busy += t1 - t0
            end, last = t1, name
        elif t1 > end:
            busy += t1 - end
            end, last = t1, name
    span = gpu[-1][1] - gpu[0][0] if gpu else 0.0
    gaps.sort(reverse=True)
    print(f"H {steps} steps: wall {wall / steps / 1e3:.3f} ms a step; GPU span {span / steps / 1e3:.3f} ms, "
          f"busy {busy / steps / 1e3:.3f} ms, idle {(span - busy) / steps / 1e3:.3f} ms a step "
          f"({len(gaps)} gaps)", flush=True)
    for g, before, after in gaps[:10]:
        print(f"H   gap {g:8.1f} us  after {before}  before {after}", flush=True)
    trace.unlink()
    return {"H_wall_ms": wall / steps / 1e3, "H_span_ms": span / steps / 1e3, "H_busy_ms": busy / steps / 1e3,
            "H_gaps": [{"us": g, "after": a, "before": b} for g, a, b in gaps[:20]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench/configs/gemma-3-4b-it")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig(model=args.model, load_format="random", device="cuda", dtype="bfloat16",
                                    max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=1024,
                                    max_queue_len=1 << 20, overlap_steps=False))
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=min(1024 - args.prompt_len, 20 * args.steps + 32), temperature=0.0,
                            stop_token_ids=())
    for i, p in enumerate(torch.randint(10, 255_000, (args.batch, args.prompt_len), generator=g).tolist()):
        engine.add_request(f"r{i}", p, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.sequences.values()):
        engine.step()
    engine.step()
    graphs = engine.runner.graphs
    graph = graphs.graphs[min(b for b in graphs.sizes if b >= args.batch)]
    n = args.steps
    report = {"batch": args.batch, "context": args.prompt_len}
    report["A_loop_sync_ms"] = wall_ms(engine.step, n)  # overlap off: host + GPU in turn
    engine.config.overlap_steps = True
    report["A_loop_overlapped_ms"] = wall_ms(engine.step, n)
    engine.config.overlap_steps = False
    engine.step()  # read the step in flight
    report["B_replay_ms"] = gpu_ms(graph.replay, n)
    chunks = engine.scheduler.schedule()
    assert len(chunks) == args.batch and all(c.num_tokens == 1 for c in chunks)
    report["C_run_ms"] = gpu_ms(lambda: graphs.run(chunks), n)

    def run_and_sample():
        logits, seqs = graphs.run(chunks)
        sample_on_device(logits, seqs)
    report["D_run_sample_ms"] = gpu_ms(run_and_sample, n)
    report["D_run_sample_wall_ms"] = wall_ms(run_and_sample, n)
    engine.run_step(chunks)
    gc.freeze()
    gc.disable()
    report["E_replay_gc_off_ms"] = gpu_ms(graph.replay, n)
    engine.config.overlap_steps = True
    report["E_loop_overlapped_gc_off_ms"] = wall_ms(engine.step, n)
    report["E_loop_overlapped_gc_off_again_ms"] = wall_ms(engine.step, n)
    report.update(gpu_gaps(engine.step, n, args.out.with_suffix(".trace.json")))
    gc.enable()
    for k, v in report.items():
        if k != "H_gaps":
            print(f"{k:36s} {v:.3f}" if isinstance(v, float) else f"{k:36s} {v}", flush=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
