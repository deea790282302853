import numpy as np
import pytest
from gemma_serve.bench.client import ERROR, INCOMPLETE, SUCCESS, RequestRecord
from gemma_serve.bench.cost import estimate_cost
from gemma_serve.bench.metrics import Distribution, compute_metrics


def ok(index, sent, ttft, itl, n_tokens, prompt_tokens=10):
    chunks = [sent + ttft + i * itl for i in range(n_tokens)]
    return RequestRecord(index, scheduled_s=sent, sent_s=sent, first_token_s=chunks[0], chunk_times_s=chunks,
                         end_s=chunks[-1], status=SUCCESS, http_status=200, prompt_tokens=prompt_tokens,
                         completion_tokens=n_tokens, usage_source="server")


def failed(index, sent, end, status=ERROR, error="HTTP 500: boom"):
    return RequestRecord(index, scheduled_s=sent, sent_s=sent, end_s=end, status=status, http_status=500,
                         error=error if status == ERROR else None)


def test_percentiles_are_ordered_and_match_numpy():
    values = np.random.default_rng(3).lognormal(size=1000)
    d = Distribution.of(values)
    assert d.min <= d.p50 <= d.p90 <= d.p95 <= d.p99 <= d.max
    assert d.p90 == pytest.approx(np.percentile(values, 90)) and d.mean == pytest.approx(values.mean())
    assert Distribution.of([], 1e3) == Distribution(count=0)


def test_counts_add_up_to_requests_sent_and_unsent_requests_do_not_count():
    records = [ok(0, 0.0, 0.1, 0.01, 5), failed(1, 0.0, 0.05), failed(2, 0.1, 0.9, status=INCOMPLETE),
               RequestRecord(3, scheduled_s=0.5)]  # never sent
    m = compute_metrics(records)
    assert (m.requests, m.successful, m.errored, m.incomplete) == (3, 1, 1, 1)
    assert m.successful + m.errored + m.incomplete == m.requests
    assert m.errors == {"HTTP 500: boom": 1}


def test_throughput_is_tokens_over_wall_time():
    records = [ok(i, 0.1 * i, 0.05, 0.01, 20 + i, prompt_tokens=7) for i in range(8)]
    m = compute_metrics(records, wall_s=2.5)
    assert m.output_tokens == sum(20 + i for i in range(8)) and m.prompt_tokens == 56
    assert m.output_throughput == m.output_tokens / 2.5
    assert m.total_throughput == (m.output_tokens + m.prompt_tokens) / 2.5
    assert m.request_throughput == 8 / 2.5
    # Without a wall time given: first send -> last end.
    m = compute_metrics(records)
    assert m.wall_s == pytest.approx(0.7 + 0.05 + 26 * 0.01)  # the last of 27 chunks
    assert m.output_throughput == pytest.approx(m.output_tokens / m.wall_s)


def test_latencies_come_from_successful_requests_only():
    good = [ok(i, 0.0, 0.1, 0.02, 11) for i in range(4)]
    slow_failures = [failed(4 + i, 0.0, 50.0) for i in range(4)]
    m = compute_metrics(good + slow_failures)
    assert m.errored == 4 and m.error_rate == 0.5 and m.success_rate == 0.5
    assert m.ttft_ms.mean == pytest.approx(100.0)
    assert m.itl_ms.count == 4 * 10 and m.itl_ms.mean == pytest.approx(20.0)
    assert m.tpot_ms.mean == pytest.approx(20.0)  # (e2e - ttft) / (11 - 1)
    assert m.e2e_ms.max == pytest.approx(300.0)  # the 50 s failures do not leak in
    assert m.output_tokens == 44 and m.wall_s == 50.0  # but they do take wall time: throughput pays for them


def test_tpot_uses_server_token_count_when_chunks_carry_several_tokens():
    r = ok(0, 0.0, 0.1, 0.05, 5)
    r.completion_tokens = 21  # 5 chunks of ~4 tokens each
    m = compute_metrics([r])
    assert m.tpot_ms.mean == pytest.approx((0.1 + 4 * 0.05 - 0.1) / 20 * 1e3)
    assert m.itl_ms.mean == pytest.approx(50.0)


def test_max_in_flight():
    records = [ok(0, 0.0, 0.1, 0.1, 10), ok(1, 0.5, 0.1, 0.1, 10), ok(2, 0.6, 0.1, 0.1, 2),
               ok(3, 2.0, 0.1, 0.1, 2)]
    assert compute_metrics(records).max_in_flight == 3


def test_cost():
    records = [ok(i, 0.0, 0.1, 0.01, 100) for i in range(10)]
    m = compute_metrics(records, wall_s=36.0)  # 1,000 tokens in 36 s
    c = estimate_cost(m, price_per_hour=10.0, currency="EUR")
    assert c.run_cost == pytest.approx(0.1) and c.per_request == pytest.approx(0.01)
    assert c.per_million_output_tokens == pytest.approx(100.0)  # 1e6 tokens take 36,000 s = 10 h
    nothing = estimate_cost(compute_metrics([failed(0, 0.0, 1.0)]), 10.0)
    assert nothing.per_request is None and nothing.per_million_output_tokens is None
