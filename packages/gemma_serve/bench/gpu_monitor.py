"""GPU utilisation and memory sampled through NVML while a run goes (only where the server's GPUs are local).

Optional: without the `pynvml` module (package nvidia-ml-py) or without a GPU, the monitor does nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GpuStats:
    index: int
    name: str
    samples: int
    utilization_mean_pct: float
    utilization_max_pct: float
    memory_used_max_mib: float
    memory_total_mib: float | None


class GpuMonitor:
    """`with GpuMonitor() as m: ...` then `m.stats()`: one `GpuStats` per GPU, or [] where NVML is missing."""

    def __init__(self, interval_s: float = 0.5, enabled: bool = True) -> None:
        self.interval_s = interval_s
        self._nvml: Any = None
        self._handles: list[Any] = []
        self._samples: list[list[tuple[float, float]]] = []  # per GPU: (util %, memory used MiB)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if enabled:
            self._init()

    def _init(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self._nvml = pynvml
        except Exception:  # no module, no driver, no GPU: monitoring is optional, stay quiet
            self._nvml, self._handles = None, []
        self._samples = [[] for _ in self._handles]

    def _sample(self) -> None:
        for handle, samples in zip(self._handles, self._samples):
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu
                mem = self._nvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20
            except Exception:
                continue
            samples.append((float(util), float(mem)))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> GpuMonitor:
        if self._handles:
            self._sample()
            self._thread = threading.Thread(target=self._loop, name="gpu-monitor", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()

    def stats(self) -> list[GpuStats]:
        out = []
        for i, (handle, samples) in enumerate(zip(self._handles, self._samples)):
            if not samples:
                continue
            try:
                name = self._nvml.nvmlDeviceGetName(handle)
                name = name.decode() if isinstance(name, bytes) else str(name)
                total = self._nvml.nvmlDeviceGetMemoryInfo(handle).total / 2**20
            except Exception:
                name, total = f"GPU {i}", None
            utils = [u for u, _ in samples]
            out.append(GpuStats(i, name, len(samples), sum(utils) / len(utils), max(utils),
                                max(m for _, m in samples), total))
        return out
