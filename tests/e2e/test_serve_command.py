"""`python -m gemma_serve serve` (what `make serve` runs): answers predict, and Ctrl-C stops every
process it started."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gemma_serve.triton.server import free_port
from tests.e2e.serve_process import wait_until_serving

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def _descendants(pid: int) -> set[int]:
    """All processes whose ancestry includes `pid`, or that run from this test's build folder."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = set(), [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _processes_matching(needle: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd and _alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids


def test_serve_answers_predict_and_ctrl_c_stops_everything(tiny_model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "GEMMA_SERVE_TRITON_GRPC_PORT": "0", "GEMMA_SERVE_TRITON_HTTP_PORT": "0",
           "GEMMA_SERVE_TRITON_METRICS_PORT": "0", "GEMMA_SERVE_DEVICE": "cpu",
           # `make install` installs the package; keep the test independent of that step.
           "PYTHONPATH": os.pathsep.join([str(REPO / "packages"), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gemma_serve", "serve", "--port", str(port),
                             "--model", str(tiny_model_dir)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_until_serving(proc, f"http://127.0.0.1:{port}", tmp_path / "serve.log", timeout_s=300)
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/models/model:predict",
                          json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True}, timeout=60)
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
        # tritonserver runs in its own session, so look for it by its workdir, too.
        workdir = REPO / "build" / f"triton-{port}"
        started = _descendants(proc.pid) | set(_processes_matching(str(workdir)))
        assert any("tritonserver" in Path(f"/proc/{p}/cmdline").read_text(errors="replace")
                   for p in started if _alive(p)), "no tritonserver among the started processes"

        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        proc.wait(timeout=60)
        time.sleep(1)
        survivors = [p for p in started if _alive(p)] + _processes_matching(str(workdir))
        assert not survivors, f"processes left after Ctrl-C: {survivors}"
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
