"""The official `openai` package against the running stack: every request field has a test of its
effect, every error case its status and error body, with a normal request right after."""

import asyncio
import json
import subprocess

import httpx
import openai
import pytest

pytestmark = pytest.mark.e2e

MODEL = "google/gemma-3-4b-it"
FIXED = {"ignore_eos": True}  # extension: fixed output lengths on a random-weight model


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture  # per test: an async client belongs to the event loop it was used on
def aclient(stack):
    return openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, content="Hello", **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def assert_still_serving(client):
    resp = chat(client, max_tokens=2, extra_body=FIXED)
    assert resp.choices[0].message.content is not None


# --- shapes -----------------------------------------------------------------------------------

def test_chat_completion_shape_and_usage(client, stack, tiny_tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                          extra_body=FIXED)
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.created > 0
    assert resp.model
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 5
    assert resp.usage.prompt_tokens == len(tiny_tokenizer.encode_chat(messages))
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 5


def test_chat_streaming_matches_non_streaming_and_ends_with_usage(client):
    kw = dict(max_tokens=12, temperature=0, extra_body=FIXED)
    full = chat(client, "stream me", **kw).choices[0].message.content
    chunks = list(chat(client, "stream me", stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_ends_with_done(stack):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", stack.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    json.loads(lines[0][6:])


async def test_async_client_concurrent_chats(aclient):
    async def one(i):
        return await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=3 + i,
            extra_body=FIXED)

    results = await asyncio.gather(*(one(i) for i in range(6)))
    assert [r.usage.completion_tokens for r in results] == [3 + i for i in range(6)]


async def test_async_streaming(aclient):
    stream = await aclient.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}],
                                                   max_tokens=6, stream=True, extra_body=FIXED)
    reasons = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert reasons[-1] == "length"


def test_completions_shapes_string_and_list_prompts(client, tiny_tokenizer):
    resp = client.completions.create(model=MODEL, prompt="Once", max_tokens=4, extra_body=FIXED)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 4
    assert resp.usage.prompt_tokens == len(tiny_tokenizer.encode_prompt("Once"))
    many = client.completions.create(model=MODEL, prompt=["a", "b c"], max_tokens=3, extra_body=FIXED)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.usage.completion_tokens == 6


def test_completions_default_max_tokens_is_openais_16(client):
    assert client.completions.create(model=MODEL, prompt="x", extra_body=FIXED).usage.completion_tokens == 16


def test_completions_streaming(client):
    kw = dict(model=MODEL, prompt="stream", max_tokens=8, temperature=0, extra_body=FIXED)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage.completion_tokens == 8


# --- field effects -----------------------------------------------------------------------------

def test_max_tokens_and_max_completion_tokens(client):
    assert chat(client, max_tokens=5, extra_body=FIXED).usage.completion_tokens == 5
    resp = chat(client, max_completion_tokens=7, extra_body=FIXED)
    assert resp.usage.completion_tokens == 7 and resp.choices[0].finish_reason == "length"


def test_stop_ends_before_the_stop_string(client):
    full = chat(client, "stop test", max_tokens=40, temperature=0, extra_body=FIXED).choices[0].message.content
    stop = full[5:8]
    resp = chat(client, "stop test", max_tokens=40, temperature=0, stop=[stop], extra_body=FIXED)
    assert resp.choices[0].message.content == full[:full.index(stop)]
    assert resp.choices[0].finish_reason == "stop"
    single = chat(client, "stop test", max_tokens=40, temperature=0, stop=stop, extra_body=FIXED)
    assert single.choices[0].message.content == full[:full.index(stop)]


def test_n_returns_distinct_reproducible_choices(client):
    resp = chat(client, "pick", n=3, max_tokens=8, temperature=1.0, seed=11, extra_body=FIXED)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    texts = [c.message.content for c in resp.choices]
    assert len(set(texts)) > 1
    assert resp.usage.completion_tokens == 24
    again = chat(client, "pick", n=3, max_tokens=8, temperature=1.0, seed=11, extra_body=FIXED)
    assert [c.message.content for c in again.choices] == texts


def test_n_streams_every_choice(client):
    chunks = list(chat(client, "pick", n=2, max_tokens=4, stream=True, extra_body=FIXED))
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_seed_and_temperature(client):
    kw = dict(max_tokens=16, temperature=1.0, extra_body=FIXED)
    a, b = (chat(client, "seeded", seed=5, **kw).choices[0].message.content for _ in range(2))
    assert a == b
    others = {chat(client, "seeded", seed=s, **kw).choices[0].message.content for s in (6, 7, 8)}
    assert len(others | {a}) > 1
    greedy = chat(client, "seeded", max_tokens=16, temperature=0, extra_body=FIXED).choices[0].message.content
    assert greedy == chat(client, "seeded", max_tokens=16, temperature=0, extra_body=FIXED).choices[0].message.content


