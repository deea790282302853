"""What a serving loop's decode step at batch 256 costs on the GPU beyond its CUDA graph (GPU).

In the ninth H200 run, back-to-back decode steps of 256 sequences (~540 keys) took 10.1 ms each
while the host waited 6.4 ms a step for the GPU, yet their graph replayed alone took 6.5 ms. This
times, on one engine and the same 256 sequences, per step:
  A. engine.step() back to back (overlapped, as served);
  B. the graph replayed alone;
  C. graphs.run(chunks): the host's input rows copied, then the replay;
  D. C plus sampling on the device (the argmax over [256, vocab] float32 logits);
  E. B with the Python garbage collector frozen and disabled, then A again with it frozen.

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
    params = SamplingParams(max_tokens=10 * args.steps + 32, temperature=0.0, stop_token_ids=())
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
    gc.enable()
    for k, v in report.items():
        print(f"{k:36s} {v:.3f}" if isinstance(v, float) else f"{k:36s} {v}", flush=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
