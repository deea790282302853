"""What the Triton hop costs: one workload through the engine in-process, then through tritonserver
(the portable engine's Python-backend model) over gRPC with `TritonClient`, on the same GPU and the
same random weights, with a check that both produce the same greedy tokens.

    python -m gemma_serve.bench.triton_overhead --model bench/configs/gemma-3-4b-it --out triton.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.llm_engine import LLMEngine
from gemma_serve.engine.sampling_params import SamplingParams
from gemma_serve.settings import ServingSettings
from gemma_serve.triton.client import TritonClient
from gemma_serve.triton.contract import GenerationRequest
from gemma_serve.triton.repository import PORTABLE_MODEL, render_portable_repository
from gemma_serve.triton.server import TritonServer

COMMON = dict(load_format="random", cuda_graphs=False, max_num_seqs=256, max_num_batched_tokens=8192,
              max_model_len=1024, max_queue_len=1 << 20)


def prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab - 10, (n, length), generator=g).tolist()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def engine_run(model: str, device: str, batch: list[list[int]], new: int) -> tuple[dict, list[int]]:
    engine = LLMEngine(EngineConfig(model=model, device=device, **COMMON))
    params = SamplingParams(max_tokens=new, temperature=0.0, stop_token_ids=())
    engine.generate(batch[:2], SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=()))  # warm-up
    _sync()
    start = time.perf_counter()
    outs = engine.generate(batch, params)
    _sync()
    wall = time.perf_counter() - start
    first = outs[0]
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"wall_s": wall, "output_tok_s": sum(map(len, outs)) / wall}, first


async def triton_run(client: TritonClient, batch: list[list[int]], new: int) -> tuple[dict, list[int]]:
    async def one(i: int, ids: list[int]):
        t0 = time.perf_counter()
        first_at, tokens = None, []
        request = GenerationRequest(input_ids=ids, max_tokens=new, end_id=-1, top_k=1)
        async for chunk in client.generate(request, f"bench-{i}"):
            if first_at is None:
                first_at = time.perf_counter() - t0
            tokens.extend(chunk.token_ids)
        return first_at, tokens

    await asyncio.gather(*(one(-1 - i, ids) for i, ids in enumerate(batch[:2])))  # warm-up
    start = time.perf_counter()
    results = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(batch)))
    wall = time.perf_counter() - start
    ttft = [r[0] * 1e3 for r in results]
    return ({"wall_s": wall, "output_tok_s": sum(len(r[1]) for r in results) / wall,
             "ttft_ms_mean": statistics.mean(ttft)}, results[0][1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench/configs/gemma-3-4b-it")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test with a tiny model")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    vocab = json.loads((Path(args.model) / "config.json").read_text()).get("text_config", {}).get("vocab_size", 262208)
    levels = [int(c) for c in args.concurrency.split(",")]
    report: dict = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "model": args.model, "input_len": args.input_len,
                    "output_len": args.output_len, "engine": {}, "triton": {}}
    firsts = {}
    for c in levels:
        report["engine"][c], firsts[("engine", c)] = engine_run(args.model, args.device, prompts(c, args.input_len, vocab),
                                                            args.output_len)
        print(f"engine  c={c:4d}: {report['engine'][c]['output_tok_s']:9.1f} out tok/s", flush=True)
    settings = ServingSettings.load({"model": args.model, "device": args.device, "triton_grpc_port": 0,
                                     "triton_http_port": 0, "triton_metrics_port": 0, **COMMON}, environ={})
    work = Path(tempfile.mkdtemp(prefix="triton-overhead-"))
    server = TritonServer(render_portable_repository(settings, work / "repo"), work, grpc_port=0, http_port=0,
                          metrics_port=0, startup_timeout_s=300)
    start = time.perf_counter()
    try:
        server.start()
        report["triton_start_s"] = time.perf_counter() - start

        async def run_all():
            client = TritonClient(server.grpc_url, PORTABLE_MODEL)
            for c in levels:
                report["triton"][c], firsts[("triton", c)] = await triton_run(
                    client, prompts(c, args.input_len, vocab), args.output_len)
                print(f"triton  c={c:4d}: {report['triton'][c]['output_tok_s']:9.1f} out tok/s "
                      f"(TTFT {report['triton'][c]['ttft_ms_mean']:.1f} ms)", flush=True)
            await client.close()

        asyncio.run(run_all())
    except Exception:
        print(server.log_tail(60), file=sys.stderr)
        raise
    finally:
        server.stop()
    for c in levels:
        same = firsts[("engine", c)] == firsts[("triton", c)]
        ratio = report["triton"][c]["output_tok_s"] / report["engine"][c]["output_tok_s"]
        report.setdefault("compare", {})[c] = {"same_greedy_tokens": same, "triton_over_engine": ratio}
        print(f"c={c}: Triton/engine throughput {ratio:.3f}; same greedy tokens: {same}")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
