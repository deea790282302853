"""`BenchResult`: everything one run measured, as written to its JSON file and read by the reports."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from gemma_serve.bench.client import RequestRecord
from gemma_serve.bench.cost import CostEstimate
from gemma_serve.bench.gpu_monitor import GpuStats
from gemma_serve.bench.metrics import RunMetrics


@dataclass
class BenchResult:
    label: str  # the load shape's label: "concurrency-8"
    started_at: str  # ISO 8601, UTC
    settings: dict[str, Any]  # the run's configuration, JSON-safe
    metrics: RunMetrics
    scheduled: int  # requests the load shape asked for (metrics.requests were sent)
    cost: CostEstimate | None = None
    gpus: list[GpuStats] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # caveats a reader must see: estimated tokens, cut-offs
    records: list[RequestRecord] = field(default_factory=list)

    @property
    def concurrency(self) -> int | None:
        return self.settings.get("max_concurrency")

    def to_dict(self, with_records: bool = True) -> dict[str, Any]:
        d = asdict(self)
        d["metrics"]["success_rate"] = self.metrics.success_rate
        d["metrics"]["error_rate"] = self.metrics.error_rate
        if with_records:
            # Microseconds are finer than anything measured here, and keep a long run's JSON small.
            for rec in d["records"]:
                for key, value in rec.items():
                    if isinstance(value, float):
                        rec[key] = round(value, 6)
                rec["chunk_times_s"] = [round(t, 6) for t in rec["chunk_times_s"]]
        else:
            d.pop("records")
        return d
