"""NVML sampling is optional: without pynvml it yields nothing; with it, per-GPU summaries. The
nvidia-smi clock sampler likewise."""

import os
import sys
import time
import types

from gemma_serve.bench.gpu_monitor import ClockSampler, GpuMonitor, parse_clock_samples


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


def test_clock_samples_summary():
    # nvidia-smi's csv,noheader,nounits lines as sampled on the H200 during W2 (power-capped, 0x4),
    # with what a sampler stopped mid-line or an unsupported field leaves.
    lines = ["1980, 125.97, 0x0000000000000000", "1665, 665.61, 0x0000000000000004",
             "1875, 664.42, 0x0000000000000004", "[N/A], [N/A], [N/A]", "18"]
    stats = parse_clock_samples(lines)
    assert stats.samples == 3
    assert stats.sm_clock_min_mhz == 1665 and abs(stats.sm_clock_mean_mhz - (1980 + 1665 + 1875) / 3) < 1e-9
    assert stats.power_max_w == 665.61 and abs(stats.power_capped_pct - 200 / 3) < 1e-9
    assert parse_clock_samples([]) is None and parse_clock_samples(["[N/A], [N/A], [N/A]"]) is None


def test_clock_sampler_reads_nvidia_smi_until_the_block_ends(tmp_path, monkeypatch):
    # A stand-in nvidia-smi (no GPU here) that checks its query and prints one sample per "interval"
    # until it is terminated, as the real one does with -lms.
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n"
                    f"case \"$*\" in *'--query-gpu={ClockSampler.QUERY}'*'-lms 20'*) ;; *) exit 3 ;; esac\n"
                    "while true; do echo '1700, 690.5, 0x0000000000000004'; sleep 0.02; done\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with ClockSampler(interval_ms=20) as sampler:
        time.sleep(0.3)
    stats = sampler.stats()
    assert stats is not None and stats.samples >= 3
    assert stats.sm_clock_mean_mhz == 1700 and stats.power_capped_pct == 100


def test_clock_sampler_without_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no nvidia-smi
    with ClockSampler() as sampler:
        pass
    assert sampler.stats() is None
