"""What the serving layers cost: two sweeps of the same workload, one through the full stack (Truss server
-> Triton -> engine) and one against `serve --direct` (the same API code and engine in one process, see
gemma_serve/direct.py), matched by concurrency.

    python -m gemma_serve.bench.overhead --pair 128x64 FULL_DIR DIRECT_DIR --pair 512x256 FULL2 DIRECT2 --out OUT

Reads each folder's summary.csv (written by `python -m gemma_serve bench`); writes OUT/overhead.csv,
OUT/overhead.md (also printed) and OUT/overhead.png. Ratios are full / direct: below 1 for throughput and
above 1 for latencies mean the layers cost that much.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path
from typing import Any

# summary.csv column -> the name used here; throughput first, then the latencies users feel.
METRICS = (("output_throughput", "output tok/s"), ("ttft_ms_mean", "TTFT mean ms"), ("ttft_ms_p99", "TTFT p99 ms"),
           ("itl_ms_mean", "ITL mean ms"), ("e2e_ms_mean", "E2E mean ms"))


def read_summary(folder: Path) -> dict[int, dict[str, Any]]:
    """summary.csv rows by concurrency (rows of runs with no successful request are left out)."""
    path = Path(folder) / "summary.csv"
    if not path.exists():
        return {}
    rows = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("concurrency") and int(float(row.get("successful") or 0)) > 0:
                rows[int(float(row["concurrency"]))] = row
    return rows


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(out) else out


def compare(name: str, full_dir: Path, direct_dir: Path) -> list[dict[str, Any]]:
    """One row per concurrency level present in either sweep."""
    full, direct = read_summary(full_dir), read_summary(direct_dir)
    rows = []
    for c in sorted(set(full) | set(direct)):
        row: dict[str, Any] = {"workload": name, "concurrency": c}
        for column, _ in METRICS:
            f, d = _float(full.get(c, {}).get(column)), _float(direct.get(c, {}).get(column))
            row[f"full_{column}"], row[f"direct_{column}"] = f, d
            row[f"ratio_{column}"] = f / d if f is not None and d else None
        rows.append(row)
    return rows


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["Workload", "Concurrency"]
    for _, label in METRICS:
        header += [f"{label} full", f"{label} direct", "full/direct"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row["workload"], str(row["concurrency"])]
        for column, _ in METRICS:
            cells += [_cell(row[f"full_{column}"]), _cell(row[f"direct_{column}"]),
                      _cell(row[f"ratio_{column}"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Output throughput and TTFT vs concurrency, full stack and direct, one column per workload."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(dict.fromkeys(r["workload"] for r in rows))
    if not names:
        return None
    fig, axes = plt.subplots(2, len(names), figsize=(6 * len(names), 8), squeeze=False)
    for col, name in enumerate(names):
        mine = [r for r in rows if r["workload"] == name]
        for row_ax, (column, label) in enumerate((("output_throughput", "output tok/s"),
                                                  ("ttft_ms_mean", "TTFT mean (ms)"))):
            ax = axes[row_ax][col]
            for who, style in (("full", "o-"), ("direct", "s--")):
                points = [(r["concurrency"], r[f"{who}_{column}"]) for r in mine if r[f"{who}_{column}"] is not None]
                if points:
                    ax.plot(*zip(*points), style, label="Truss -> Triton -> engine" if who == "full"
                            else "engine direct (same API code)")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent requests")
            ax.set_ylabel(label)
            ax.set_title(f"{name}: {label}")
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    if rows:
        with open(out_dir / "overhead.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        paths.append(out_dir / "overhead.csv")
    (out_dir / "overhead.md").write_text(markdown(rows))
    paths.append(out_dir / "overhead.md")
    png = plot(rows, out_dir / "overhead.png")
    return paths + ([png] if png else [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", nargs=3, action="append", required=True, metavar=("NAME", "FULL_DIR", "DIRECT_DIR"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    rows = [row for name, full, direct in args.pair for row in compare(name, Path(full), Path(direct))]
    write(rows, args.out)
    print(markdown(rows), end="")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
