"""Compiling the engine's experimental CUDA sources (`csrc/`) into shared libraries with nvcc, once per
source and options, cached under ~/.cache/gemma_serve (GEMMA_SERVE_CACHE). They are called through
ctypes with raw device pointers, so no PyTorch headers are needed."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"


def build_shared_library(source: Path, defines: dict[str, int] | None = None, arch: str = "sm_90") -> Path:
    """Compile `source` with `defines` (-DNAME=value) for `arch` and return the library's path."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    flags = ["-O3", "-lineinfo", f"-arch={arch}", "-Xcompiler", "-fPIC", "-shared",
             *(f"-D{k}={v}" for k, v in sorted((defines or {}).items()))]
    # The headers beside the sources (csrc/*.cuh) count too: a changed header rebuilds every library.
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.cuh")))
    key = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("GEMMA_SERVE_CACHE", Path.home() / ".cache" / "gemma_serve")) / "cuda"
    out = cache / f"{source.stem}-{key}.so"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        proc = subprocess.run([nvcc, *flags, "-o", str(tmp), str(source)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source.name} ({proc.returncode}):\n{proc.stderr[-4000:]}")
        tmp.replace(out)
    return out
