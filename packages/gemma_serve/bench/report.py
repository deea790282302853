"""Report files: one JSON per run, a CSV row per run, and a markdown table (also what the CLI prints)."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gemma_serve.bench.metrics import Distribution
from gemma_serve.bench.result import BenchResult

_STATS = ("mean", "p50", "p90", "p95", "p99")


def _dist(prefix: str, d: Distribution) -> dict[str, Any]:
    return {f"{prefix}_{k}": getattr(d, k) for k in _STATS}


def summary_row(result: BenchResult) -> dict[str, Any]:
    """One flat row per run: the CSV's columns."""
    s, m = result.settings, result.metrics
    row: dict[str, Any] = {
        "label": result.label, "mode": s.get("mode"), "endpoint": s.get("endpoint"), "model": s.get("model"),
        "concurrency": s.get("max_concurrency"), "rate": s.get("rate"), "rate_end": s.get("rate_end"),
        "window_s": s.get("window_s"), "input_len": s.get("input_len"), "output_len": s.get("output_len"),
        "scheduled": result.scheduled, "requests": m.requests, "successful": m.successful,
        "errored": m.errored, "incomplete": m.incomplete, "success_rate": m.success_rate,
        "duration_s": m.wall_s, "request_throughput": m.request_throughput,
        "output_throughput": m.output_throughput, "total_throughput": m.total_throughput,
        "prompt_tokens": m.prompt_tokens, "output_tokens": m.output_tokens,
        **_dist("ttft_ms", m.ttft_ms), **_dist("itl_ms", m.itl_ms), **_dist("tpot_ms", m.tpot_ms),
        **_dist("e2e_ms", m.e2e_ms), "max_in_flight": m.max_in_flight,
        "usage_source": "+".join(sorted(m.usage_sources)) or None,
        "images_per_request": s.get("images_per_request", 0), "images": m.images,
        "image_throughput": m.image_throughput,
    }
    if result.cost is not None:
        row.update({"currency": result.cost.currency, "price_per_hour": result.cost.price_per_hour,
                    "cost_per_request": result.cost.per_request,
                    "cost_per_million_output_tokens": result.cost.per_million_output_tokens})
    if result.gpus:
        row.update({"gpu_util_mean_pct": sum(g.utilization_mean_pct for g in result.gpus) / len(result.gpus),
                    "gpu_util_max_pct": max(g.utilization_max_pct for g in result.gpus),
                    "gpu_mem_used_max_mib": max(g.memory_used_max_mib for g in result.gpus)})
    row["started_at"] = result.started_at
    return row


def run_filename(result: BenchResult, index: int | None = None) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", result.label)
    return f"{index:02d}-{stem}.json" if index is not None else f"{stem}.json"


def write_run_json(result: BenchResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.to_dict(), indent=1, allow_nan=False, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_summary_csv(results: Sequence[BenchResult], path: str | Path) -> Path:
    rows = [summary_row(r) for r in results]
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def markdown_table(results: Sequence[BenchResult]) -> str:
    """The numbers users compare across runs; failures get their own columns and a note per run."""
    with_cost = any(r.cost is not None for r in results)
    with_gpu = any(r.gpus for r in results)
    with_images = any(r.metrics.images for r in results)
    header = ["Run", "Concurrency", "Requests", "Successful", "Errored", "Incomplete", "Duration (s)",
              "Req/s", "Output tok/s", "Total tok/s", "TTFT mean (ms)", "TTFT p99 (ms)", "ITL mean (ms)",
              "TPOT mean (ms)", "E2E mean (ms)", "E2E p95 (ms)", "E2E p99 (ms)"]
    if with_cost:
        currency = next(r.cost.currency for r in results if r.cost is not None)
        header += [f"{currency}/request", f"{currency}/1M output tok"]
    if with_gpu:
        header += ["GPU util mean (%)", "GPU mem max (GiB)"]
    if with_images:
        header += ["Images", "Images/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in results:
        m = r.metrics
        # Open-loop shapes have no concurrency setting: show how many were in flight at the peak instead.
        conc = str(r.concurrency) if r.concurrency is not None else f"peak {m.max_in_flight}"
        cells = [r.label, conc, str(m.requests), str(m.successful),
                 f"{m.errored} ({m.error_rate:.0%})" if m.errored else "0", str(m.incomplete),
                 _num(m.wall_s), _num(m.request_throughput, 2), _num(m.output_throughput),
                 _num(m.total_throughput), _num(m.ttft_ms.mean), _num(m.ttft_ms.p99), _num(m.itl_ms.mean),
                 _num(m.tpot_ms.mean), _num(m.e2e_ms.mean), _num(m.e2e_ms.p95), _num(m.e2e_ms.p99)]
        if with_cost:
            cells += [_num(r.cost.per_request, 6) if r.cost else "-",
                      _num(r.cost.per_million_output_tokens, 4) if r.cost else "-"]
        if with_gpu:
            cells += ([_num(sum(g.utilization_mean_pct for g in r.gpus) / len(r.gpus)),
                       _num(max(g.memory_used_max_mib for g in r.gpus) / 1024)] if r.gpus else ["-", "-"])
        if with_images:
            cells += [str(m.images), _num(m.image_throughput, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r.label}: {note}" for r in results for note in r.notes]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def write_markdown(results: Sequence[BenchResult], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(markdown_table(results))
    return path
