"""`python -m gemma_serve serve --direct`: the engine in-process behind the same API code, no Truss server
and no Triton (the benchmark's baseline for the serving overhead). The official `openai` package talks to
it as to the full stack, and SIGTERM stops it cleanly."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from gemma_serve.triton.server import free_port
from tests.e2e.serve_process import wait_until_serving

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
FIXED = {"ignore_eos": True}


@pytest.fixture(scope="module")
def direct(tiny_model_dir, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("direct") / "serve.log"
    env = {**os.environ, "GEMMA_SERVE_DEVICE": "cpu", "GEMMA_SERVE_MAX_NUM_SEQS": "4",
           "GEMMA_SERVE_CPU_KV_CACHE_TOKENS": "4096",
           "PYTHONPATH": os.pathsep.join([str(REPO / "packages"), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gemma_serve", "serve", "--direct", "--port", str(port),
                                 "--model", str(tiny_model_dir)], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(proc, url, log_path, timeout_s=180)
        yield proc, url, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_openai_client_against_direct_mode(direct, tiny_tokenizer):
    _, url, _ = direct
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Hello"}]
    resp = client.chat.completions.create(model="any", messages=messages, max_tokens=6, temperature=0,
                                          extra_body=FIXED)
    assert resp.object == "chat.completion" and resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 6
    assert resp.usage.prompt_tokens == len(tiny_tokenizer.encode_chat(messages))
    assert resp.model.endswith("tiny-gemma")  # the served name: the model folder
    chunks = list(client.chat.completions.create(model="any", messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body=FIXED))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == resp.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 6
    completion = client.completions.create(model="any", prompt="Once upon a time", max_tokens=4, extra_body=FIXED)
    assert completion.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError, match="context window"):
        client.completions.create(model="any", prompt="Once", max_tokens=10**6)
    predict = httpx.post(f"{url}/v1/models/model:predict", json={"prompt": "hi", "max_tokens": 3, **FIXED},
                         timeout=60)
    assert predict.status_code == 200 and predict.json()["usage"]["completion_tokens"] == 3


def test_sigterm_stops_direct_mode(direct):
    proc, _, log_path = direct
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log_path.read_text()[-3000:]
    assert "Traceback" not in log_path.read_text()
