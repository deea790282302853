"""Images through the running stack with the `openai` package: OpenAI image parts (data: and http URLs
from a loopback server) reach the tiny model's vision tower, count in usage, and every bad image is a
400 naming it, with the server serving normally afterwards."""

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from gemma_serve.api.images import ImageTokenLayout, expand_image_tokens
from gemma_serve.tiny_model import MM_TOKENS_PER_IMAGE
from tests.api.image_server import ImageServer
from tests.e2e.test_openai import FIXED, MODEL, _error, assert_still_serving

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def client(stack):
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def png(color=None, size=(48, 40), fmt="PNG") -> bytes:
    if color is None:  # detail in every channel
        x, y = np.meshgrid(np.arange(size[0]), np.arange(size[1]))
        img = Image.fromarray(np.stack([x * 5 % 256, y * 6 % 256, (x * y) % 256], -1).astype(np.uint8))
    else:
        img = Image.new("RGB", size, color)
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def data_url(data: bytes, media_type="image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_message(*urls: str, text="What is in the image?") -> list[dict]:
    parts = [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": parts}]


def ask(client, *urls, **kw):
    kw = {"max_tokens": 6, "temperature": 0, "extra_body": FIXED, **kw}
    return client.chat.completions.create(model=MODEL, messages=image_message(*urls), **kw)


@pytest.fixture(scope="module")
def server():
    files = {"/grad.png": png(), "/red.jpg": png((200, 10, 10), fmt="JPEG"), "/notes.txt": b"hello, not an image"}
    with ImageServer(files) as s:
        yield s


def expected_prompt_tokens(tokenizer, num_images: int) -> int:
    parts = [{"type": "text", "text": "What is in the image?"}] + [{"type": "image"}] * num_images
    ids = tokenizer.encode_chat([{"role": "user", "content": parts}])
    layout = ImageTokenLayout.from_tokenizer(tokenizer, MM_TOKENS_PER_IMAGE)
    return len(expand_image_tokens(ids, tokenizer, layout, num_images=num_images).ids)


def test_data_url_image_answers_and_counts_its_tokens(client, tiny_tokenizer):
    resp = ask(client, data_url(png()))
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 6
    text_only = len(tiny_tokenizer.encode_chat([{"role": "user", "content": "What is in the image?"}]))
    assert resp.usage.prompt_tokens == expected_prompt_tokens(tiny_tokenizer, 1)
    assert resp.usage.prompt_tokens >= text_only + MM_TOKENS_PER_IMAGE + 2  # soft tokens, <boi>, <eoi>


def test_http_image_equals_the_same_image_as_data_url(client, server):
    by_url = ask(client, server.url("/grad.png"), logprobs=True)
    by_data = ask(client, data_url(png()), logprobs=True)
    assert by_url.choices[0].message.content == by_data.choices[0].message.content
    a = [t.logprob for t in by_url.choices[0].logprobs.content]
    b = [t.logprob for t in by_data.choices[0].logprobs.content]
    assert np.allclose(a, b, atol=1e-4)


def test_the_pixels_reach_the_model(client):
    """Two different images, same text: the vision tower's output changes the next-token distribution."""
    red = ask(client, data_url(png((255, 0, 0))), logprobs=True, max_tokens=1)
    grad = ask(client, data_url(png()), logprobs=True, max_tokens=1)
    assert red.usage.prompt_tokens == grad.usage.prompt_tokens
    first_red, first_grad = red.choices[0].logprobs.content[0], grad.choices[0].logprobs.content[0]
    # Greedy: the chosen token's log-probability is the distribution's maximum; equal tokens with equal
    # log-probabilities to 1e-6 would mean the image changed nothing.
    assert (first_red.token, round(first_red.logprob, 6)) != (first_grad.token, round(first_grad.logprob, 6))


def test_two_images_between_text_and_streaming(client, tiny_tokenizer, server):
    urls = (server.url("/red.jpg"), data_url(png()))
    full = ask(client, *urls)
    assert full.usage.prompt_tokens == expected_prompt_tokens(tiny_tokenizer, 2)
    chunks = list(ask(client, *urls, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content


async def test_async_client_with_an_image(stack, tiny_tokenizer):
    aclient = openai.AsyncOpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    resp = await aclient.chat.completions.create(model=MODEL, messages=image_message(data_url(png((0, 0, 255)))),
                                                 max_tokens=3, temperature=0, extra_body=FIXED)
    assert resp.usage.completion_tokens == 3
    assert resp.usage.prompt_tokens == expected_prompt_tokens(tiny_tokenizer, 1)


def test_predict_takes_images_the_same_way(stack, tiny_tokenizer):
    resp = httpx.post(stack.url + "/v1/models/model:predict", timeout=120, json={
        "messages": image_message(data_url(png())), "max_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["prompt_tokens"] == expected_prompt_tokens(tiny_tokenizer, 1)


@pytest.mark.parametrize("case, needles", [
    ("not_an_image", ["image 1", "not an image"]),
    ("bmp", ["image 1", "BMP"]),
    ("too_many_bytes", ["image 1", "too large"]),
    ("too_many_pixels", ["image 1", "pixels"]),
    ("too_many_images", ["image 5", "too many images"]),
    ("http_404", ["image 1", "404"]),
    ("http_not_an_image", ["image 1"]),
    ("unfetchable", ["image 1", "could not be fetched"]),
    ("ftp_scheme", ["image 1", "scheme"]),
])
def test_bad_images_are_400_naming_the_image(client, server, case, needles):
    urls = {
        "not_an_image": [data_url(b"definitely not pixels", "image/png")],
        "bmp": [data_url(png(fmt="BMP"), "image/bmp")],
        "too_many_bytes": [data_url(np.random.default_rng(0).bytes(1_100_000), "image/png")],
        "too_many_pixels": [data_url(_png_header_only(20_000, 20_000))],
        "too_many_images": [data_url(png())] * 5,
        "http_404": [server.url("/missing.png")],
        "http_not_an_image": [server.url("/notes.txt")],
        "unfetchable": ["http://127.0.0.1:9/x.png"],
        "ftp_scheme": ["ftp://example.com/x.png"],
    }[case]
    with pytest.raises(openai.BadRequestError) as exc:
        ask(client, *urls)
    message = _error(exc, 400)["message"]
    for needle in needles:
        assert needle in message, message
    assert_still_serving(client)


def _png_header_only(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
