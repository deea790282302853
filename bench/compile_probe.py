"""Which Triton kernels compile after the engine's warm-up, and in which step (GPU).

Starts the engine as engine_bench does (random weights in the model's shapes), logging the compiles
of its start-up, then runs the first steps of W2 (1024 x 512-token prompts, 256 running at most) and
a few steps of other shapes (odd prompt lengths, a handful of decodes), printing each step's wall
time and the kernels it compiled. In W2 of the ninth H200 run its first two steps took 2.4 and 3.1 s.

    PYTHONPATH=packages python3 bench/compile_probe.py --out probe.json [--quantization int8]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from gemma_serve.engine.compile_log import CompileLog
from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.llm_engine import LLMEngine
from gemma_serve.engine.sampling_params import SamplingParams


def run_steps(engine: LLMEngine, steps: int, label: str) -> list[dict]:
    rows = []
    for i in range(steps):
        if not engine.has_unfinished():
            break
        with CompileLog() as log:
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            ms = (time.perf_counter() - start) * 1e3
        rows.append({"phase": label, "step": i, "prompt_rows": engine.last_step_prefill_rows,
                     "seqs": engine.last_step_num_seqs, "ms": ms, "compiles": [asdict(c) for c in log.compiles]})
        names = ", ".join(c.kernel for c in log.compiles)
        print(f"{label} step {i:3d}: {engine.last_step_prefill_rows:5d} prompt rows, {engine.last_step_num_seqs:3d} seqs, "
              f"{ms:8.1f} ms{'  compiled: ' + names if names else ''}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench/configs/gemma-3-4b-it")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with CompileLog() as start_log:
        start = time.perf_counter()
        engine = LLMEngine(EngineConfig(model=args.model, load_format="random", device="cuda", dtype="bfloat16",
                                        max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=1024,
                                        max_queue_len=1 << 20,
                                        quantization=args.quantization))
        start_s = time.perf_counter() - start
    print(f"engine started in {start_s:.1f} s; {start_log.summary()}", flush=True)
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=256, temperature=0.0, stop_token_ids=())
    for i, p in enumerate(torch.randint(10, 255_000, (1024, 512), generator=g).tolist()):
        engine.add_request(f"w2-{i}", p, params)
    report = {"start_s": start_s, "start_compiles": [asdict(c) for c in start_log.compiles]}
    report["w2"] = run_steps(engine, 24, "W2")
    for rid in list(engine.sequences):
        engine.abort(rid)
    while engine.has_unfinished():
        engine.step()
    # Other shapes: 37 decodes, prompts of odd lengths, a prompt alone.
    short = SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=())
    for i, n in enumerate([37] * 37):
        engine.add_request(f"d-{i}", torch.randint(10, 255_000, (n,), generator=g).tolist(), short)
    for _ in range(3):
        engine.step()
    for i, n in enumerate([5, 300, 1000, 77, 901]):
        engine.add_request(f"o-{i}", torch.randint(10, 255_000, (n,), generator=g).tolist(), short)
    report["other"] = run_steps(engine, 20, "other")
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
