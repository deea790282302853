"""Truss predict through the whole stack (see conftest.py). The tiny model's text is gibberish; the
tests check behaviour: token counts, streaming, determinism, stop strings, errors, freed slots."""

import asyncio

import httpx
import pytest

pytestmark = pytest.mark.e2e

PREDICT = "/v1/models/model:predict"


def predict(stack, payload: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(stack.url + PREDICT, json=payload, timeout=timeout)


def test_non_streamed_predict_returns_text_reason_and_usage(stack, tiny_tokenizer):
    prompt = "The quick brown fox"
    resp = predict(stack, {"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert isinstance(body["text"], str) and body["text"]
    assert body["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == len(tiny_tokenizer.encode_prompt(prompt))
    assert body["usage"]["completion_tokens"] == 12
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 12


def test_streamed_predict_yields_chunks_that_add_up_to_the_non_streamed_text(stack):
    payload = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    full = predict(stack, payload).json()["text"]
    chunks = []
    with httpx.stream("POST", stack.url + PREDICT, json={**payload, "stream": True}, timeout=120) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/plain")
        for chunk in resp.iter_text():
            chunks.append(chunk)
    assert len(chunks) > 1, "the answer arrived in one piece: not streamed"
    assert "".join(chunks) == full


def test_messages_use_the_gemma_chat_template(stack, tiny_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    resp = predict(stack, {"messages": messages, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == len(tiny_tokenizer.encode_chat(messages))


def test_same_seed_same_text_and_greedy_is_repeatable(stack):
    sampled = {"prompt": "Tell me", "max_tokens": 16, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    a, b = predict(stack, sampled).json()["text"], predict(stack, sampled).json()["text"]
    assert a == b
    others = {predict(stack, {**sampled, "seed": s}).json()["text"] for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds never changed the sample"


async def test_sixteen_concurrent_requests_all_complete_with_the_right_counts(stack):
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as client:
        async def one(i):
            n = 4 + i
            resp = await client.post(PREDICT, json={"prompt": f"request {i} " * (1 + i % 5), "max_tokens": n,
                                                    "ignore_eos": True, "seed": i})
            return n, resp

        results = await asyncio.gather(*(one(i) for i in range(16)))
    for n, resp in results:
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] == n
    stack.wait_idle()


def test_stop_string_ends_the_text_before_it_and_frees_the_slot(stack):
    base = {"prompt": "Stop strings", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    full = predict(stack, base).json()["text"]
    assert len(full) > 12
    stop = full[6:9]
    first = full.index(stop)
    resp = predict(stack, {**base, "stop": [stop]})
    body = resp.json()
    assert body["text"] == full[:first]
    assert body["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] < 40
    stack.wait_idle()


def test_client_disconnect_mid_stream_frees_its_engine_slot(stack):
    payload = {"prompt": "never ending", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", stack.url + PREDICT, json=payload, timeout=60) as resp:
        assert resp.status_code == 200
        received = 0
        for _ in resp.iter_raw():
            received += 1
            if received == 3:
                break
    # The connection is closed here, long before 400 tokens.
    assert stack.metric("gemma_engine_running_requests") <= 1
    stack.wait_idle()


@pytest.mark.parametrize("body, needle", [
    (b'{"prompt": "unterminated', "not valid JSON"),
    (b"", "empty"),
    (b'["a list"]', "JSON object"),
    (b'{"prompt": "x", "max_tokens": "five"}', "max_tokens"),
    (b'{"prompt": "x", "temperature": -1}', "temperature"),
    (b'{"prompt": "x", "stream": "yes"}', "stream"),
    (b'{"max_tokens": 3}', "prompt"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "role"),
])
def test_bad_requests_get_a_400_that_says_why_and_the_server_keeps_serving(stack, body, needle):
    resp = httpx.post(stack.url + PREDICT, content=body, headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    ok = predict(stack, {"prompt": "still alive?", "max_tokens": 2, "ignore_eos": True})
    assert ok.status_code == 200


def test_over_long_prompt_gets_a_400_with_both_numbers(stack):
    resp = predict(stack, {"prompt": "word " * 5000, "max_tokens": 8})
    assert resp.status_code == 400
    message = resp.json()["error"]["message"]
    assert "2048" in message and "context" in message
    resp = predict(stack, {"prompt": "short", "max_tokens": 100000})
    assert resp.status_code == 400
    assert "100000" in resp.json()["error"]["message"]
    assert predict(stack, {"prompt": "fine", "max_tokens": 2}).status_code == 200
