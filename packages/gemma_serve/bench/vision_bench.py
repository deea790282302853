"""Vision benchmark: how many images per second the vision tower + projector encode, and what an image
adds to time-to-first-token, in-process (no server), on random weights with the real shapes.

    python -m gemma_serve.bench.vision_bench --model bench/configs/gemma-3-4b-it --out vision.json

  encode   images/s of `runner.vision.encode` at several batch sizes (pixels already on the device)
  TTFT     one request at a time, max_tokens 1: a text prompt, then the same text with one image
           (a new image each time, so neither the feature cache nor the prefix cache helps), and the
           same image again (feature cache and prefix cache both hit)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.llm_engine import LLMEngine
from gemma_serve.engine.multimodal import ImageInput
from gemma_serve.engine.sampling_params import SamplingParams


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _image(size: int, seed: int) -> ImageInput:
    pixels = np.random.default_rng(seed).uniform(-1, 1, size=(3, size, size)).astype(np.float32)
    return ImageInput(pixel_values=pixels, content_hash=hashlib.sha256(pixels.tobytes()).hexdigest())


def encode_rate(engine: LLMEngine, size: int, batches: list[int], repeats: int = 5) -> list[dict]:
    runner = engine.runner
    rows = []
    for batch in batches:
        pixels = torch.randn(batch, 3, size, size, device=runner.device, dtype=torch.float32)
        with torch.inference_mode():
            runner.vision.encode(pixels)  # warm-up (kernel selection)
            _sync()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                runner.vision.encode(pixels)
                _sync()
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        rows.append({"batch": batch, "ms": median * 1e3, "images_per_s": batch / median})
        print(f"encode batch {batch:3d}: {median * 1e3:8.1f} ms  {batch / median:8.1f} images/s", flush=True)
    return rows


def image_prompt(engine: LLMEngine, text_len: int, images: int, vocab_low: int = 10) -> list[int]:
    """Random text ids, then per image <boi> + soft tokens + <eoi> (the ids the API layer sends)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(vocab_low, 1000, size=text_len).tolist()
    for _ in range(images):
        ids += [engine.boi_token_id] + [engine.image_token_id] * engine.mm_tokens_per_image + [engine.eoi_token_id]
    return ids + [vocab_low]


def ttft(engine: LLMEngine, ids: list[int], images: list[ImageInput] | None, tag: str) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, stop_token_ids=())
    _sync()
    start = time.perf_counter()
    engine.add_request(tag, ids, params, images=images)
    while engine.has_unfinished():
        engine.step()
    _sync()
    return (time.perf_counter() - start) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench/configs/gemma-3-4b-it")
    parser.add_argument("--load-format", default="random", choices=["random", "auto"])
    parser.add_argument("--text-len", type=int, default=128, help="text tokens around the image")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="JSON results file")
    args = parser.parse_args(argv)

    engine = LLMEngine(EngineConfig(model=args.model, load_format=args.load_format, max_model_len=2048,
                                    max_num_batched_tokens=8192))
    if not engine.supports_images:
        print(f"{args.model} has no vision tower", file=sys.stderr)
        return 2
    size = engine.runner.vision.image_size
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}; images {size}x{size}, {engine.mm_tokens_per_image} tokens each", flush=True)
    encode = encode_rate(engine, size, [int(b) for b in args.batches.split(",")])

    text_ids = image_prompt(engine, args.text_len, 0)
    with_image = image_prompt(engine, args.text_len, 1)
    # Distinct text per request so the prefix cache only helps where the row says so.
    for i in range(2):  # warm-up
        ttft(engine, [11 + i] + text_ids, None, f"w{i}")
        ttft(engine, [11 + i] + with_image, [_image(size, 1000 + i)], f"wi{i}")
    text, image, cached = [], [], []
    for i in range(args.repeats):
        text.append(ttft(engine, [100 + i] + text_ids, None, f"t{i}"))
        img = _image(size, i)
        image.append(ttft(engine, [200 + i] + with_image, [img], f"i{i}"))
        cached.append(ttft(engine, [200 + i] + with_image, [img], f"c{i}"))
    rows = {"text_only": text, "one_new_image": image, "same_image_again": cached}
    summary = {name: {"prompt_tokens": args.text_len + 2 + (0 if name == "text_only" else engine.mm_tokens_per_image + 2),
                      "ttft_ms_median": statistics.median(v), "ttft_ms_min": min(v)} for name, v in rows.items()}
    for name, s in summary.items():
        print(f"TTFT {name:17s} ({s['prompt_tokens']:4d} tokens): median {s['ttft_ms_median']:7.1f} ms, "
              f"min {s['ttft_ms_min']:7.1f} ms", flush=True)
    result = {"device": device, "model": args.model, "load_format": args.load_format, "image_size": size,
              "tokens_per_image": engine.mm_tokens_per_image, "encode": encode, "ttft": summary}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
