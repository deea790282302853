"""The benchmark suite against the real tiny-model stack, a few seconds in each mode, with its numbers
checked for consistency (not for speed: benchmarks never gate CI on timing)."""

import pytest

from gemma_serve.bench import BenchConfig, load_shapes, run_benchmark

pytestmark = pytest.mark.e2e

MODES = {
    "concurrency": lambda: load_shapes.fixed_concurrency(4, 8),
    "rate": lambda: load_shapes.constant_rate(8.0, 6),
    "poisson": lambda: load_shapes.poisson_rate(8.0, 6, seed=1),
    "burst": lambda: load_shapes.burst(6),
    "sustained": lambda: load_shapes.sustained(4.0, 1.5),
    "rampup": lambda: load_shapes.ramp_up(2.0, 8.0, 1.5),
    "stress": lambda: load_shapes.stress(6, 6),
}


def check_consistent(result, output_len: int) -> None:
    m = result.metrics
    assert m.requests == result.scheduled, "requests counted differ from requests sent"
    assert m.successful + m.errored + m.incomplete == m.requests
    assert m.errored == 0 and m.incomplete == 0, result.notes
    assert m.output_tokens == m.successful * output_len  # server usage, ignore_eos forces the length
    assert m.output_throughput == pytest.approx(m.output_tokens / m.wall_s, rel=1e-6)
    assert m.total_throughput == pytest.approx((m.output_tokens + m.prompt_tokens) / m.wall_s, rel=1e-6)
    for dist in (m.ttft_ms, m.itl_ms, m.e2e_ms):
        assert dist.count > 0
        assert dist.min <= dist.p50 <= dist.p90 <= dist.p95 <= dist.p99 <= dist.max
    assert m.ttft_ms.max <= m.e2e_ms.max


@pytest.mark.parametrize("mode", list(MODES))
def test_each_load_mode_against_the_stack(stack, mode):
    result = run_benchmark(BenchConfig(base_url=stack.url, schedule=MODES[mode](), endpoint="chat",
                                       input_len=16, output_len=8, ignore_eos=True, timeout_s=60,
                                       monitor_gpu=False, price_per_hour=2.0))
    check_consistent(result, 8)
    assert result.cost is not None and result.cost.per_request > 0


@pytest.mark.parametrize("endpoint", ["completions", "predict"])
def test_other_endpoints(stack, endpoint):
    result = run_benchmark(BenchConfig(base_url=stack.url, schedule=load_shapes.fixed_concurrency(3, 6),
                                       endpoint=endpoint, input_len=16, output_len=6, ignore_eos=True,
                                       timeout_s=60, monitor_gpu=False))
    if endpoint == "predict":
        # predict streams plain text without usage: the suite counts and says so
        assert result.metrics.successful == 6 and result.notes
    else:
        check_consistent(result, 6)


def test_images_through_the_stack_report_images_per_second(stack, tiny_tokenizer):
    result = run_benchmark(BenchConfig(base_url=stack.url, schedule=load_shapes.fixed_concurrency(2, 4),
                                       endpoint="chat", input_len=16, output_len=4, ignore_eos=True,
                                       timeout_s=60, monitor_gpu=False, images_per_request=2, image_size=64))
    check_consistent(result, 4)
    m = result.metrics
    assert m.images == 8 and m.image_throughput == pytest.approx(8 / m.wall_s, rel=1e-6)
    # The server counts each image's tokens in the prompt: far more than 16 text tokens per request.
    assert m.prompt_tokens_per_request.min > 2 * 64
