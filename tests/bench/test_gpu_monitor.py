"""NVML sampling is optional: without pynvml it yields nothing; with it, per-GPU summaries."""

import sys
import time
import types

from gemma_serve.bench.gpu_monitor import GpuMonitor


def test_disabled_or_unavailable_is_silent(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    with GpuMonitor(interval_s=0.01) as monitor:
        time.sleep(0.03)
    assert monitor.stats() == []
    assert GpuMonitor(enabled=False).stats() == []


def test_summarises_samples(monkeypatch):
    # NVML's Python API shape (nvidia-ml-py), for machines where no GPU answers the real one.
    utils = iter([10, 30, 50, 70, 90] + [90] * 1000)
    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=next(utils)),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2 * 2**30, total=80 * 2**30),
    )
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with GpuMonitor(interval_s=0.01) as monitor:
        time.sleep(0.05)
    (gpu,) = monitor.stats()
    assert gpu.name == "NVIDIA H100 80GB HBM3" and gpu.samples >= 3
    assert gpu.utilization_max_pct >= 50 and 10 <= gpu.utilization_mean_pct <= gpu.utilization_max_pct
    assert gpu.memory_used_max_mib == 2048 and gpu.memory_total_mib == 80 * 1024
