"""Schedules as data, and the dispatcher playing them on the real clock (no HTTP)."""

import asyncio
import time

import numpy as np
import pytest
from gemma_serve.bench import load_shapes
from gemma_serve.bench.dispatcher import dispatch


def test_burst_and_stress():
    b = load_shapes.burst(10)
    assert b.arrivals == (0.0,) * 10 and b.max_concurrency is None
    s = load_shapes.stress(20)
    assert s.num_requests == 20 and s.max_concurrency == 20
    assert load_shapes.stress(4, num_requests=12).num_requests == 12


def test_sustained_is_rate_times_duration_evenly_spaced():
    s = load_shapes.sustained(2.0, 15.0)
    assert s.num_requests == 30 and s.window_s == 15.0
    assert np.allclose(np.diff(s.arrivals), 0.5) and s.arrivals[-1] < 15.0


def test_ramp_up_rate_rises_linearly():
    s = load_shapes.ramp_up(1.0, 8.0, 15.0)
    arrivals = np.array(s.arrivals)
    assert s.num_requests == 67  # (1 + 8) / 2 * 15
    assert arrivals[0] == 0.0 and arrivals[-1] < 15.0 and np.all(np.diff(arrivals) > 0)
    # The count released by t matches the integral of the rate a + (b - a) t / T.
    for t in (3.0, 7.5, 12.0):
        expected = 1.0 * t + 7.0 * t * t / 30.0
        assert abs(np.sum(arrivals < t) - expected) <= 1.0
    first_gap, last_gap = arrivals[1] - arrivals[0], arrivals[-1] - arrivals[-2]
    assert first_gap == pytest.approx(1 / 1.0, rel=0.3) and last_gap == pytest.approx(1 / 8.0, rel=0.3)
    flat = load_shapes.ramp_up(4.0, 4.0, 2.0)
    assert np.allclose(np.diff(flat.arrivals), 0.25)


def test_poisson_is_seeded_and_has_the_mean_rate():
    a = load_shapes.poisson_rate(5.0, 4000, seed=1)
    assert a == load_shapes.poisson_rate(5.0, 4000, seed=1)
    assert a.arrivals != load_shapes.poisson_rate(5.0, 4000, seed=2).arrivals
    gaps = np.diff(a.arrivals)
    assert gaps.mean() == pytest.approx(0.2, rel=0.05)
    assert gaps.std() == pytest.approx(0.2, rel=0.1)  # exponential: std == mean
    assert load_shapes.sustained(5.0, 4.0, poisson=True, seed=1).arrivals[-1] < 4.0


def test_limited_cuts_count_and_window():
    s = load_shapes.constant_rate(10.0, 100).limited(num_requests=5, window_s=0.3)
    assert s.num_requests == 5 and s.window_s == 0.3
    assert load_shapes.sustained(2.0, 10.0).limited(window_s=30.0).window_s == 10.0


def test_bad_arguments():
    with pytest.raises(ValueError):
        load_shapes.constant_rate(0.0, 10)
    with pytest.raises(ValueError):
        load_shapes.fixed_concurrency(0, 10)


async def _play(schedule, work_s=0.0, drain_s=5.0):
    t0 = time.perf_counter()
    sent, in_flight, peak = {}, 0, 0

    def clock():
        return time.perf_counter() - t0

    async def start(index, at):
        nonlocal in_flight, peak
        sent[index] = clock()
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(work_s)
        finally:
            in_flight -= 1

    outcome = await dispatch(schedule, start, clock=clock, drain_s=drain_s)
    return sent, peak, outcome, clock()


async def test_dispatch_follows_a_sustained_schedule():
    schedule = load_shapes.sustained(40.0, 0.5)
    sent, _, outcome, _ = await _play(schedule, work_s=0.05)
    assert outcome.sent == 20 and outcome.cancelled == 0
    lateness = [sent[i] - at for i, at in enumerate(schedule.arrivals)]
    assert min(lateness) >= -0.001 and max(lateness) < 0.03


async def test_dispatch_follows_a_ramp():
    schedule = load_shapes.ramp_up(10.0, 50.0, 0.5)
    sent, _, outcome, _ = await _play(schedule)
    assert outcome.sent == schedule.num_requests == 15
    assert max(sent[i] - at for i, at in enumerate(schedule.arrivals)) < 0.03


async def test_dispatch_burst_goes_out_at_once():
    sent, peak, _, _ = await _play(load_shapes.burst(50), work_s=0.1)
    assert max(sent.values()) < 0.03 and peak == 50


async def test_dispatch_closed_loop_caps_in_flight():
    sent, peak, _, elapsed = await _play(load_shapes.fixed_concurrency(4, 12), work_s=0.05)
    assert peak == 4 and len(sent) == 12
    assert 0.15 <= elapsed < 0.3  # three rounds of 50 ms


async def test_dispatch_stops_at_window_and_cancels_after_drain():
    schedule = load_shapes.fixed_concurrency(2, 1000).limited(window_s=0.2)
    _, _, outcome, elapsed = await _play(schedule, work_s=10.0, drain_s=0.1)
    assert outcome.sent == 2 and outcome.not_sent == 998 and outcome.cancelled == 2
    assert elapsed < 0.5
