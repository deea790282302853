"""PNG plots of a set of runs: throughput and TTFT against concurrency, and end-to-end latency percentiles.

Runs that all have a concurrency (a sweep) plot against it on a numeric axis; other sets (rates, bursts)
plot one point per run, by label. A run with failed requests says so on the plot, next to its point.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from gemma_serve.bench.result import BenchResult


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _x_axis(results: Sequence[BenchResult]) -> tuple[list[float], list[str] | None, str]:
    conc = [r.concurrency for r in results]
    if all(c is not None for c in conc) and len(set(conc)) == len(conc):
        return [float(c) for c in conc], None, "Concurrent requests"
    return list(range(len(results))), [r.label for r in results], "Run"


def _subtitle(results: Sequence[BenchResult]) -> str:
    s = results[0].settings
    lengths = "dataset" if s.get("dataset") else f"{s.get('input_len')} in / {s.get('output_len')} out tokens"
    parts = [s.get("endpoint") or "", s.get("model") or "", lengths]
    return " | ".join(p for p in parts if p)


def _name(result: BenchResult) -> str:
    return f"concurrency {result.concurrency}" if result.concurrency is not None else result.label


def _mark_failures(ax, xs: list[float], ys: list[float | None], results: Sequence[BenchResult]) -> None:
    """Rings the points of runs that had failed requests and lists them in a corner box, so a good-looking
    point that only half the requests reached cannot pass for a healthy one."""
    lines = []
    for x, y, r in zip(xs, ys, results):
        failed = r.metrics.errored + r.metrics.incomplete
        if not failed:
            continue
        if y is not None:
            ax.plot([x], [y], "o", ms=14, mfc="none", mec="crimson", mew=1.5)
        lines.append(f"{_name(r)}: {failed}/{r.metrics.requests} ({failed / r.metrics.requests:.0%})")
    if lines:
        if len(lines) > 12:
            lines = lines[:11] + [f"... and {len(lines) - 11} more runs"]
        rows = ["   ".join(lines[i:i + 3]) for i in range(0, len(lines), 3)]
        # Below the axes, where it hides no data; tight_layout makes room for it.
        ax.text(0.0, -0.14, "Failed requests: " + "\n".join(rows), transform=ax.transAxes, ha="left",
                va="top", fontsize=8, color="crimson")


def _finish(fig, ax, xs, labels, xlabel: str, path: Path) -> Path:
    ax.set_xlabel(xlabel)
    if labels is not None:
        ax.set_xticks(xs)
        ax.set_xticklabels(labels, rotation=20 if max(len(t) for t in labels) > 6 else 0, ha="right")
    elif len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 16:
        # Sweeps are usually geometric (1, 2, 4, ... 64): a log axis keeps the low end readable.
        from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_throughput(results: Sequence[BenchResult], path: str | Path) -> Path:
    plt = _pyplot()
    xs, labels, xlabel = _x_axis(results)
    fig, ax = plt.subplots(figsize=(8, 5))
    out = [r.metrics.output_throughput for r in results]
    ax.plot(xs, out, "o-", label="output tokens/s")
    ax.plot(xs, [r.metrics.total_throughput for r in results], "s--", alpha=0.6,
            label="total (prompt + output) tokens/s")
    for x, y in zip(xs, out):
        ax.annotate(f"{y:,.0f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    _mark_failures(ax, xs, out, results)
    ax.set_ylabel("Throughput (tokens/s)")
    ax.set_title(f"Throughput vs {xlabel.lower()}\n{_subtitle(results)}", fontsize=11)
    return _finish(fig, ax, xs, labels, xlabel, Path(path))


def plot_ttft(results: Sequence[BenchResult], path: str | Path) -> Path:
    plt = _pyplot()
    xs, labels, xlabel = _x_axis(results)
    fig, ax = plt.subplots(figsize=(8, 5))
    for stat, style in (("mean", "o-"), ("p50", "^:"), ("p99", "v--")):
        ys = [getattr(r.metrics.ttft_ms, stat) for r in results]
        ax.plot(xs, [float("nan") if y is None else y for y in ys], style, label=f"TTFT {stat}")
    _mark_failures(ax, xs, [r.metrics.ttft_ms.mean for r in results], results)
    ax.set_ylabel("Time to first token (ms)")
    ax.set_title(f"Time to first token vs {xlabel.lower()}\n{_subtitle(results)}", fontsize=11)
    return _finish(fig, ax, xs, labels, xlabel, Path(path))


def plot_latency_percentiles(results: Sequence[BenchResult], path: str | Path) -> Path:
    plt = _pyplot()
    xs, labels, xlabel = _x_axis(results)
    positions = [float(p) for p in range(len(results))]
    stats = ("p50", "p90", "p95", "p99")
    longest = max((r.metrics.e2e_ms.p99 or 0.0) for r in results)
    scale, unit = (1e-3, "s") if longest >= 2000 else (1.0, "ms")
    width = 0.8 / len(stats)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(results) + 3), 5))
    for i, stat in enumerate(stats):
        ys = [(getattr(r.metrics.e2e_ms, stat) or 0.0) * scale for r in results]
        ax.bar([p + (i - 1.5) * width for p in positions], ys, width, label=f"E2E {stat}")
    _mark_failures(ax, positions, [None] * len(results), results)
    ax.set_ylabel(f"End-to-end latency ({unit})")
    ax.set_title(f"End-to-end latency percentiles per run\n{_subtitle(results)}", fontsize=11)
    tick_labels = labels if labels is not None else [f"{x:g}" for x in xs]
    return _finish(fig, ax, positions, tick_labels, xlabel, Path(path))


def write_plots(results: Sequence[BenchResult], out_dir: str | Path) -> list[Path]:
    if not results:
        return []
    out = Path(out_dir)
    return [plot_throughput(results, out / "throughput.png"), plot_ttft(results, out / "ttft.png"),
            plot_latency_percentiles(results, out / "latency_percentiles.png")]
