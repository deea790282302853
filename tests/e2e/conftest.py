"""The whole stack as `make serve` runs it: truss's own server code (from `truss image build-context`)
-> the Truss model -> gRPC -> the real tritonserver -> the portable engine on the tiny Gemma."""

import re
import time
import urllib.request

import pytest

from gemma_serve.dev_server import DevServer
from gemma_serve.triton.server import free_port


class Stack:
    def __init__(self, server: DevServer, metrics_port: int, log_path):
        self.server = server
        self.url = server.url
        self.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        self.log_path = log_path

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as resp:
            text = resp.read().decode()
        match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
        assert match, f"metric {name} not exported"
        return float(match.group(1))

    def wait_idle(self, timeout_s: float = 15.0) -> None:
        """Until the engine runs nothing and every KV block is free again."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            running = self.metric("gemma_engine_running_requests")
            waiting = self.metric("gemma_engine_waiting_requests")
            free, total = self.metric("gemma_engine_kv_blocks_free"), self.metric("gemma_engine_kv_blocks_total")
            if running == 0 and waiting == 0 and free == total > 0:
                return
            time.sleep(0.2)
        raise AssertionError(f"engine not idle: running={running} waiting={waiting} free={free}/{total}")


@pytest.fixture(scope="session")
def stack(tiny_model_dir, tmp_path_factory):
    build_dir = tmp_path_factory.mktemp("stack")
    log_path = build_dir / "truss-server.log"
    metrics_port = free_port()
    server = DevServer(port=free_port(), log_path=log_path, build_dir=build_dir, env={
        "GEMMA_SERVE_MODEL": str(tiny_model_dir),
        "GEMMA_SERVE_DEVICE": "cpu",
        # Room for the seed's curl example (max_tokens 1024).
        "GEMMA_SERVE_MAX_MODEL_LEN": "2048",
        # Small enough that a burst overflows the queue (503 test), large enough for 16 concurrent.
        "GEMMA_SERVE_MAX_NUM_SEQS": "8",
        "GEMMA_SERVE_MAX_QUEUE_LEN": "24",
        "GEMMA_SERVE_TRITON_GRPC_PORT": "0",
        "GEMMA_SERVE_TRITON_HTTP_PORT": "0",
        "GEMMA_SERVE_TRITON_METRICS_PORT": str(metrics_port),
        "GEMMA_SERVE_CPU_KV_CACHE_TOKENS": "16384",
        # Image limits small enough to reach in a test; http image URLs from a loopback test server.
        "GEMMA_SERVE_MAX_IMAGES_PER_REQUEST": "4",
        "GEMMA_SERVE_MAX_IMAGE_BYTES": str(1 << 20),
        "GEMMA_SERVE_IMAGE_FETCH_ALLOW_PRIVATE": "1",
    })
    server.prepare()
    server.start()
    try:
        server.wait_ready(timeout_s=300)
    except Exception:
        server.stop()
        print(log_path.read_text()[-5000:])
        raise
    yield Stack(server, metrics_port, log_path)
    server.stop()
