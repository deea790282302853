"""Helpers for the production (TensorRT-LLM) path: an engine folder as build_engine.sh leaves it, and a
stand-in nvidia-smi (no GPU here) that reports a chosen GPU, put first on PATH."""

import json
import os
import stat
from pathlib import Path

import pytest
from gemma_serve.triton.trtllm_engine import PINNED_TRTLLM_VERSION

H100 = ("NVIDIA H100 80GB HBM3", "9.0")
A100 = ("NVIDIA A100-SXM4-80GB", "8.0")


def engine_build(gpu=H100, **overrides) -> dict:
    """engine_build.json as build_engine.sh writes it."""
    data = {
        "schema_version": 1,
        "tensorrt_llm_version": PINNED_TRTLLM_VERSION,
        "gpu": {"name": gpu[0], "compute_capability": gpu[1]},
        "quantization": "int8_wo",
        "requested_quantization": "int8_awq",
        "dtype": "bfloat16",
        "limits": {"max_batch_size": 32, "max_input_len": 1024, "max_seq_len": 2048, "max_num_tokens": 4096},
        "tp_size": 1,
        "source_checkpoint": "google/gemma-7b-it",
        "paged_context_fmha": True,
        "attention_window": [],
    }
    data.update(overrides)
    return data


def make_engine_dir(path: Path, build: dict | None = None, ranks: int = 1) -> Path:
    """An engine folder: engine_build.json and placeholder rank engines (never deserialized here)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "engine_build.json").write_text(json.dumps(build or engine_build()))
    for r in range(ranks):
        (path / f"rank{r}.engine").write_bytes(b"not a real engine")
    return path


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """Call with a (name, compute capability) to make nvidia-smi report that GPU; None: no nvidia-smi."""

    def install(gpu=H100, count: int = 1) -> None:
        bin_dir = tmp_path / "fake-bin"
        bin_dir.mkdir(exist_ok=True)
        exe = bin_dir / "nvidia-smi"
        if gpu is None:
            exe.unlink(missing_ok=True)
            monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), "/usr/bin", "/bin"]))
            return
        lines = "\n".join(f"{gpu[0]}, {gpu[1]}" for _ in range(count))
        exe.write_text(f"#!/bin/sh\ncat <<'OUT'\n{lines}\nOUT\n")
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
        monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]))

    return install
