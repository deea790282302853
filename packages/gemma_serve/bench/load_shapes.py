"""Load shapes: when each request of a run is released, and how many may be in flight at once.

A `Schedule` is data: sorted release offsets (seconds after the run starts) plus an optional cap on
requests in flight. Closed-loop shapes (fixed concurrency, stress) release every request at 0 and let the
cap hold them back, so a new request starts the moment one finishes; open-loop shapes (rates, burst,
sustained, ramp-up) release on the clock whatever the server's state. `dispatcher.py` plays a schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Schedule:
    kind: str  # concurrency | rate | poisson | burst | sustained | rampup | stress
    label: str  # names the run in reports: "concurrency-8", "sustained-2rps-15s"
    arrivals: tuple[float, ...]  # release offsets in seconds, sorted ascending
    max_concurrency: int | None = None  # in-flight cap; None releases on the clock alone
    window_s: float | None = None  # stop releasing after this many seconds (None: when all are out)
    rate: float | None = None  # requests/s for rate shapes (the start rate for a ramp)
    rate_end: float | None = None

    @property
    def num_requests(self) -> int:
        return len(self.arrivals)

    def limited(self, num_requests: int | None = None, window_s: float | None = None) -> Schedule:
        """The same shape cut to at most `num_requests` and to a release window of `window_s`."""
        arrivals = self.arrivals if num_requests is None else self.arrivals[:num_requests]
        window = self.window_s if window_s is None else (
            window_s if self.window_s is None else min(window_s, self.window_s))
        return Schedule(self.kind, self.label, arrivals, self.max_concurrency, window, self.rate,
                        self.rate_end)


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")


def fixed_concurrency(concurrency: int, num_requests: int) -> Schedule:
    """Closed loop: keep `concurrency` requests in flight until `num_requests` have been sent."""
    _check_positive(concurrency=concurrency, num_requests=num_requests)
    return Schedule("concurrency", f"concurrency-{concurrency}", (0.0,) * num_requests,
                    max_concurrency=concurrency)


def stress(concurrency: int, num_requests: int | None = None) -> Schedule:
    """`concurrency` requests launched together and kept in flight (default: one round of them)."""
    n = concurrency if num_requests is None else num_requests
    _check_positive(concurrency=concurrency, num_requests=n)
    return Schedule("stress", f"stress-{concurrency}", (0.0,) * n, max_concurrency=concurrency)


def burst(num_requests: int) -> Schedule:
    """`num_requests` released at the same instant, with no cap."""
    _check_positive(num_requests=num_requests)
    return Schedule("burst", f"burst-{num_requests}", (0.0,) * num_requests)


def constant_rate(rate: float, num_requests: int) -> Schedule:
    """One request every 1/rate seconds, the first at 0."""
    _check_positive(rate=rate, num_requests=num_requests)
    return Schedule("rate", f"rate-{rate:g}rps", tuple(i / rate for i in range(num_requests)), rate=rate)


def poisson_rate(rate: float, num_requests: int, seed: int = 0) -> Schedule:
    """A Poisson process of mean `rate`: exponential gaps drawn from `seed`, the first request at 0."""
    _check_positive(rate=rate, num_requests=num_requests)
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=num_requests - 1)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps)])
    return Schedule("poisson", f"poisson-{rate:g}rps", tuple(float(t) for t in arrivals), rate=rate)


def sustained(rate: float, duration_s: float, poisson: bool = False, seed: int = 0) -> Schedule:
    """`rate` requests/s for `duration_s` seconds: round(rate * duration) requests, none after the window."""
    _check_positive(rate=rate, duration_s=duration_s)
    n = max(1, round(rate * duration_s))
    base = poisson_rate(rate, n, seed) if poisson else constant_rate(rate, n)
    arrivals = tuple(t for t in base.arrivals if t < duration_s)
    label = f"sustained-{rate:g}rps-{duration_s:g}s" + ("-poisson" if poisson else "")
    return Schedule("sustained", label, arrivals, window_s=duration_s, rate=rate)


def ramp_up(start_rate: float, end_rate: float, duration_s: float) -> Schedule:
    """A rate rising linearly from `start_rate` to `end_rate` over `duration_s` seconds.

    Requests released by time t number N(t) = a*t + (b-a)*t^2/(2T); request k goes out when N(t) = k,
    so the count over the window is (a+b)/2 * T and the local rate at any moment is a + (b-a)*t/T.
    """
    _check_positive(end_rate=end_rate, duration_s=duration_s)
    if start_rate < 0:
        raise ValueError(f"start_rate must be >= 0, got {start_rate}")
    a, b, big_t = start_rate, end_rate, duration_s
    n = max(1, math.floor((a + b) / 2 * big_t + 1e-9))
    c = (b - a) / (2 * big_t)
    arrivals = []
    for k in range(n):
        if abs(c) < 1e-12:
            t = k / a
        else:
            t = (-a + math.sqrt(a * a + 4 * c * k)) / (2 * c)
        arrivals.append(t)
    return Schedule("rampup", f"rampup-{a:g}-{b:g}rps-{big_t:g}s", tuple(arrivals), window_s=duration_s,
                    rate=a, rate_end=b)
