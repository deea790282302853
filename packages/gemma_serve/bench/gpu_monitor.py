"""GPU utilisation and memory sampled through NVML while a run goes (only where the server's GPUs are
local), and the SM clock and power through nvidia-smi (`ClockSampler`, for the engine benchmarks).

Optional: without the `pynvml` module (package nvidia-ml-py), nvidia-smi or a GPU, they do nothing.
"""

from __future__ import annotations

import subprocess
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


@dataclass(frozen=True)
class ClockStats:
    """SM clock and board power over a run, and the share of samples the power cap was slowing the
    clock (nvidia-smi's clocks_event_reasons bit 0x4, SW power cap)."""

    samples: int
    sm_clock_mean_mhz: float
    sm_clock_min_mhz: float
    power_mean_w: float
    power_max_w: float
    power_capped_pct: float


def parse_clock_samples(lines: list[str]) -> ClockStats | None:
    """Lines of `nvidia-smi --query-gpu=clocks.sm,power.draw,clocks_event_reasons.active
    --format=csv,noheader,nounits` (first GPU) -> their summary; None without a usable line."""
    rows = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 3:
            continue
        try:
            rows.append((float(parts[0]), float(parts[1]), int(parts[2], 16)))
        except ValueError:  # "[N/A]", a header, a line cut short when the sampler stopped
            continue
    if not rows:
        return None
    clocks = [c for c, _, _ in rows]
    powers = [p for _, p, _ in rows]
    capped = sum(1 for _, _, reasons in rows if reasons & 0x4)
    return ClockStats(len(rows), sum(clocks) / len(clocks), min(clocks), sum(powers) / len(powers), max(powers),
                      100.0 * capped / len(rows))


class ClockSampler:
    """`with ClockSampler() as s: ...` then `s.stats()`: nvidia-smi samples the first GPU's SM clock,
    power and throttle reasons every `interval_ms` while the block runs. A long run of large
    matmuls on an H200 draws ~690 W of its 700 W cap and its clock falls from 1,980 to 1,590-1,890
    MHz: the matmul rate measured in a short burst is then not what the run gets. Does nothing (stats
    None) where nvidia-smi is missing."""

    QUERY = "clocks.sm,power.draw,clocks_event_reasons.active"

    def __init__(self, interval_ms: int = 200) -> None:
        self.interval_ms = interval_ms
        self._proc: subprocess.Popen | None = None
        self._lines: list[str] = []

    def __enter__(self) -> ClockSampler:
        try:
            self._proc = subprocess.Popen(
                ["nvidia-smi", "-i", "0", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits",
                 "-lms", str(self.interval_ms)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:  # no nvidia-smi here
            self._proc = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            out, _ = self._proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            out, _ = self._proc.communicate()
        self._lines = out.splitlines()

    def stats(self) -> ClockStats | None:
        return parse_clock_samples(self._lines)
