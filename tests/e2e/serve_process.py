"""Waiting for a `python -m gemma_serve serve` subprocess to answer, failing with its log if it dies."""

import subprocess
import time
from pathlib import Path

import httpx


def wait_until_serving(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{url} was not ready after {timeout_s:g} s"
        try:
            if httpx.get(f"{url}/v1/models/model", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
