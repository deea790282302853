"""One benchmark run, in process: `run_benchmark(BenchConfig(...)) -> BenchResult`.

    from gemma_serve.bench import BenchConfig, run_benchmark, load_shapes
    result = run_benchmark(BenchConfig("http://127.0.0.1:8080", load_shapes.fixed_concurrency(8, 64)))
    result.metrics.output_throughput, result.metrics.ttft_ms.p99

Inside a running event loop, `await arun_benchmark(config)` instead.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from gemma_serve.bench.client import ERROR, RequestRecord, StreamingClient, discover_model
from gemma_serve.bench.cost import estimate_cost
from gemma_serve.bench.dispatcher import DispatchOutcome, dispatch
from gemma_serve.bench.endpoints import get_endpoint
from gemma_serve.bench.gpu_monitor import GpuMonitor
from gemma_serve.bench.load_shapes import Schedule
from gemma_serve.bench.metrics import RunMetrics, compute_metrics
from gemma_serve.bench.result import BenchResult
from gemma_serve.bench.workload import (
    WORDS_PER_TOKEN,
    ImageSource,
    WorkloadGenerator,
    load_tokenizer,
    read_dataset,
)


@dataclass
class BenchConfig:
    base_url: str  # server root or its /v1 prefix: http://127.0.0.1:8080
    schedule: Schedule  # from load_shapes: how many requests, when, how many at once
    endpoint: str = "chat"  # chat | completions | predict
    model: str | None = None  # None: the first id of GET /v1/models, else left out of the body
    input_len: int = 128  # prompt tokens of random prompts
    output_len: int = 128  # max_tokens (exact with ignore_eos on servers that honour it)
    ignore_eos: bool = False
    dataset: str | None = None  # JSONL with "prompt" or "messages" per row, instead of random prompts
    tokenizer: str | None = None  # tokenizer folder or repo id for exact token counts
    seed: int = 0
    timeout_s: float = 300.0  # per request, whole stream included
    drain_s: float | None = None  # after the last release; default timeout_s + 5
    price_per_hour: float | None = None
    currency: str = "USD"
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body
    progress: bool = False  # a tqdm bar on stderr
    monitor_gpu: bool = True  # NVML sampling where available
    images_per_request: int = 0  # image parts per request (chat and predict endpoints)
    image_dir: str | None = None  # images to send; None: generated ones
    image_size: int = 896  # side of generated images, in pixels

    def settings(self, model: str | None) -> dict[str, Any]:
        s = self.schedule
        return {
            "base_url": self.base_url, "endpoint": self.endpoint, "model": model, "mode": s.kind,
            "label": s.label, "max_concurrency": s.max_concurrency, "rate": s.rate, "rate_end": s.rate_end,
            "window_s": s.window_s, "input_len": self.input_len, "output_len": self.output_len,
            "ignore_eos": self.ignore_eos, "dataset": self.dataset, "tokenizer": self.tokenizer,
            "seed": self.seed, "timeout_s": self.timeout_s, "drain_s": self.drain_limit_s(),
            "price_per_hour": self.price_per_hour, "currency": self.currency, "extra_body": self.extra_body,
            "images_per_request": self.images_per_request, "image_dir": self.image_dir,
            "image_size": self.image_size,
        }

    def drain_limit_s(self) -> float:
        return self.timeout_s + 5.0 if self.drain_s is None else self.drain_s


def _progress_bar(enabled: bool, total: int, label: str) -> Any:
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=label, unit="req", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass
    return None


def _notes(config: BenchConfig, metrics: RunMetrics, outcome: DispatchOutcome, exact_prompts: bool,
           model: str | None) -> list[str]:
    notes = []
    if metrics.errored:
        top = "; ".join(f"{n} x {e}" for e, n in list(metrics.errors.items())[:3])
        notes.append(f"{metrics.errored} of {metrics.requests} requests failed "
                     f"({metrics.error_rate:.0%}): {top}. Latencies and tokens cover the successful ones.")
    if metrics.usage_sources.get("chunks"):
        notes.append(f"the server sent no usage for {metrics.usage_sources['chunks']} successful requests: "
                     "their output tokens are counted stream chunks, so token counts and tokens/s are "
                     "approximate (give --tokenizer to count exactly)")
    if metrics.usage_sources.get("tokenizer"):
        notes.append(f"the server sent no usage for {metrics.usage_sources['tokenizer']} successful "
                     "requests: their output tokens were counted with the tokenizer")
    if not exact_prompts and config.dataset is None and metrics.prompt_tokens_per_request.count:
        counted = metrics.prompt_tokens_per_request.mean
        # Only worth a line when the words-per-token estimate missed by more than a tenth.
        if metrics.usage_sources.get("server") and abs(counted - config.input_len) > 0.1 * config.input_len:
            notes.append(f"random prompts were sized at ~{WORDS_PER_TOKEN} words/token for "
                         f"{config.input_len} tokens; the server counted {counted:.0f} on average"
                         + (" (chat template included)" if config.endpoint == "chat" else ""))
    if outcome.not_sent:
        notes.append(f"the release window of {config.schedule.window_s:g} s closed with "
                     f"{outcome.not_sent} of {outcome.scheduled} scheduled requests not sent")
    if outcome.cancelled:
        notes.append(f"{outcome.cancelled} requests were still running {config.drain_limit_s():g} s after "
                     "the last release and were cancelled (incomplete)")
    if config.endpoint != "predict" and model is None:
        notes.append("no model given and GET /v1/models listed none: requests carried no 'model' field")
    return notes


async def arun_benchmark(config: BenchConfig) -> BenchResult:
    endpoint = get_endpoint(config.endpoint)
    schedule = config.schedule
    tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer else None
    dataset = read_dataset(config.dataset) if config.dataset else None
    if config.images_per_request and endpoint.name == "completions":
        raise ValueError("the completions endpoint takes no images; use --endpoint chat or predict")
    images = ImageSource(config.image_dir, config.image_size, config.seed) if config.images_per_request else None
    workload = WorkloadGenerator(config.input_len, config.seed, tokenizer, dataset, config.images_per_request,
                                 images)
    prompts = workload.prompts(schedule.num_requests)
    model = config.model
    if model is None and endpoint.name != "predict":
        model = await discover_model(config.base_url)

    records = [RequestRecord(i, at) for i, at in enumerate(schedule.arrivals)]
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    t0 = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - t0

    bar = _progress_bar(config.progress, schedule.num_requests, schedule.label)
    errors = 0

    def on_done(index: int) -> None:
        nonlocal errors
        if bar is not None:
            errors += records[index].status == ERROR
            bar.update(1)
            if errors:
                bar.set_postfix(errors=errors, refresh=False)

    client = StreamingClient(config.base_url, endpoint, model=model, output_len=config.output_len,
                             ignore_eos=config.ignore_eos, timeout_s=config.timeout_s,
                             extra_body=config.extra_body,
                             count_tokens=workload.count_tokens if tokenizer is not None else None,
                             clock=clock)

    async def start(index: int, _scheduled: float) -> None:
        records[index].images = len(prompts[index].images)
        await client.send(prompts[index], records[index])

    try:
        async with client:
            with GpuMonitor(enabled=config.monitor_gpu) as gpu:
                t0 = time.perf_counter()  # the clock starts with the first release
                outcome = await dispatch(schedule, start, clock=clock, drain_s=config.drain_limit_s(),
                                         on_done=on_done)
                wall_s = clock()
    finally:
        if bar is not None:
            bar.close()

    sent = [r for r in records if r.sent_s is not None]
    metrics = compute_metrics(sent, wall_s)
    cost = estimate_cost(metrics, config.price_per_hour, config.currency) if config.price_per_hour else None
    exact = bool(prompts) and all(p.exact for p in prompts)
    return BenchResult(label=schedule.label, started_at=started_at, settings=config.settings(model),
                       metrics=metrics, scheduled=outcome.scheduled, cost=cost, gpus=gpu.stats(),
                       notes=_notes(config, metrics, outcome, exact, model), records=sent)


def run_benchmark(config: BenchConfig) -> BenchResult:
    """Runs one benchmark to completion (bounded by the schedule, its window and the drain limit)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(arun_benchmark(config))
    raise RuntimeError("run_benchmark() called inside a running event loop: "
                       "use `await arun_benchmark(config)`")
