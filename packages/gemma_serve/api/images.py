"""Image inputs of chat requests: from OpenAI `image_url` content parts to the float32 pixel arrays the
vision tower takes, and the prompt's image placeholders expanded into the image tokens.

    refs = image_refs(request.messages)                     # in message order; counts checked
    images = await preprocessor.prepare(refs)                # fetch, decode, resize, normalize (cached)
    prompt = expand_image_tokens(ids, tokenizer, layout, num_images=len(images))

Every problem with one image (a bad URL, a fetch that fails, bytes that are not an image, too many
bytes or pixels) is a 400 APIError whose message names the image ("image 2 (messages[1].content[0])")
and the reason. Fetches are async (httpx), decoding and resizing run in worker threads
(asyncio.to_thread), so the serving event loop never blocks on an image.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import numpy as np

from gemma_serve.api.errors import APIError, invalid
from gemma_serve.bounded_lru import BoundedLRU

if TYPE_CHECKING:
    import httpx
    from PIL import Image as PILImage

    from gemma_serve.api.schemas import Message
    from gemma_serve.api.tokenizer import Tokenizer

# Formats decoded; anything else Pillow recognises is refused by name ("format BMP is not supported").
SUPPORTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
_REDIRECTS = (301, 302, 303, 307, 308)
_FETCH_SCHEMES = ("http", "https")


# --- configuration -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageLimits:
    """Per-request limits. The byte cap applies to the encoded file (after base64), the pixel cap to the
    size its header declares, checked before the pixels are decoded (decompression bombs)."""

    max_images: int = 8
    max_bytes: int = 20 * 2**20
    max_pixels: int = 50_000_000  # ~150 MB as 8-bit RGB while decoding; a 48 MP phone photo fits
    fetch_timeout_s: float = 10.0  # the whole fetch, redirects and body included
    max_redirects: int = 3
    # Fetch from loopback, private, link-local and other non-public addresses. Off by default: a
    # server that fetches any URL it is given would otherwise let a caller read the deployment's own
    # network (cloud metadata endpoints, internal services). On for local development and tests.
    allow_private_networks: bool = False


@dataclass(frozen=True)
class PreprocessConfig:
    """What the checkpoint's image processor does (preprocessor_config.json), for one fixed output size."""

    height: int
    width: int
    resample: int = 2  # PIL's BILINEAR, Gemma3ImageProcessor's default
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "PreprocessConfig":
        height, width = _image_size(config)
        if height <= 0 or width <= 0:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        resample = config.get("resample")
        return cls(
            height=height, width=width,
            resample=2 if resample is None else int(resample),
            do_rescale=_flag(config.get("do_rescale"), True),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            do_normalize=_flag(config.get("do_normalize"), True),
            image_mean=_triple(config.get("image_mean", 0.5), "image_mean"),
            image_std=_triple(config.get("image_std", 0.5), "image_std"),
        )

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> "PreprocessConfig":
        """From `preprocessor_config.json`; the size falls back to config.json's vision_config.image_size
        (some exports ship without a preprocessor config)."""
        folder = Path(folder)
        config = _read_json(folder / "preprocessor_config.json")
        if "size" not in config and "image_size" not in config:
            vision = _read_json(folder / "config.json").get("vision_config") or {}
            if "image_size" not in vision:
                raise ValueError(f"{folder}: no image size in preprocessor_config.json or config.json")
            config = {**config, "image_size": vision["image_size"]}
        return cls.from_dict(config)


def _image_size(config: dict[str, Any]) -> tuple[int, int]:
    size = config.get("size", config.get("image_size"))
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            return int(size["height"]), int(size["width"])
        raise ValueError(f"unsupported image size {size!r}: expected {{'height': ..., 'width': ...}}")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return int(size[0]), int(size[1])
    if isinstance(size, int):
        return size, size
    raise ValueError(f"unsupported image size {size!r}")


