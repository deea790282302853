"""A run's numbers from its request records.

Counts cover every request sent; latencies and token counts cover the successful ones only, and
throughputs divide the successful requests' tokens by the run's whole wall time. So a run where half the
requests fail shows errored = half and a throughput that the failures pulled down, never an average that
hides them.

Definitions (as vLLM's benchmark_serving): TTFT = first text chunk - send; ITL = gaps between successive
text chunks of a request, pooled over requests; TPOT = (end-to-end - TTFT) / (output tokens - 1) per
request; end-to-end = last byte - send.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from gemma_serve.bench.client import ERROR, INCOMPLETE, SUCCESS, RequestRecord

PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class Distribution:
    count: int
    mean: float | None = None
    min: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Iterable[float], scale: float = 1.0) -> Distribution:
        data = np.asarray(list(values), dtype=np.float64) * scale
        if data.size == 0:
            return cls(count=0)
        p50, p90, p95, p99 = (float(v) for v in np.percentile(data, PERCENTILES))
        return cls(int(data.size), float(data.mean()), float(data.min()), p50, p90, p95, p99,
                   float(data.max()))


@dataclass(frozen=True)
class RunMetrics:
    requests: int  # sent
    successful: int
    errored: int
    incomplete: int  # cancelled when the run's time limit passed
    wall_s: float
    request_throughput: float  # successful requests / wall s
    prompt_tokens: int  # summed over successful requests
    output_tokens: int
    output_throughput: float  # output tokens / wall s
    total_throughput: float  # (prompt + output) tokens / wall s
    ttft_ms: Distribution
    itl_ms: Distribution
    tpot_ms: Distribution
    e2e_ms: Distribution
    prompt_tokens_per_request: Distribution
    output_tokens_per_request: Distribution
    release_lag_ms: Distribution  # how late each request went out against its schedule
    max_in_flight: int
    errors: dict[str, int]  # error text -> requests
    usage_sources: dict[str, int]  # server | tokenizer | chunks -> successful requests
    images: int = 0  # image parts of the successful requests
    image_throughput: float = 0.0  # images / wall s (the server encodes each one before its first token)

    @property
    def error_rate(self) -> float:
        return self.errored / self.requests if self.requests else 0.0

    @property
    def success_rate(self) -> float:
        return self.successful / self.requests if self.requests else 0.0


def _max_in_flight(records: Sequence[RequestRecord]) -> int:
    events = []
    for r in records:
        if r.sent_s is not None and r.end_s is not None:
            events += [(r.sent_s, 1), (r.end_s, -1)]
    level = peak = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
        level += step
        peak = max(peak, level)
    return peak


def compute_metrics(records: Sequence[RequestRecord], wall_s: float | None = None) -> RunMetrics:
    """`wall_s` defaults to first send -> last end of `records`."""
    sent = [r for r in records if r.sent_s is not None]
    ok = [r for r in sent if r.status == SUCCESS]
    if wall_s is None:
        ends = [r.end_s for r in sent if r.end_s is not None]
        wall_s = (max(ends) - min(r.sent_s for r in sent)) if ends else 0.0
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.completion_tokens or 0 for r in ok)

    def per_second(x: float) -> float:
        return x / wall_s if wall_s > 0 else 0.0

    ttft, itl, tpot, e2e = [], [], [], []
    for r in ok:
        latency = r.end_s - r.sent_s
        e2e.append(latency)
        if r.first_token_s is not None:
            first = r.first_token_s - r.sent_s
            ttft.append(first)
            if (r.completion_tokens or 0) > 1:
                tpot.append((latency - first) / (r.completion_tokens - 1))
        itl.extend(np.diff(r.chunk_times_s).tolist())
    return RunMetrics(
        requests=len(sent),
        successful=len(ok),
        errored=sum(r.status == ERROR for r in sent),
        incomplete=sum(r.status == INCOMPLETE for r in sent),
        wall_s=wall_s,
        request_throughput=per_second(len(ok)),
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        output_throughput=per_second(output_tokens),
        total_throughput=per_second(prompt_tokens + output_tokens),
        ttft_ms=Distribution.of(ttft, 1e3),
        itl_ms=Distribution.of(itl, 1e3),
        tpot_ms=Distribution.of(tpot, 1e3),
        e2e_ms=Distribution.of(e2e, 1e3),
        prompt_tokens_per_request=Distribution.of(r.prompt_tokens or 0 for r in ok),
        output_tokens_per_request=Distribution.of(r.completion_tokens or 0 for r in ok),
        release_lag_ms=Distribution.of((r.sent_s - r.scheduled_s for r in sent), 1e3),
        max_in_flight=_max_in_flight(sent),
        errors=dict(Counter((r.error or "unknown error")[:120] for r in sent
                            if r.status == ERROR).most_common()),
        usage_sources=dict(Counter(r.usage_source or "none" for r in ok)),
        images=sum(r.images for r in ok),
        image_throughput=per_second(sum(r.images for r in ok)),
    )
