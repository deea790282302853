"""`python -m gemma_serve bench ...` / `python -m gemma_serve.bench ...`: run load shapes, write reports.

    python -m gemma_serve.bench --base-url http://127.0.0.1:8080 --endpoint chat \\
        --mode sweep --sweep 1,5,10,25,50 --num-requests 100 --input-len 128 --output-len 64 --ignore-eos \\
        --price-per-hour 2.5

Writes OUT/NN-<run>.json (every request's timeline), OUT/summary.csv, OUT/summary.md and PNG plots, and
prints the summary table. Exits 1 when a run had no successful request.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path

from gemma_serve.bench import load_shapes
from gemma_serve.bench.endpoints import ENDPOINTS
from gemma_serve.bench.load_shapes import Schedule
from gemma_serve.bench.report import (
    markdown_table,
    run_filename,
    write_markdown,
    write_run_json,
    write_summary_csv,
)
from gemma_serve.bench.result import BenchResult
from gemma_serve.bench.runner import BenchConfig, run_benchmark

MODES = ("concurrency", "sweep", "rate", "burst", "sustained", "rampup", "stress")
DEFAULT_SWEEP = "1,2,4,8,16,32,64"
# Modes sized by a request count still stop releasing after this long unless --duration says otherwise.
DEFAULT_WINDOW_S = 1800.0


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _json_object(text: str) -> dict:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--extra-body must be a JSON object")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8080", help="server root (or its /v1)")
    target.add_argument("--endpoint", choices=ENDPOINTS, default="chat",
                        help="chat: /v1/chat/completions, completions: /v1/completions, "
                             "predict: Truss /v1/models/model:predict")
    target.add_argument("--model", help="model name for OpenAI routes (default: first of GET /v1/models)")
    target.add_argument("--timeout", type=float, default=300.0, help="seconds per request, stream included")
    target.add_argument("--extra-body", type=_json_object, default={},
                        help='JSON merged into every request, e.g. \'{"temperature": 0}\'')

    load = parser.add_argument_group("load shape")
    load.add_argument("--mode", choices=MODES, default="concurrency",
                      help="concurrency: N in flight; sweep: one concurrency run per --sweep value; "
                           "rate: --rate req/s (--poisson for Poisson arrivals); burst: --num-requests at "
                           "once; sustained: --rate for --duration s; rampup: --rate to --rate-end over "
                           "--duration s; stress: --concurrency launched together")
    load.add_argument("--concurrency", type=int, help="requests in flight (default 1; stress 20)")
    load.add_argument("--sweep", type=_ints,
                      help=f"concurrency levels for --mode sweep (default {DEFAULT_SWEEP})")
    load.add_argument("--rate", type=float,
                      help="requests/s (rate; sustained default 2; rampup start, default 1)")
    load.add_argument("--rate-end", type=float, help="rampup end rate in requests/s (default 8)")
    load.add_argument("--poisson", action="store_true", help="Poisson arrivals instead of evenly spaced")
    load.add_argument("--num-requests", type=int,
                      help="requests per run (default 100; burst 10; stress = --concurrency; "
                           "sustained/rampup: rate x duration, this caps it)")
    load.add_argument("--rounds", type=float,
                      help="sweep: each level sends at least this many times its concurrency in requests "
                           "(--num-requests is then the floor), so high levels run long enough to be steady")
    load.add_argument("--duration", type=float,
                      help="seconds: sustained/rampup length (default 15); elsewhere a cap on the release "
                           f"window (default {DEFAULT_WINDOW_S:g})")

    work = parser.add_argument_group("workload")
    work.add_argument("--input-len", type=int, default=128, help="prompt tokens of random prompts")
    work.add_argument("--output-len", type=int, default=128, help="max_tokens per request")
    work.add_argument("--ignore-eos", action="store_true",
                      help="send ignore_eos and min_tokens=output-len: exactly output-len tokens each")
    work.add_argument("--dataset", help="JSONL with a 'prompt' or 'messages' field per row")
    work.add_argument("--tokenizer", help="tokenizer folder (or HF id) for exact token counts")
    work.add_argument("--images-per-request", type=int, default=0,
                      help="image parts per request (chat and predict endpoints; Gemma 3 with vision)")
    work.add_argument("--image-dir", help="send these images (png/jpg/webp/gif); default: generated ones")
    work.add_argument("--image-size", type=int, default=896, help="side of generated images in pixels")
    work.add_argument("--seed", type=int, default=0,
                      help="prompts and Poisson arrivals (run i of a sweep: seed+i)")

    out = parser.add_argument_group("output")
    out.add_argument("--price-per-hour", type=float, help="price of the serving hardware per hour")
    out.add_argument("--currency", default="USD")
    out.add_argument("--out", help="output folder (default bench/results/<timestamp>)")
    out.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write PNG plots")
    out.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                     help="tqdm progress bar")
    out.add_argument("--gpu-monitor", action=argparse.BooleanOptionalAction, default=True,
                     help="sample local GPUs through NVML when pynvml is installed")


def build_schedules(args: argparse.Namespace) -> list[Schedule]:
    """The load shapes that `args` asks for, in run order."""
    n, window = args.num_requests, args.duration
    mode = args.mode
    if mode == "rate" and args.rate is None:
        raise SystemExit("--mode rate needs --rate")
    if mode == "concurrency":
        shapes = [load_shapes.fixed_concurrency(args.concurrency or 1, n or 100)]
    elif mode == "sweep":
        shapes = [load_shapes.fixed_concurrency(c, max(n or 100, round(args.rounds * c)) if args.rounds else n or 100)
                  for c in (args.sweep or _ints(DEFAULT_SWEEP))]
    elif mode == "rate":
        shapes = [load_shapes.poisson_rate(args.rate, n or 100, args.seed) if args.poisson
                  else load_shapes.constant_rate(args.rate, n or 100)]
    elif mode == "burst":
        shapes = [load_shapes.burst(n or 10)]
    elif mode == "stress":
        shapes = [load_shapes.stress(args.concurrency or 20, n)]
    elif mode == "sustained":
        return [load_shapes.sustained(args.rate or 2.0, window or 15.0, args.poisson, args.seed).limited(n)]
    else:  # rampup
        rate = 1.0 if args.rate is None else args.rate
        return [load_shapes.ramp_up(rate, args.rate_end or 8.0, window or 15.0).limited(n)]
    return [s.limited(window_s=window or DEFAULT_WINDOW_S) for s in shapes]


def _config(args: argparse.Namespace, schedule: Schedule, index: int) -> BenchConfig:
    return BenchConfig(
        base_url=args.base_url, schedule=schedule, endpoint=args.endpoint, model=args.model,
        input_len=args.input_len, output_len=args.output_len, ignore_eos=args.ignore_eos,
        dataset=args.dataset, tokenizer=args.tokenizer,
        # A fresh seed per run: the same prompts again would hit the server's prefix cache.
        seed=args.seed + index, timeout_s=args.timeout, price_per_hour=args.price_per_hour,
        currency=args.currency, extra_body=args.extra_body, progress=args.progress,
        monitor_gpu=args.gpu_monitor, images_per_request=args.images_per_request, image_dir=args.image_dir,
        image_size=args.image_size)


def write_reports(results: list[BenchResult], out_dir: Path, plots: bool = True) -> list[Path]:
    paths = [write_run_json(r, out_dir / run_filename(r, i)) for i, r in enumerate(results)]
    paths.append(write_summary_csv(results, out_dir / "summary.csv"))
    paths.append(write_markdown(results, out_dir / "summary.md"))
    if plots:
        from gemma_serve.bench.plots import write_plots

        paths += write_plots(results, out_dir)
    return paths


def run(args: argparse.Namespace) -> int:
    schedules = build_schedules(args)
    out_dir = Path(args.out) if args.out else Path("bench/results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    results: list[BenchResult] = []
    for index, schedule in enumerate(schedules):
        results.append(run_benchmark(_config(args, schedule, index)))
        # Reports after every run: an interrupted sweep keeps what it measured.
        write_reports(results, out_dir, plots=False)
    paths = write_reports(results, out_dir, plots=args.plots)
    print(markdown_table(results), end="")
    print(f"\nwrote {len(paths)} files to {out_dir}/")
    return 0 if all(r.metrics.successful for r in results) else 1