def _flag(value: Any, default: bool) -> bool:
    return default if value is None else bool(value)


def _triple(value: Any, name: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 values (RGB), got {value!r}")
    return values[0], values[1], values[2]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}


# --- where the images are in a request ---------------------------------------------------------------

@dataclass(frozen=True)
class ImageRef:
    """One image content part: its place in the request (for error messages) and its URL."""

    index: int  # 1-based, in message order
    message_index: int
    part_index: int
    url: str

    @property
    def label(self) -> str:
        return f"image {self.index} (messages[{self.message_index}].content[{self.part_index}])"

    @property
    def param(self) -> str:
        # The dotted form pydantic's validation errors use for `param` (errors.from_validation_error).
        return f"messages.{self.message_index}.content.{self.part_index}.image_url.url"

    @property
    def source(self) -> str:
        """The URL for logs: data: URLs shortened to their media type."""
        if self.url[:5].lower() == "data:":
            return self.url.split(",", 1)[0] + ",..."
        return self.url


class ImageError(ValueError):
    """A problem with one image; `APIError`s are made from it where the image's place is known."""

    def __init__(self, reason: str, code: str = "invalid_image") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code

    def for_image(self, ref: ImageRef) -> APIError:
        return invalid(f"{ref.label}: {self.reason}", param=ref.param, code=self.code)


def image_refs(messages: Sequence["Message"], limits: ImageLimits | None = None) -> list[ImageRef]:
    """The image parts of `messages`, in order; more than `limits.max_images` is a 400 (checked before
    anything is fetched)."""
    refs: list[ImageRef] = []
    for m, message in enumerate(messages):
        if message.content is None or isinstance(message.content, str):
            continue
        for p, part in enumerate(message.content):
            if part.type == "image_url":
                refs.append(ImageRef(len(refs) + 1, m, p, part.image_url.url))
    if limits is not None and len(refs) > limits.max_images:
        first_extra = refs[limits.max_images]
        raise invalid(f"{first_extra.label}: too many images ({len(refs)}); at most {limits.max_images} "
                      "per request", param=first_extra.param, code="too_many_images")
    return refs


# --- bytes from a URL --------------------------------------------------------------------------------

