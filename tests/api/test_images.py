"""Image inputs: decoding and normalization, data: and http(s) URLs against a real local server, limits
and their 400s, the cache, and the prompt expansion checked against transformers' Gemma3Processor."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib
from urllib.parse import quote_from_bytes

import numpy as np
import pytest
from PIL import Image

from gemma_serve.api.errors import APIError
from gemma_serve.api.images import (
    ImageCache,
    ImageLimits,
    ImageRef,
    ImagePreprocessor,
    ImageTokenLayout,
    PreprocessConfig,
    decode_data_url,
    expand_image_tokens,
    image_refs,
    preprocess_image,
)
from gemma_serve.api.schemas import Message
from gemma_serve.tiny_model import END_OF_IMAGE, IMAGE_SIZE, IMAGE_TOKEN, MM_TOKENS_PER_IMAGE, START_OF_IMAGE
from tests.api.image_server import ImageServer, free_port

RED, BLUE, ORANGE = (255, 0, 0), (0, 0, 255), (255, 128, 0)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def solid(color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, color)


def gradient(width: int = 61, height: int = 47) -> Image.Image:
    """An image with detail in every channel, so resize differences would show."""
    x, y = np.meshgrid(np.arange(width), np.arange(height))
    pixels = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x * y) % 256], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a huge size and holds almost no data: what a decompression bomb looks like to
    a reader that trusts the header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def messages(*urls: str) -> list[Message]:
    """One user message per URL, each "look:" then the image (so image k is messages[k-1].content[1])."""
    return [Message.model_validate({"role": "user", "content": [
        {"type": "text", "text": "look:"}, {"type": "image_url", "image_url": {"url": u}}]}) for u in urls]


def expect_400(exc_info: pytest.ExceptionInfo, image: int, *reason: str) -> None:
    err = exc_info.value
    assert isinstance(err, APIError) and err.status == 400, err
    assert f"image {image} (messages[{image - 1}].content[1])" in err.message, err.message
    for word in reason:
        assert word in err.message, err.message
    assert err.param == f"messages.{image - 1}.content.1.image_url.url"
    assert err.body()["error"]["type"] == "invalid_request_error"


@pytest.fixture(scope="module")
def config(tiny_model_dir) -> PreprocessConfig:
    return PreprocessConfig.from_checkpoint(tiny_model_dir)


LIMITS = ImageLimits(max_images=4, max_bytes=64 * 1024, max_pixels=4_000_000, fetch_timeout_s=0.5,
                     max_redirects=3, allow_private_networks=True)  # the test server is on loopback


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {"/img.png": encode(solid(RED), "PNG"), "/img.jpg": encode(solid(BLUE), "JPEG", quality=95),
            "/bmp": encode(solid(RED), "BMP")}


@pytest.fixture(scope="module")
def server(files):
    with ImageServer(files, oversized_bytes=LIMITS.max_bytes + 1) as s:
        yield s


@pytest.fixture
def pre(config) -> ImagePreprocessor:
    return ImagePreprocessor(config, LIMITS, ImageCache())


# --- configuration -----------------------------------------------------------------------------------

def test_config_from_the_tiny_checkpoint(config):
    assert (config.height, config.width) == (IMAGE_SIZE, IMAGE_SIZE)
    assert config.rescale_factor == pytest.approx(1 / 255)
    assert config.image_mean == (0.5, 0.5, 0.5) and config.image_std == (0.5, 0.5, 0.5)
    assert config.resample == 2 and config.do_rescale and config.do_normalize


def test_config_size_forms(tmp_path):
    assert PreprocessConfig.from_dict({"image_size": 896}).height == 896
    assert (PreprocessConfig.from_dict({"size": [32, 48]}).height, PreprocessConfig.from_dict({"size": [32, 48]}).width) == (32, 48)
    assert PreprocessConfig.from_dict({"size": {"height": 8, "width": 9}, "image_mean": 0.1}).image_mean == (0.1,) * 3
    (tmp_path / "config.json").write_text('{"vision_config": {"image_size": 896}}')
    assert PreprocessConfig.from_checkpoint(tmp_path).width == 896  # no preprocessor_config.json
    with pytest.raises(ValueError):
        PreprocessConfig.from_dict({"size": {"shortest_edge": 224}})
    with pytest.raises(ValueError):
        PreprocessConfig.from_checkpoint(tmp_path / "nothing")


# --- decoding and normalization ----------------------------------------------------------------------

@pytest.mark.parametrize("fmt, tolerance", [("PNG", 1e-6), ("JPEG", 0.05), ("WEBP", 0.05), ("GIF", 1e-6)])
def test_each_format_decodes_and_normalizes(config, fmt, tolerance):
    pixels, size = preprocess_image(encode(solid(ORANGE, (50, 20)), fmt), config, LIMITS)
    assert size == (50, 20)
    assert pixels.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and pixels.dtype == np.float32
    assert pixels.flags.c_contiguous
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0
    # (v / 255 - 0.5) / 0.5 per channel: 255 -> 1, 128 -> 0.0039, 0 -> -1
    expected = [(v / 255 - 0.5) / 0.5 for v in ORANGE]
    np.testing.assert_allclose(pixels.mean(axis=(1, 2)), expected, atol=tolerance)


def test_2x2_png_against_a_hand_computation():
    config = PreprocessConfig(height=2, width=2, rescale_factor=1 / 255, image_mean=(0.5, 0.4, 0.3),
                              image_std=(0.5, 0.2, 0.25))
    img = Image.new("RGB", (2, 2))
    img.putdata([(0, 0, 0), (255, 255, 255), (255, 0, 0), (10, 20, 30)])  # row-major: (0,0) (1,0) (0,1) (1,1)
    pixels, _ = preprocess_image(encode(img, "PNG"), config, LIMITS)
    expected = np.array([
        # red channel: black, white / red, (10, 20, 30)
        [[(0 - 0.5) / 0.5, (1 - 0.5) / 0.5], [(1 - 0.5) / 0.5, (10 / 255 - 0.5) / 0.5]],
        [[(0 - 0.4) / 0.2, (1 - 0.4) / 0.2], [(0 - 0.4) / 0.2, (20 / 255 - 0.4) / 0.2]],
        [[(0 - 0.3) / 0.25, (1 - 0.3) / 0.25], [(0 - 0.3) / 0.25, (30 / 255 - 0.3) / 0.25]],
    ])
    np.testing.assert_allclose(pixels, expected, rtol=0, atol=1e-6)


def test_pixels_match_transformers_image_processor(processor, config):
    hf = processor.image_processor  # AutoProcessor picks the PIL backend where torchvision is missing
    for img in (gradient(), gradient(500, 300), solid(ORANGE)):
        ours, _ = preprocess_image(encode(img, "PNG"), config, LIMITS)
        theirs = np.asarray(hf(images=img)["pixel_values"][0])
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_gif_takes_the_first_frame(config):
    frames = [solid(RED), solid(BLUE), solid((0, 255, 0))]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(gif)).n_frames == 3
    pixels, _ = preprocess_image(gif, config, LIMITS)
    np.testing.assert_allclose(pixels.mean(axis=(1, 2)), [1.0, -1.0, -1.0], atol=1e-6)


def test_transparency_is_white_and_16_bit_grey_is_scaled(config):
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # transparent black
    pixels, _ = preprocess_image(encode(clear, "PNG"), config, LIMITS)
    np.testing.assert_allclose(pixels, 1.0)
    grey16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))  # mid grey in 16 bits
    pixels, _ = preprocess_image(encode(grey16, "PNG"), config, LIMITS)
    np.testing.assert_allclose(pixels, (128 / 255 - 0.5) / 0.5, atol=1e-6)


# --- data: URLs --------------------------------------------------------------------------------------

def test_data_urls_with_and_without_base64(files):
    png = files["/img.png"]
    assert decode_data_url(data_url(png), 10**6) == png
    assert decode_data_url(data_url(png).rstrip("="), 10**6) == png  # padding dropped
    wrapped = data_url(png).replace(",", ",\n", 1)[:60] + "\n" + data_url(png)[59:]
    assert decode_data_url(wrapped, 10**6) == png  # MIME line breaks
    assert decode_data_url("data:image/png," + quote_from_bytes(png), 10**6) == png  # percent-encoded
    assert decode_data_url("data:," + quote_from_bytes(png), 10**6) == png  # no media type


async def test_data_url_errors(pre, files):
    png = files["/img.png"]
    cases = [
        (data_url(png)[:-8] + "!@#$%^&*", ["not valid base64"]),
        ("data:image/png;base64", ["malformed data: URL"]),
        (data_url(png, "text/plain"), ["text/plain", "not an image"]),
        ("data:image/png;base64,", ["empty"]),
        (data_url(b"\0" * (LIMITS.max_bytes + 1)), ["too large", str(LIMITS.max_bytes)]),
        ("data:image/png," + quote_from_bytes(b"\0" * (LIMITS.max_bytes + 1)), ["too large"]),
    ]
    for url, reason in cases:
        with pytest.raises(APIError) as exc:
            await pre.prepare_messages(messages(url))
        expect_400(exc, 1, *reason)


# --- content errors and limits -----------------------------------------------------------------------

async def test_content_errors_name_the_image_and_the_reason(pre, files):
    good = data_url(files["/img.png"])
    cases = [
        (data_url(b"hello, this is text"), ["not an image"], "invalid_image"),
        (data_url(files["/bmp"], "image/bmp"), ["BMP", "not supported"], "unsupported_image_format"),
        (data_url(files["/img.png"][:60]), ["could not be decoded"], "invalid_image"),  # truncated
        (data_url(encode(solid(RED, (2500, 2000)), "PNG")), ["too many pixels", "2500x2000"], "image_too_large"),
        (data_url(png_header_only(60_000, 60_000)), ["too many pixels"], "image_too_large"),  # Pillow's own cap
        (data_url(png_header_only(3000, 2000)), ["too many pixels", "3000x2000"], "image_too_large"),
    ]
    for bad, reason, code in cases:
        with pytest.raises(APIError) as exc:
            await pre.prepare_messages(messages(good, bad))  # the second image is the bad one
        expect_400(exc, 2, *reason)
        assert exc.value.code == code


async def test_too_many_images(pre, files):
    urls = [data_url(files["/img.png"])] * (LIMITS.max_images + 1)
    with pytest.raises(APIError) as exc:
        await pre.prepare_messages(messages(*urls))
    expect_400(exc, LIMITS.max_images + 1, "too many images", str(LIMITS.max_images))
    with pytest.raises(APIError):  # image_refs checks the count itself, before anything is fetched
        image_refs(messages(*urls), LIMITS)


async def test_several_images_in_message_order(pre, files):
    urls = [data_url(encode(solid(c), "PNG")) for c in (RED, BLUE, ORANGE)]
    mixed = [Message.model_validate({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": urls[0]}}, {"type": "text", "text": "and"},
        {"type": "image_url", "image_url": {"url": urls[1]}}]}),
        Message.model_validate({"role": "assistant", "content": "ok"}),
        Message.model_validate({"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[2]}}]})]
    images = await pre.prepare_messages(mixed)
    assert [i.source.label for i in images] == [
        "image 1 (messages[0].content[0])", "image 2 (messages[0].content[2])", "image 3 (messages[2].content[0])"]
    red_channel = [float(i.pixel_values[0].mean()) for i in images]
    assert red_channel == pytest.approx([1.0, -1.0, 1.0], abs=1e-6)
    assert float(images[2].pixel_values[1].mean()) == pytest.approx((128 / 255 - 0.5) / 0.5, abs=1e-6)
    assert len({i.hash for i in images}) == 3 and all(len(i.hash) == 64 for i in images)


# --- http(s) URLs ------------------------------------------------------------------------------------

async def test_http_fetch_png_jpeg_and_redirects(pre, server, files):
    images = await pre.prepare_messages(messages(server.url("/img.png"), server.url("/img.jpg"),
                                                 server.url("/redirect"), server.url("/redirect-twice")))
    assert [float(i.pixel_values[0].mean()) for i in images] == pytest.approx([1.0, -1.0, 1.0, 1.0], abs=0.02)
    assert images[2].hash == images[0].hash == images[3].hash  # the redirects end at /img.png
    assert images[0].source.source == server.url("/img.png")


async def test_http_errors_name_the_image_and_the_reason(pre, server):
    refused = f"http://127.0.0.1:{free_port()}/img.png"
    cases = [
        (server.url("/missing"), ["HTTP 404"]),
        (server.url("/error"), ["HTTP 500"]),
        (refused, ["could not be fetched", "ConnectError"]),
        (server.url("/slow"), ["timed out", "0.5 s"]),
        (server.url("/trickle"), ["timed out"]),  # every read is quick; the whole answer is not
        (server.url("/redirect-file"), ["redirects to file:///etc/passwd", "only http and https"]),
        (server.url("/redirect-ftp"), ["redirects to ftp://127.0.0.1/img.png"]),
        (server.url("/redirect-loop"), ["more than 3 redirects"]),
        (server.url("/big"), ["too large", str(LIMITS.max_bytes + 1)]),  # Content-Length
        (server.url("/big-unsized"), ["too large", f"over {LIMITS.max_bytes}"]),  # counted while reading
        (server.url("/text"), ["not an image"]),
        (server.url("/empty"), ["empty body"]),
        ("file:///etc/passwd", ["unsupported URL scheme file:"]),
        ("ftp://127.0.0.1/img.png", ["unsupported URL scheme ftp:"]),
        ("127.0.0.1/img.png", ["unsupported URL scheme (none)"]),
        ("", ["URL is empty"]),
        ("http://[::1/img.png", ["malformed URL"]),
    ]
    loop = asyncio.get_running_loop()
    for url, reason in cases:
        start = loop.time()
        with pytest.raises(APIError) as exc:
            await pre.prepare_messages(messages(url))
        expect_400(exc, 1, *reason)
        assert loop.time() - start < LIMITS.fetch_timeout_s + 1.0


async def test_a_shared_client_is_used_as_given(config, server):
    import httpx

    async with httpx.AsyncClient(follow_redirects=True) as client:  # its redirect setting is overridden
        pre = ImagePreprocessor(config, LIMITS, ImageCache(), client=client)
        with pytest.raises(APIError, match="redirects to file:"):
            await pre.prepare_messages(messages(server.url("/redirect-file")))
        assert len(await pre.prepare_messages(messages(server.url("/redirect")))) == 1


# --- cache -------------------------------------------------------------------------------------------

async def test_the_cache_hits_on_the_second_identical_image(pre, files, server):
    url = data_url(files["/img.png"])
    first = await pre.prepare_messages(messages(url))
    assert pre.cache.stats()["misses"] == 1 and pre.cache.hits == 0
    second = await pre.prepare_messages(messages(url))
    assert pre.cache.hits == 1 and pre.cache.misses == 1
    assert second[0].pixel_values is first[0].pixel_values  # not decoded again
    assert not first[0].pixel_values.flags.writeable  # shared: nobody may change it
    # The same bytes by another route (http), and twice within one request: one decode in all.
    both = await pre.prepare_messages(messages(server.url("/img.png"), server.url("/img.png")))
    assert both[0].pixel_values is both[1].pixel_values is first[0].pixel_values
    assert (pre.cache.hits, pre.cache.misses, len(pre.cache)) == (3, 1, 1)


def test_cache_is_lru_bounded_by_entries_and_bytes():
    def arr(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)  # 4n bytes

    cache = ImageCache(max_entries=2, max_bytes=820)
    cache.put("a", arr(10), (1, 1))
    cache.put("b", arr(10), (1, 1))
    assert cache.get("a") is not None  # "a" is now the most recent
    cache.put("c", arr(10), (1, 1))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    cache.put("d", arr(200), (1, 1))  # 800 bytes: "a" goes (3 entries), then "c" (840 bytes > 820)
    assert len(cache) == 1 and cache.nbytes == 800 and cache.evictions == 3
    cache.put("huge", arr(1000), (1, 1))  # larger than the whole cache: not kept
    assert cache.get("huge") is None and cache.get("d") is not None


# --- prompt expansion --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def layout(tiny_model_dir, tiny_tokenizer) -> ImageTokenLayout:
    return ImageTokenLayout.from_checkpoint(tiny_model_dir, tiny_tokenizer)


IMG = {"type": "image"}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


CONVERSATIONS = {
    "image first in the turn": [{"role": "user", "content": [IMG, text("What is this?")]}],
    "after a full stop": [{"role": "user", "content": [text("Look."), IMG, text("Describe it.")]}],
    "two in a row, then text": [{"role": "user", "content": [text("Compare"), IMG, IMG, text("please")]}],
    "last in the turn, with a system prompt": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": [text("Hello!"), IMG]}],
    "several turns": [
        {"role": "user", "content": [IMG, text("What is the capital of France?")]},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": [text("And this one?\n"), IMG, text("\n\nThanks")]}],
}


def test_layout_from_the_tiny_checkpoint(layout):
    assert (layout.boi_id, layout.eoi_id, layout.image_id) == (START_OF_IMAGE, END_OF_IMAGE, IMAGE_TOKEN)
    assert layout.tokens_per_image == MM_TOKENS_PER_IMAGE


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_expansion_matches_gemma3_processor(name, tiny_tokenizer, layout, processor):
    conversation = CONVERSATIONS[name]
    prompt = tiny_tokenizer.render_chat(conversation)
    ids = tiny_tokenizer.encode_chat(conversation)
    n = prompt.count("<start_of_image>")
    assert n == sum(part == IMG for m in conversation if isinstance(m["content"], list) for part in m["content"])

    expanded = expand_image_tokens(ids, tiny_tokenizer, layout, num_images=n)

    theirs = processor(text=prompt, images=[solid(RED)] * n, add_special_tokens=False)
    assert expanded.ids == list(theirs["input_ids"][0])
    image_positions = [i for i, t in enumerate(theirs["token_type_ids"][0]) if t == 1]
    assert expanded.image_positions == image_positions
    assert len(expanded.image_spans) == n and expanded.num_image_tokens == n * MM_TOKENS_PER_IMAGE
    for start, end in expanded.image_spans:
        assert expanded.ids[start - 1] == START_OF_IMAGE and expanded.ids[end] == END_OF_IMAGE


def test_expansion_refuses_placeholders_without_images(tiny_tokenizer, layout):
    typed = tiny_tokenizer.encode_chat([{"role": "user", "content": "hi <start_of_image> there"}])
    with pytest.raises(APIError, match="1 image placeholder") as exc:
        expand_image_tokens(typed, tiny_tokenizer, layout, num_images=0)
    assert exc.value.status == 400
    soft = tiny_tokenizer.encode_chat([{"role": "user", "content": "hi <image_soft_token>"}])
    with pytest.raises(APIError, match="reserved for images"):
        expand_image_tokens(soft, tiny_tokenizer, layout, num_images=0)
    plain = tiny_tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert expand_image_tokens(plain, tiny_tokenizer, layout, num_images=0).ids == plain


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/a.png", "http://localhost/a.png", "http://[::1]/a.png",
                                 "http://169.254.169.254/latest/meta-data", "http://10.1.2.3/a.png",
                                 "https://192.168.0.1/a.png"])
async def test_non_public_addresses_are_refused_by_default(config, url):
    pre = ImagePreprocessor(config, ImageLimits(fetch_timeout_s=2.0))
    with pytest.raises(APIError) as info:
        await pre.prepare([ImageRef(1, 0, 0, url)])
    assert info.value.status == 400 and "non-public address" in info.value.message

