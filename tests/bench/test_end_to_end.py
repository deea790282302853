"""The client, runner, reports and CLI against a real HTTP server on 127.0.0.1 (fake_openai_server.py)."""

import csv
import json
import time

import pytest
from gemma_serve.bench import BenchConfig, load_shapes, run_benchmark
from gemma_serve.bench.__main__ import main as bench_main
from gemma_serve.bench.report import markdown_table

from tests.bench.fake_openai_server import MODEL, FakeOpenAIServer


@pytest.fixture
def half_failing():
    with FakeOpenAIServer(fail_every=2, ttft_s=0.02, itl_s=0.002) as server:
        yield server


@pytest.fixture
def healthy():
    with FakeOpenAIServer(fail_every=0, ttft_s=0.01, itl_s=0.001) as server:
        yield server


def test_half_the_requests_fail_and_the_report_says_so(half_failing):
    config = BenchConfig(half_failing.url, load_shapes.fixed_concurrency(4, 20), endpoint="chat",
                         input_len=32, output_len=8, ignore_eos=True, monitor_gpu=False)
    result = run_benchmark(config)
    m = result.metrics

    assert (m.requests, m.successful, m.errored, m.incomplete) == (20, 10, 10, 0)
    assert m.error_rate == 0.5
    assert m.errors == {"HTTP 500: engine overloaded": 10}
    # Latencies and tokens describe the successful half only, with the server's own usage counts.
    assert m.usage_sources == {"server": 10}
    assert m.output_tokens == 10 * 8 and m.prompt_tokens == 10 * 17
    assert m.e2e_ms.count == m.ttft_ms.count == 10
    assert m.ttft_ms.min >= 20.0  # the server waits 20 ms before the first token
    assert m.itl_ms.count == 10 * 7
    assert m.output_throughput == pytest.approx(80 / m.wall_s)
    assert m.request_throughput == pytest.approx(10 / m.wall_s)
    assert m.max_in_flight <= 4
    assert any("10 of 20 requests failed (50%)" in note for note in result.notes)
    assert "| 10 (50%) |" in markdown_table([result])

    sent = half_failing.bodies[0]
    assert sent["model"] == MODEL  # found through GET /v1/models
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["ignore_eos"] is True and sent["min_tokens"] == 8 and sent["max_tokens"] == 8
    assert sent["messages"][0]["role"] == "user"


def test_completions_endpoint(healthy):
    result = run_benchmark(BenchConfig(healthy.url, load_shapes.burst(6), endpoint="completions",
                                       output_len=5, monitor_gpu=False))
    assert result.metrics.successful == 6 and result.metrics.output_tokens == 30
    assert isinstance(healthy.bodies[0]["prompt"], str) and "ignore_eos" not in healthy.bodies[0]


def test_predict_without_usage_counts_chunks_and_says_so(healthy):
    result = run_benchmark(BenchConfig(healthy.url, load_shapes.fixed_concurrency(2, 4), endpoint="predict",
                                       output_len=6, monitor_gpu=False))
    m = result.metrics
    assert m.successful == 4 and m.usage_sources == {"chunks": 4}
    assert all(r.completion_tokens == len(r.chunk_times_s) and 1 <= r.completion_tokens <= 6
               for r in result.records)
    assert all(r.output_chars == len(" tok0 tok1 tok2 tok3 tok4 tok5") for r in result.records)
    assert any("sent no usage" in note and "approximate" in note for note in result.notes)
    assert "model" not in healthy.bodies[0] and "stream_options" not in healthy.bodies[0]


def test_timeout_is_an_error(healthy):
    config = BenchConfig(healthy.url, load_shapes.burst(2), output_len=4, timeout_s=0.3,
                         extra_body={"fake_hang_s": 5}, monitor_gpu=False)
    result = run_benchmark(config)
    assert result.metrics.errored == 2
    assert list(result.metrics.errors) == ["timeout after 0.3 s"]


def test_run_stops_by_itself_and_marks_stragglers_incomplete(healthy):
    config = BenchConfig(healthy.url, load_shapes.burst(3), output_len=4, timeout_s=30, drain_s=0.3,
                         extra_body={"fake_hang_s": 5}, monitor_gpu=False)
    t = time.perf_counter()
    result = run_benchmark(config)
    assert time.perf_counter() - t < 2.0
    assert (result.metrics.requests, result.metrics.incomplete, result.metrics.successful) == (3, 3, 0)
    assert any("cancelled (incomplete)" in note for note in result.notes)


def test_release_window_caps_a_closed_loop_run(healthy):
    schedule = load_shapes.fixed_concurrency(1, 1000).limited(window_s=0.3)
    result = run_benchmark(BenchConfig(healthy.url, schedule, output_len=4, monitor_gpu=False))
    assert result.scheduled == 1000 and 1 <= result.metrics.requests < 1000
    assert result.metrics.wall_s < 1.0
    assert any("not sent" in note for note in result.notes)


def test_unreachable_server_is_all_errors():
    config = BenchConfig("http://127.0.0.1:9", load_shapes.burst(2), model="m", monitor_gpu=False)
    result = run_benchmark(config)
    assert result.metrics.errored == 2 and result.metrics.successful == 0


def test_cli_sweep_writes_json_csv_markdown_and_plots(half_failing, tmp_path, capsys):
    out = tmp_path / "run"
    rc = bench_main(["--base-url", half_failing.url + "/v1", "--mode", "sweep", "--sweep", "1,2",
                     "--num-requests", "4", "--output-len", "4", "--price-per-hour", "3.6",
                     "--out", str(out), "--no-progress", "--no-gpu-monitor"])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00-concurrency-1.json", "01-concurrency-2.json", "latency_percentiles.png",
                     "summary.csv", "summary.md", "throughput.png", "ttft.png"]
    with open(out / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["concurrency"] for r in rows] == ["1", "2"]
    assert [(r["successful"], r["errored"]) for r in rows] == [("2", "2"), ("2", "2")]
    run0 = json.loads((out / "00-concurrency-1.json").read_text())
    assert len(run0["records"]) == 4 and run0["metrics"]["error_rate"] == 0.5
    assert run0["cost"]["currency"] == "USD" and run0["cost"]["per_million_output_tokens"] > 0
    for png in ("throughput.png", "ttft.png", "latency_percentiles.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "| concurrency-1 |" in printed and "2 (50%)" in printed and "USD/1M output tok" in printed