def test_top_p_and_top_k_narrow_sampling_to_greedy(client):
    greedy = chat(client, "narrow", max_tokens=12, temperature=0, extra_body=FIXED).choices[0].message.content
    for seed in (1, 2):
        tiny_p = chat(client, "narrow", max_tokens=12, temperature=1.0, top_p=1e-6, seed=seed, extra_body=FIXED)
        assert tiny_p.choices[0].message.content == greedy
        top1 = chat(client, "narrow", max_tokens=12, temperature=1.0, seed=seed, extra_body={**FIXED, "top_k": 1})
        assert top1.choices[0].message.content == greedy


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.0), ("frequency_penalty", 2.0),
                                          ("repetition_penalty", 3.0)])
def test_penalties_change_greedy_output(client, field, value):
    plain = chat(client, "repeat repeat", max_tokens=64, temperature=0, extra_body=FIXED)
    changed = chat(client, "repeat repeat", max_tokens=64, temperature=0, extra_body={**FIXED, field: value})
    assert changed.choices[0].message.content != plain.choices[0].message.content


def test_logprobs(client):
    resp = chat(client, "lp", max_tokens=6, logprobs=True, extra_body=FIXED)
    content = resp.choices[0].logprobs.content
    assert len(content) == 6 and all(t.logprob <= 0 for t in content)
    greedy = chat(client, "lp", max_tokens=6, logprobs=True, temperature=0, extra_body=FIXED)
    assert all(t.logprob <= 0 for t in greedy.choices[0].logprobs.content)
    assert chat(client, "lp", max_tokens=2, extra_body=FIXED).choices[0].logprobs is None
    comp = client.completions.create(model=MODEL, prompt="lp", max_tokens=4, logprobs=0, extra_body=FIXED)
    assert len(comp.choices[0].logprobs.token_logprobs) == 4


def test_user_model_and_unknown_fields_are_accepted(client):
    resp = client.chat.completions.create(model="anything-at-all", messages=[{"role": "user", "content": "x"}],
                                          max_tokens=2, user="u-1", extra_body={**FIXED, "some_future_field": 1})
    assert resp.usage.completion_tokens == 2


def test_content_parts_and_roles(client, tiny_tokenizer):
    parts = [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]
    resp = client.chat.completions.create(
        model=MODEL, max_tokens=2, extra_body=FIXED,
        messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": parts},
                  {"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}])
    assert resp.usage.completion_tokens == 2


# --- errors ------------------------------------------------------------------------------------

def _error(exc_info, status):
    assert exc_info.value.status_code == status
    body = exc_info.value.response.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), "role"),
    (dict(messages=[{"role": "user", "content": 5}]), "content"),
    (dict(messages=[{"role": "user", "content": "x"}], temperature=3.0), "temperature"),
    (dict(messages=[{"role": "user", "content": "x"}], top_p=0), "top_p"),
    (dict(messages=[{"role": "user", "content": "x"}], n=9), "n"),
    (dict(messages=[{"role": "user", "content": "x"}], max_tokens=0), "max_tokens"),
    (dict(messages=[{"role": "user", "content": "x"}], presence_penalty=5), "presence_penalty"),
    (dict(messages=[{"role": "user", "content": "x"}], top_logprobs=3, logprobs=True), "top_logprobs"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}}]}]), "image"),
])
def test_invalid_requests_get_400_with_openai_error_body(client, kwargs, needle):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, **kwargs)
    assert needle in _error(exc, 400)["message"]
    assert_still_serving(client)


def test_missing_messages_and_invalid_json(client, stack):
    resp = httpx.post(stack.url + "/v1/chat/completions", json={"model": MODEL}, timeout=30)
    assert resp.status_code == 400 and "messages" in resp.json()["error"]["message"]
    resp = httpx.post(stack.url + "/v1/chat/completions", content=b"{nope", timeout=30,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]
    assert_still_serving(client)


def test_context_window_overflow_names_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as exc:
        chat(client, "x", max_tokens=5000)
    error = _error(exc, 400)
    assert "5000" in error["message"] and "2048" in error["message"]
    assert error["code"] == "context_length_exceeded"
    assert_still_serving(client)


async def test_full_queue_answers_503_with_retry_after(stack, client):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "flood"}], "max_tokens": 200,
            "ignore_eos": True}
    async with httpx.AsyncClient(base_url=stack.url, timeout=300) as http:
        responses = await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(60)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, "60 requests against 8 slots + a queue of 24 were all accepted"
    assert rejected[0].headers["retry-after"] and rejected[0].json()["error"]["code"] == "overloaded"
    assert all(r.json()["usage"]["completion_tokens"] == 200 for r in responses if r.status_code == 200)
    stack.wait_idle(timeout_s=60)
    assert_still_serving(client)


def test_the_seed_documents_curl_example_works(stack):
    body = {
        "model": "google/gemma-3-4b-it",
        "messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "Hello, how are you?"}],
        "temperature": 0.7,
        "max_tokens": 1024,
    }
    out = subprocess.run(["curl", "-sS", "-X", "POST", f"{stack.url}/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-d", json.dumps(body)],
                         capture_output=True, text=True, timeout=300, check=True)
    resp = json.loads(out.stdout)
    assert resp["object"] == "chat.completion"
    assert resp["choices"][0]["finish_reason"] in ("stop", "length")
    assert resp["usage"]["completion_tokens"] <= 1024
