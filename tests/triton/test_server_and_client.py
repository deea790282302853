"""TritonServer and TritonClient against the real tritonserver (from the nvidia-pytriton wheel), with a
fake engine model so that only the Triton layer is under test."""

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from gemma_serve.settings import ServingSettings
from gemma_serve.triton.client import TritonClient, TritonRequestError
from gemma_serve.triton.contract import GenerationRequest
from gemma_serve.triton.repository import PORTABLE_MODEL, render_portable_repository
from gemma_serve.triton.server import TritonServer, TritonServerError

FAKE_MODEL = Path(__file__).with_name("fake_engine_model.py")


def _repository(tmp_path: Path) -> Path:
    root = render_portable_repository(ServingSettings.load({"model": "unused"}, environ={}), tmp_path / "repo")
    shutil.copy(FAKE_MODEL, root / PORTABLE_MODEL / "1" / "model.py")
    return root


def _server(tmp_path: Path, init: str = "", timeout_s: float = 120) -> TritonServer:
    return TritonServer(_repository(tmp_path), tmp_path / "work", grpc_port=0, http_port=0, metrics_port=0,
                        startup_timeout_s=timeout_s,
                        extra_env={"FAKE_ENGINE_INIT": init, "FAKE_ENGINE_EVENTS": str(tmp_path / "events.jsonl")})


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _events(tmp_path: Path) -> list[dict]:
    path = tmp_path / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("triton")
    server = _server(tmp_path)
    server.start()
    yield server, tmp_path
    server.stop()


def _request(ids, n=10) -> GenerationRequest:
    return GenerationRequest(input_ids=ids, max_tokens=n, end_id=1)


async def test_client_streams_tokens_concurrently(running):
    server, _ = running
    client = TritonClient(server.grpc_url, PORTABLE_MODEL)
    await client.wait_until_ready(10)

    async def collect(i):
        ids = [10 + i, 20, 30, 40, 50]
        chunks = [c async for c in client.generate(_request(ids, n=4), f"r{i}")]
        return [t for c in chunks for t in c.token_ids], chunks[-1].sequence_length

    results = await asyncio.gather(*(collect(i) for i in range(16)))
    for i, (tokens, length) in enumerate(results):
        assert tokens == [50, 40, 30, 20] and length == 9
    await client.close()


async def test_server_errors_become_typed_exceptions(running):
    server, _ = running
    client = TritonClient(server.grpc_url, PORTABLE_MODEL)
    with pytest.raises(TritonRequestError) as bad:
        [c async for c in client.generate(_request([999, 1]), "bad")]
    assert bad.value.kind == "invalid_request" and "fake says no" in str(bad.value)
    with pytest.raises(TritonRequestError) as full:
        [c async for c in client.generate(_request([998, 1]), "full")]
    assert full.value.kind == "overloaded"
    # The server keeps serving.
    tokens = [t async for c in client.generate(_request([3, 4]), "ok") for t in c.token_ids]
    assert tokens == [4, 3]
    await client.close()


async def test_closing_the_stream_cancels_the_request_in_the_model(running):
    server, tmp_path = running
    client = TritonClient(server.grpc_url, PORTABLE_MODEL)
    stream = client.generate(_request(list(range(100, 200)), n=100), "leaver")
    got = 0
    async for _ in stream:
        got += 1
        if got == 3:
            break
    await stream.aclose()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(e["rid"] == "leaver" for e in _events(tmp_path)):
        await asyncio.sleep(0.1)
    events = [e for e in _events(tmp_path) if e["rid"] == "leaver"]
    assert events and events[0]["event"] == "cancelled" and events[0]["at"] < 100
    await client.close()


def test_stop_leaves_no_process(tmp_path):
    server = _server(tmp_path)
    server.start()
    pid = server._process.pid
    assert server.alive and server.ready
    server.stop()
    assert not server.alive and not _pid_alive(pid)
    assert not server.pid_path.exists()


def test_model_that_fails_to_load_fails_fast_with_the_log(tmp_path):
    server = _server(tmp_path, init="fail")
    start = time.monotonic()
    with pytest.raises(TritonServerError) as err:
        server.start()
    assert time.monotonic() - start < 60
    assert "weights not found" in str(err.value)
    assert not server.alive


def test_server_not_ready_in_time_is_stopped(tmp_path):
    server = _server(tmp_path, init="slow", timeout_s=4)
    with pytest.raises(TritonServerError, match="not ready after 4 s"):
        server.start()
    assert not server.alive


def test_a_server_left_by_an_earlier_start_in_the_same_workdir_is_stopped(tmp_path):
    first = _server(tmp_path)
    first.start()
    orphan = first._process.pid
    first._process = None  # as if the process that started it had lost track of it (a retried load)
    second = _server(tmp_path)
    second.start()
    try:
        assert not _pid_alive(orphan) and second.ready
    finally:
        second.stop()
