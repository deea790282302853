"""What a run's throughput costs at a given hourly price for the serving hardware.

Assumes the hardware is paid for by the hour and kept as busy as this run kept it: the cost of the run's
wall time is shared by its successful requests and its output tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from gemma_serve.bench.metrics import RunMetrics


@dataclass(frozen=True)
class CostEstimate:
    price_per_hour: float
    currency: str
    run_cost: float  # price of the run's wall time
    per_request: float | None  # run_cost / successful requests
    per_million_output_tokens: float | None  # price_per_hour / (output tokens per hour) * 1e6


def estimate_cost(metrics: RunMetrics, price_per_hour: float, currency: str = "USD") -> CostEstimate:
    if price_per_hour < 0:
        raise ValueError("price_per_hour must be >= 0")
    run_cost = price_per_hour * metrics.wall_s / 3600.0
    per_request = run_cost / metrics.successful if metrics.successful else None
    per_million = (price_per_hour / (metrics.output_throughput * 3600.0) * 1e6
                   if metrics.output_throughput > 0 else None)
    return CostEstimate(price_per_hour, currency, run_cost, per_request, per_million)
