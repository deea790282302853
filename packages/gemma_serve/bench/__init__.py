"""Benchmark suite for any OpenAI-compatible or Truss endpoint: load shapes, streaming client, reports.

In process: `run_benchmark(BenchConfig(base_url, load_shapes.fixed_concurrency(8, 64))) -> BenchResult`;
from a shell: `python -m gemma_serve.bench --help` (see cli.py).
"""

from gemma_serve.bench import load_shapes
from gemma_serve.bench.load_shapes import Schedule
from gemma_serve.bench.result import BenchResult
from gemma_serve.bench.runner import BenchConfig, arun_benchmark, run_benchmark

__all__ = ["BenchConfig", "BenchResult", "Schedule", "arun_benchmark", "load_shapes", "run_benchmark"]