def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:[<media type>][;base64],<data>` URL (RFC 2397). Raises ImageError."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageError("malformed data: URL (no ',' before the data)", "invalid_image_url")
    params = [p.strip().lower() for p in header.split(";")]
    media_type, is_base64 = params[0], "base64" in params[1:]
    if media_type and not media_type.startswith("image/") and media_type != "application/octet-stream":
        raise ImageError(f"the data: URL declares media type {media_type!r}, not an image", "invalid_image")
    if not is_base64:
        data = unquote_to_bytes(payload)
    else:
        if "%" in payload:  # some clients percent-encode '+', '/' and '='
            payload = unquote_to_bytes(payload).decode("ascii", "replace")
        payload = "".join(payload.split())  # line breaks (MIME-style base64) are not data
        # Refuse an oversized payload before decoding it: base64 is 4 characters per 3 bytes.
        if len(payload) // 4 * 3 > max_bytes + 3:
            raise ImageError(f"image too large (about {len(payload) // 4 * 3} bytes; the limit is {max_bytes})",
                             "image_too_large")
        payload += "=" * (-len(payload) % 4)  # clients often drop the padding
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ImageError(f"the data: URL is not valid base64 ({exc})", "invalid_image_url") from None
    if len(data) > max_bytes:
        raise ImageError(f"image too large ({len(data)} bytes; the limit is {max_bytes})", "image_too_large")
    if not data:
        raise ImageError("the data: URL is empty", "invalid_image")
    return data


async def fetch_image_bytes(url: str, limits: ImageLimits, client: "httpx.AsyncClient") -> bytes:
    """GET an http(s) URL: at most `limits.max_redirects` redirects, each to http(s) only, a body of at
    most `limits.max_bytes`, all within `limits.fetch_timeout_s`. Raises ImageError."""
    import httpx

    try:
        # One deadline for everything: httpx's timeouts are per read, so a server trickling bytes would
        # otherwise hold the request for as long as it likes.
        return await asyncio.wait_for(_fetch(url, limits, client), limits.fetch_timeout_s)
    except asyncio.TimeoutError:
        raise ImageError(f"fetching {url} timed out after {limits.fetch_timeout_s:g} s",
                         "image_fetch_failed") from None
    except httpx.TimeoutException:
        raise ImageError(f"fetching {url} timed out after {limits.fetch_timeout_s:g} s",
                         "image_fetch_failed") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # DNS, connection refused or reset, TLS, bad URLs
        raise ImageError(f"{url} could not be fetched ({type(exc).__name__}: {exc or 'no detail'})",
                         "image_fetch_failed") from None


async def _fetch(url: str, limits: ImageLimits, client: "httpx.AsyncClient") -> bytes:
    current = url
    for _ in range(limits.max_redirects + 1):
        _check_fetch_scheme(current, redirected_from=None if current == url else url)
        if not limits.allow_private_networks:
            await _check_public_host(current)
        async with client.stream("GET", current, follow_redirects=False,
                                 headers={"Accept": "image/*"}) as response:
            if response.status_code in _REDIRECTS:
                location = response.headers.get("location")
                if not location:
                    raise ImageError(f"{current} answered HTTP {response.status_code} without a Location",
                                     "image_fetch_failed")
                current = urljoin(current, location)
                continue
            if not 200 <= response.status_code < 300:
                raise ImageError(f"{current} answered HTTP {response.status_code}", "image_fetch_failed")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limits.max_bytes:
                raise ImageError(f"image too large ({declared} bytes; the limit is {limits.max_bytes})",
                                 "image_too_large")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > limits.max_bytes:  # a missing or lying Content-Length
                    raise ImageError(f"image too large (over {limits.max_bytes} bytes)", "image_too_large")
            return bytes(body)
    raise ImageError(f"fetching {url} took more than {limits.max_redirects} redirects", "image_fetch_failed")


def _check_fetch_scheme(url: str, redirected_from: str | None) -> None:
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:  # "Invalid IPv6 URL" and the like
        raise ImageError(f"malformed URL {url!r} ({exc})", "invalid_image_url") from None
    if scheme in _FETCH_SCHEMES:
        return
    if redirected_from is not None:
        raise ImageError(f"{redirected_from} redirects to {url}; only http and https redirects are followed",
                         "image_fetch_failed")
    raise ImageError(f"unsupported URL scheme {scheme + ':' if scheme else '(none)'}; give an http(s) URL "
                     "or a data: URL", "invalid_image_url")


async def _check_public_host(url: str) -> None:
    """Refuse a URL whose host is, or resolves to, a non-public address (checked on every redirect hop).
    A DNS answer that changes between this check and the connection can still slip through; the
    deployment's network policy is the real fence, this keeps the obvious doors shut."""
    import ipaddress
    import socket

    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as exc:
        raise ImageError(f"malformed URL {url!r} ({exc})", "invalid_image_url") from None
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ImageError(f"{url} could not be fetched (cannot resolve {host!r}: {exc})",
                         "image_fetch_failed") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%", 1)[0])
        if not address.is_global or address.is_multicast:
            raise ImageError(f"{url} resolves to a non-public address ({address}); this server fetches only "
                             "public URLs", "image_url_not_allowed")


# --- bytes to pixels ---------------------------------------------------------------------------------

def preprocess_image(data: bytes, config: PreprocessConfig,
                     limits: ImageLimits) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode (first frame), convert to RGB, resize and normalize: float32 [3, height, width], and the
    original (width, height). CPU-heavy: call it off the event loop. Raises ImageError."""
    from PIL import Image, UnidentifiedImageError

    try:
        # Image.open reads only the header: the size is known before any pixel is decoded.
        with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as img:
            width, height = img.size
            if width * height > limits.max_pixels:
                raise ImageError(f"image has too many pixels ({width}x{height}; the limit is "
                                 f"{limits.max_pixels} pixels)", "image_too_large")
            img.seek(0)  # animated GIF / WebP / APNG: the first frame
            rgb = _to_rgb(img)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # Pillow's own cap (2x MAX_IMAGE_PIXELS), hit in open()
        raise ImageError(f"image has too many pixels ({exc})", "image_too_large") from None
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except Exception as exc:  # truncated or corrupt files: OSError, SyntaxError, ValueError from plugins
        raise ImageError(f"the image could not be decoded ({type(exc).__name__}: {exc})", "invalid_image") from None
    return normalize(rgb, config), (width, height)


def normalize(img: "PILImage.Image", config: PreprocessConfig) -> np.ndarray:
    """An RGB image resized to the config's size, rescaled and normalized: float32 [3, H, W]."""
    if img.size != (config.width, config.height):
        img = img.resize((config.width, config.height), resample=config.resample)
    pixels = np.asarray(img, dtype=np.float32)  # [H, W, 3]
    if config.do_rescale:
        pixels *= np.float32(config.rescale_factor)
    if config.do_normalize:
        pixels -= np.asarray(config.image_mean, dtype=np.float32)
        pixels /= np.asarray(config.image_std, dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _to_rgb(img: "PILImage.Image") -> "PILImage.Image":
    from PIL import Image

    if img.mode.startswith("I;16"):
        # 16-bit grayscale PNGs: Pillow's convert clips to 0..255 (all white); keep the top 8 bits instead.
        img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8), mode="L")
    has_alpha = "A" in img.getbands() or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        # Transparent areas show white, as in a browser on a white page; a plain convert("RGB") would
        # show whatever colour the transparent pixels happen to store (often black).
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _identify(data: bytes) -> str | None:
    """The format Pillow would read `data` as, with every plugin (header only)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except Exception:
        return None


def _unidentified(data: bytes) -> ImageError:
    other = _identify(data)
    if other is not None:
        return ImageError(f"image format {other} is not supported (use PNG, JPEG, WebP or GIF)",
                          "unsupported_image_format")
    return ImageError("the data is not an image (or not one in a format this server reads: PNG, JPEG, WebP, GIF)",
                      "invalid_image")


# --- cache -------------------------------------------------------------------------------------------

@dataclass
class _Entry:
    pixel_values: np.ndarray
    size: tuple[int, int]


class ImageCache(BoundedLRU[_Entry]):
    """LRU cache of preprocessed images keyed by the sha256 of their bytes, bounded by entry count and
    by the arrays' bytes. One cache belongs to one PreprocessConfig (the key does not include it).
    Thread-safe; cached arrays are read-only, as every request holding one shares it."""

    def __init__(self, max_entries: int = 64, max_bytes: int = 256 * 2**20) -> None:
        super().__init__(max_entries, max_bytes, lambda entry: entry.pixel_values.nbytes)

    def put(self, digest: str, pixel_values: np.ndarray, size: tuple[int, int]) -> None:  # type: ignore[override]
        pixel_values.setflags(write=False)
        super().put(digest, _Entry(pixel_values, size))


# --- the request-level entry point -------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class PreparedImage:
    hash: str  # sha256 hex of the image's bytes (as sent or fetched)
    pixel_values: np.ndarray = field(repr=False)  # float32 [3, H, W], read-only (shared with the cache)
    source: ImageRef
    original_size: tuple[int, int]  # (width, height) before resizing


class ImagePreprocessor:
    """Turns a request's image refs into PreparedImages: fetches concurrently, decodes in worker threads,
    and reuses cached arrays for images seen before (or twice in one request)."""

    def __init__(self, config: PreprocessConfig, limits: ImageLimits | None = None,
                 cache: ImageCache | None = None, client: "httpx.AsyncClient | None" = None) -> None:
        self.config = config
        self.limits = limits or ImageLimits()
        self.cache = cache if cache is not None else ImageCache()
        # A shared client pools connections; without one, each request with http images makes its own.
        self.client = client

    async def prepare_messages(self, messages: Sequence["Message"]) -> list[PreparedImage]:
        return await self.prepare(image_refs(messages, self.limits))

    async def prepare(self, refs: Sequence[ImageRef]) -> list[PreparedImage]:
        if len(refs) > self.limits.max_images:
            extra = refs[self.limits.max_images]
            raise invalid(f"{extra.label}: too many images ({len(refs)}); at most {self.limits.max_images} "
                          "per request", param=extra.param, code="too_many_images")
        if not refs:
            return []
        blobs = await self._load_all(refs)
        digests = await asyncio.gather(*(_sha256(b) for b in blobs))

        found: dict[str, _Entry] = {}
        todo: dict[str, int] = {}  # digest -> index of its first image, decoded once per request
        for i, digest in enumerate(digests):
            if digest in found or digest in todo:
                continue
            entry = self.cache.get(digest)
            if entry is not None:
                found[digest] = entry
            else:
                todo[digest] = i
        results = await asyncio.gather(
            *(asyncio.to_thread(preprocess_image, blobs[i], self.config, self.limits) for i in todo.values()),
            return_exceptions=True)
        _raise_first(refs, list(todo.values()), results)
        for digest, (pixels, size) in zip(todo, results):
            self.cache.put(digest, pixels, size)
            found[digest] = _Entry(pixels, size)

        seen: set[str] = set()
        images = []
        for ref, digest in zip(refs, digests):
            entry = found[digest]
            if digest in seen:  # a repeat within this request: served from the cache, counted as a hit
                entry = self.cache.get(digest) or entry
            seen.add(digest)
            images.append(PreparedImage(digest, entry.pixel_values, ref, entry.size))
        return images

    async def _load_all(self, refs: Sequence[ImageRef]) -> list[bytes]:
        if any(not _is_data_url(r.url) for r in refs) and self.client is None:
            import httpx

            async with httpx.AsyncClient(timeout=self.limits.fetch_timeout_s) as client:
                return await self._load_with(refs, client)
        return await self._load_with(refs, self.client)

    async def _load_with(self, refs: Sequence[ImageRef], client: "httpx.AsyncClient | None") -> list[bytes]:
        results = await asyncio.gather(*(self._load(ref, client) for ref in refs), return_exceptions=True)
        _raise_first(refs, range(len(refs)), results)
        return list(results)

    async def _load(self, ref: ImageRef, client: "httpx.AsyncClient | None") -> bytes:
        url = ref.url.strip()
        if _is_data_url(url):
            if len(url) > 4 * 2**20:  # decoding megabytes of base64 holds the loop: do it in a thread
                return await asyncio.to_thread(decode_data_url, url, self.limits.max_bytes)
            return decode_data_url(url, self.limits.max_bytes)
        if not url:
            raise ImageError("the image URL is empty", "invalid_image_url")
        _check_fetch_scheme(url, redirected_from=None)
        assert client is not None
        data = await fetch_image_bytes(url, self.limits, client)
        if not data:
            raise ImageError(f"{url} answered with an empty body", "invalid_image")
        return data


def _is_data_url(url: str) -> bool:
    return url.lstrip()[:5].lower() == "data:"


async def _sha256(data: bytes) -> str:
    if len(data) > 2**20:  # hashlib releases the GIL for large buffers
        return await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
    return hashlib.sha256(data).hexdigest()


def _raise_first(refs: Sequence[ImageRef], indices: Sequence[int], results: Sequence[Any]) -> None:
    """Raise the error of the earliest image that failed (in message order), as a 400 naming it."""
    for i, result in sorted(zip(indices, results), key=lambda pair: pair[0]):
        if isinstance(result, ImageError):
            raise result.for_image(refs[i])
        if isinstance(result, APIError):
            raise result
        if isinstance(result, BaseException) and not isinstance(result, Exception):
            raise result  # cancellation and interrupts are not the image's fault
        if isinstance(result, Exception):
            raise ImageError(f"the image could not be read ({type(result).__name__}: {result})").for_image(refs[i]) \
                from result


# --- prompt expansion --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageTokenLayout:
    """Gemma 3's image tokens: the chat template writes `<start_of_image>` where an image goes, and the
    model reads "\\n\\n<start_of_image>" + "<image_soft_token>" * tokens_per_image + "<end_of_image>\\n\\n"
    there (transformers' Gemma3Processor.full_image_sequence)."""

    boi_id: int
    eoi_id: int
    image_id: int
    tokens_per_image: int
    boi_token: str = "<start_of_image>"
    eoi_token: str = "<end_of_image>"
    image_token: str = "<image_soft_token>"
    # Ids the tokenizer splits text at (its added tokens); computed once, as the real vocabulary has
    # thousands. Empty: computed at each expansion.
    split_ids: frozenset[int] = field(default=frozenset(), repr=False)

    @classmethod
    def from_tokenizer(cls, tokenizer: "Tokenizer | Any", tokens_per_image: int) -> "ImageTokenLayout":
        hf = _hf(tokenizer)
        boi = getattr(hf, "boi_token", None) or "<start_of_image>"
        eoi = getattr(hf, "eoi_token", None) or "<end_of_image>"
        image = getattr(hf, "image_token", None) or "<image_soft_token>"
        vocab = hf.get_vocab()
        missing = [t for t in (boi, eoi, image) if t not in vocab]
        if missing:
            raise ValueError(f"the tokenizer has no image tokens {missing}")
        return cls(vocab[boi], vocab[eoi], vocab[image], tokens_per_image, boi, eoi, image, _split_ids(hf))

    @classmethod
    def from_checkpoint(cls, folder: str | Path, tokenizer: "Tokenizer | Any") -> "ImageTokenLayout":
        """Tokens per image from processor_config.json / preprocessor_config.json (`image_seq_length`) or
        config.json (`mm_tokens_per_image`); ids from the tokenizer, checked against config.json."""
        folder = Path(folder)
        config = _read_json(folder / "config.json")
        count = (_read_json(folder / "processor_config.json").get("image_seq_length")
                 or _read_json(folder / "preprocessor_config.json").get("image_seq_length")
                 or config.get("mm_tokens_per_image"))
        if not count:
            raise ValueError(f"{folder}: no image_seq_length or mm_tokens_per_image in the checkpoint's configs")
        layout = cls.from_tokenizer(tokenizer, int(count))
        for key, ours in (("boi_token_index", layout.boi_id), ("eoi_token_index", layout.eoi_id),
                          ("image_token_index", layout.image_id)):
            if key in config and config[key] != ours:
                raise ValueError(f"{folder}: config.json's {key} is {config[key]}, the tokenizer's is {ours}")
        return layout

    @property
    def full_sequence(self) -> str:
        return f"\n\n{self.boi_token}{self.image_token * self.tokens_per_image}{self.eoi_token}\n\n"


@dataclass(frozen=True)
class ExpandedPrompt:
    ids: list[int]
    image_spans: list[tuple[int, int]]  # per image, [start, end) of its soft tokens in `ids`

    @property
    def image_positions(self) -> list[int]:
        return [i for start, end in self.image_spans for i in range(start, end)]

    @property
    def num_image_tokens(self) -> int:
        return sum(end - start for start, end in self.image_spans)


def expand_image_tokens(ids: Sequence[int], tokenizer: "Tokenizer | Any", layout: ImageTokenLayout,
                        num_images: int | None = None) -> ExpandedPrompt:
    """Expand every `<start_of_image>` in `ids` into the full image sequence, giving exactly the ids
    Gemma3Processor gives for the same text.

    The processor expands text, then tokenizes: the "\\n\\n" on each side merges with the neighbouring
    text ("user\\n" + "\\n\\n" is "\\n\\n" "\\n", "." + "\\n\\n" is one token in some vocabularies). So the
    text runs next to each placeholder are decoded, joined with "\\n\\n" and tokenized again; runs end at
    added (special) tokens, where the tokenizer splits text too, so nothing further away changes.

    `num_images`, when given, must equal the number of placeholders (a client can type
    "<start_of_image>" as text; without a matching image it must not reach the model). Literal image
    soft tokens in the prompt are refused: the engine places image embeddings wherever they are."""
    hf = _hf(tokenizer)
    ids = list(ids)
    placeholders = ids.count(layout.boi_id)
    if num_images is not None and placeholders != num_images:
        raise invalid(f"the prompt has {placeholders} image placeholder(s) ({layout.boi_token}) for "
                      f"{num_images} image(s)", param="messages", code="image_placeholder_mismatch")
    if layout.image_id in ids:
        raise invalid(f"the prompt contains {layout.image_token} as text; it is reserved for images",
                      param="messages", code="invalid_prompt")
    if not placeholders:
        return ExpandedPrompt(ids, [])

    special = layout.split_ids or _split_ids(hf)
    # Items: ints are special ids kept as they are; lists are text runs as pieces, each either a list of
    # ids (prompt text) or the str "\n\n" (from an expansion).
    items: list[Any] = []

    def text_piece(piece: Any) -> None:
        if items and isinstance(items[-1], list):
            items[-1].append(piece)
        else:
            items.append([piece])

    run: list[int] = []
    for token in ids:
        if token not in special:
            run.append(token)
            continue
        if run:
            text_piece(run)
            run = []
        if token == layout.boi_id:
            text_piece("\n\n")
            items.extend([layout.boi_id] + [layout.image_id] * layout.tokens_per_image + [layout.eoi_id])
            text_piece("\n\n")
        else:
            items.append(token)
    if run:
        text_piece(run)

    out: list[int] = []
    spans: list[tuple[int, int]] = []
    for item in items:
        if isinstance(item, int):
            if item == layout.boi_id:
                spans.append((len(out) + 1, len(out) + 1 + layout.tokens_per_image))
            out.append(item)
        elif len(item) == 1 and not isinstance(item[0], str):
            out.extend(item[0])  # prompt text with no image next to it: as it was
        else:
            out.extend(_retokenize(hf, item))
    return ExpandedPrompt(out, spans)


def _split_ids(hf: Any) -> frozenset[int]:
    return frozenset(getattr(hf, "added_tokens_decoder", None) or {}) | frozenset(hf.all_special_ids)


def _retokenize(hf: Any, pieces: list[Any]) -> list[int]:
    texts = []
    for piece in pieces:
        if isinstance(piece, str):
            texts.append(piece)
            continue
        text = hf.decode(piece, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if _encode(hf, text) != piece:
            # The tokenizer does not round-trip this run (unusual normalization): keep its ids and splice
            # the newlines in as their own tokens rather than change the client's text.
            return [i for p in pieces for i in (_encode(hf, p) if isinstance(p, str) else p)]
        texts.append(text)
    return _encode(hf, "".join(texts))


def _encode(hf: Any, text: str) -> list[int]:
    return list(hf(text, add_special_tokens=False)["input_ids"])


def _hf(tokenizer: Any) -> Any:
    """The Hugging Face tokenizer inside gemma_serve's Tokenizer, or the argument itself."""
    return getattr(tokenizer, "hf", tokenizer)
