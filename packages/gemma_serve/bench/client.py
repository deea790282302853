"""The benchmark's HTTP client: sends one streaming request and records its life on the run's clock.

aiohttp rather than httpx: its C HTTP parser keeps the client's own cost per streamed chunk small, which
matters when a hundred streams share the benchmark machine's cores with the timing code.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gemma_serve.bench.endpoints import Endpoint, join_url
from gemma_serve.bench.workload import Prompt

SUCCESS, ERROR, INCOMPLETE = "success", "error", "incomplete"


@dataclass
class RequestRecord:
    """One request's timeline, in seconds since the run started, and what came back."""

    index: int
    scheduled_s: float
    sent_s: float | None = None
    first_token_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)  # arrival of every chunk that carried text
    end_s: float | None = None
    status: str = "pending"  # success | error | incomplete (cancelled when the run stopped)
    http_status: int | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    usage_source: str | None = None  # server | tokenizer | chunks: where completion_tokens came from
    finish_reason: str | None = None
    output_chars: int = 0
    images: int = 0  # image parts the request carried

    def fail(self, error: str) -> None:
        self.status = ERROR
        self.error = error


class StreamingClient:
    """Sends requests to one endpoint over one connection pool (an async context manager)."""

    def __init__(self, base_url: str, endpoint: Endpoint, *, model: str | None, output_len: int,
                 ignore_eos: bool = False, timeout_s: float = 300.0, extra_body: dict[str, Any] | None = None,
                 count_tokens: Callable[[str], int] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.url = join_url(base_url, endpoint.path)
        self.endpoint = endpoint
        self.model = model
        self.output_len = output_len
        self.ignore_eos = ignore_eos
        self.timeout_s = timeout_s
        self.extra_body = extra_body or {}
        self.count_tokens = count_tokens  # a tokenizer's count, for servers that send no usage
        self.clock = clock
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> StreamingClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),  # the load shape caps concurrency, not the pool
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            read_bufsize=2**20,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, prompt: Prompt, record: RequestRecord) -> None:
        """Fills `record` as the response streams; a cancelled request is marked incomplete and re-raised."""
        assert self._session is not None, "use StreamingClient as `async with`"
        body = self.endpoint.body(prompt, self.model, self.output_len, self.ignore_eos, self.extra_body)
        parts: list[str] = []
        server_usage = False
        record.sent_s = self.clock()
        try:
            async with self._session.post(self.url, json=body) as resp:
                record.http_status = resp.status
                if resp.status != 200:
                    detail = _error_message((await resp.text(errors="replace")).strip())
                    record.fail(f"HTTP {resp.status}: {detail}" if detail else f"HTTP {resp.status}")
                elif resp.content_type == "application/json":
                    server_usage = await self._read_json(resp, record, parts)
                elif self.endpoint.sse:
                    server_usage = await self._read_sse(resp, record, parts)
                else:
                    await self._read_text(resp, record, parts)
        except asyncio.CancelledError:
            record.status = INCOMPLETE
            record.end_s = self.clock()
            self._count_output(record, parts, server_usage, prompt)
            raise
        except asyncio.TimeoutError:
            record.fail(f"timeout after {self.timeout_s:g} s")
        except (aiohttp.ClientError, ValueError) as exc:  # ValueError: malformed JSON in the stream
            record.fail(f"{type(exc).__name__}: {exc}"[:300])
        record.end_s = self.clock()
        if record.status == "pending":
            record.status = SUCCESS
        self._count_output(record, parts, server_usage, prompt)

    def _on_text(self, record: RequestRecord, parts: list[str], text: str, now: float) -> None:
        if record.first_token_s is None:
            record.first_token_s = now
        record.chunk_times_s.append(now)
        parts.append(text)

    async def _read_sse(self, resp: aiohttp.ClientResponse, record: RequestRecord, parts: list[str]) -> bool:
        server_usage, done = False, False
        async for raw in resp.content:
            now = self.clock()
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, event names
            data = line[5:].strip()
            if data == b"[DONE]":
                done = True
                break
            event = self.endpoint.parse(json.loads(data))
            if event.error:
                record.fail(f"stream error: {event.error}"[:300])
                return server_usage
            if event.text:
                self._on_text(record, parts, event.text, now)
            if event.finish_reason:
                record.finish_reason = event.finish_reason
            if event.usage:
                server_usage = self._take_usage(record, event.usage)
        if not done:
            record.fail("stream ended before [DONE]")
        return server_usage

    async def _read_text(self, resp: aiohttp.ClientResponse, record: RequestRecord, parts: list[str]) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        async for chunk in resp.content.iter_any():
            now = self.clock()
            text = decoder.decode(chunk)
            if text:
                self._on_text(record, parts, text, now)
        tail = decoder.decode(b"", final=True)
        if tail:
            parts.append(tail)

    async def _read_json(self, resp: aiohttp.ClientResponse, record: RequestRecord, parts: list[str]) -> bool:
        """A server that answered without streaming: Truss predict's {"text", "finish_reason", "usage"},
        or an OpenAI completion object. One chunk: TTFT equals the end-to-end latency."""
        payload = await resp.json()
        now = self.clock()
        choice = (payload.get("choices") or [{}])[0]
        text = payload.get("text") or (choice.get("message") or {}).get("content") or choice.get("text") or ""
        if text:
            self._on_text(record, parts, text, now)
        record.finish_reason = payload.get("finish_reason") or choice.get("finish_reason")
        return bool(payload.get("usage")) and self._take_usage(record, payload["usage"])

    @staticmethod
    def _take_usage(record: RequestRecord, usage: dict[str, Any]) -> bool:
        if usage.get("completion_tokens") is None:
            return False
        record.prompt_tokens = usage.get("prompt_tokens")
        record.completion_tokens = int(usage["completion_tokens"])
        record.usage_source = "server"
        return True

    def _count_output(self, record: RequestRecord, parts: list[str], server_usage: bool,
                      prompt: Prompt) -> None:
        text = "".join(parts)
        record.output_chars = len(text)
        if server_usage:
            return
        # The server sent no usage: count with the tokenizer if there is one, else one token per chunk
        # (exact for servers that flush every token, an undercount for ones that batch several).
        if self.count_tokens is not None:
            record.completion_tokens = self.count_tokens(text) if text else 0
            record.usage_source = "tokenizer"
        else:
            record.completion_tokens = len(record.chunk_times_s)
            record.usage_source = "chunks"
        record.prompt_tokens = prompt.input_tokens


def _error_message(body: str) -> str:
    """The message of an OpenAI-style ({"error": {"message"}}) or FastAPI-style ({"detail"}) error body."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body[:300]
    if isinstance(payload, dict):
        err = payload.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
        if payload.get("detail"):
            return str(payload["detail"])[:300]
    return body[:300]


async def discover_model(base_url: str, timeout_s: float = 5.0) -> str | None:
    """The first model id that GET /v1/models lists, or None where the route is missing or fails."""
    try:
        async with (aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
                    session.get(join_url(base_url, "/v1/models")) as resp):
            if resp.status != 200:
                return None
            data = (await resp.json(content_type=None)).get("data") or []
            return str(data[0]["id"]) if data else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError, AttributeError):
        return None
