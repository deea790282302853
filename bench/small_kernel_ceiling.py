"""Diagnostic: how much of a batch-1 decode step the small kernels between the projections cost.
W1 (bf16 and INT8) on engines whose one-row steps skip them: "no-norms" replaces the residual add +
norm kernels (`add_rms_norm`, two a layer) by nothing, "no-small" also QK-norm/RoPE/cache write and
the decode attention and its combine. The outputs are wrong there; only the step time counts. The
difference to "base" is the most that fusing those kernels away can give (what a fusion then costs
comes off it: docs/benchmarks.md, eighth run, has one that cost more than it saved).

    PYTHONPATH=packages python3 bench/small_kernel_ceiling.py --out ceiling.json
"""
import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, "packages")
from gemma_serve.bench.engine_bench import _prompts, run_requests  # noqa: E402
from gemma_serve.engine.config import EngineConfig  # noqa: E402
from gemma_serve.engine.llm_engine import LLMEngine  # noqa: E402
from gemma_serve.engine.models import gemma  # noqa: E402
from gemma_serve.engine.sampling_params import SamplingParams  # noqa: E402

REAL = {name: getattr(gemma, name) for name in ("add_rms_norm", "qkv_to_cache", "paged_attention")}
_static: dict = {}


def _buffer(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One persistent tensor per shape and dtype: returning it launches no kernel."""
    key = (tuple(shape), dtype)
    if key not in _static:
        _static[key] = torch.zeros(shape, dtype=dtype, device=device)
    return _static[key]


def no_norm(residual, x, x_weight, out_weight, eps, out_dtype=None):
    if x.shape[0] != 1:
        return REAL["add_rms_norm"](residual, x, x_weight, out_weight, eps, out_dtype)
    return residual, (_buffer(x.shape, out_dtype or x.dtype, x.device) if out_weight is not None else None)


def no_cache(qkv, num_heads, num_kv_heads, head_dim, *args):
    if qkv.shape[0] != 1:
        return REAL["qkv_to_cache"](qkv, num_heads, num_kv_heads, head_dim, *args)
    k_cache = args[5]  # after q_norm, k_norm, eps, cos, sin
    return _buffer((1, num_heads, head_dim), k_cache.dtype, qkv.device)


def no_attention(q, k_cache, v_cache, meta, *args):
    if q.shape[0] != 1:
        return REAL["paged_attention"](q, k_cache, v_cache, meta, *args)
    return q


VARIANTS = {"base": {}, "no-norms": {"add_rms_norm": no_norm},
            "no-small": {"add_rms_norm": no_norm, "qkv_to_cache": no_cache, "paged_attention": no_attention}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench/configs/gemma-3-4b-it")
    parser.add_argument("--quantization", default="none,int8")
    parser.add_argument("--variants", default="base,no-norms,no-small")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = []
    greedy = dict(temperature=0.0, stop_token_ids=())
    for quantization in args.quantization.split(","):
        for variant in args.variants.split(","):
            for name, fn in REAL.items():
                setattr(gemma, name, VARIANTS[variant].get(name, fn))
            engine = LLMEngine(EngineConfig(model=args.model, load_format="random", device="cuda", dtype="bfloat16",
                                            max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=1024,
                                            quantization=quantization))
            vocab = engine.runner.model_config.vocab_size
            run_requests(engine, _prompts(1, 128, vocab, 0), SamplingParams(max_tokens=16, **greedy))
            r = run_requests(engine, _prompts(1, 128, vocab, 1), SamplingParams(max_tokens=512, **greedy))
            decode_tok_s = 511 / (r.wall_s - r.ttft_ms_mean / 1e3)
            row = {"quantization": quantization, "variant": variant, "decode_tok_s": decode_tok_s,
                   "step_ms": 1e3 / decode_tok_s}
            results.append(row)
            print(f"W1 {quantization:5s} {variant:9s} {decode_tok_s:7.1f} tok/s  {row['step_ms']:.3f} ms/step", flush=True)
            del engine
            gc.collect()
            torch.cuda.empty_cache()
    for name, fn in REAL.items():
        setattr(gemma, name, fn)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
