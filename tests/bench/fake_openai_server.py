"""A stand-in OpenAI-compatible server, to test the benchmark layer in isolation: a real aiohttp server on
127.0.0.1 that streams OpenAI-shaped SSE (with the usage chunk when asked) and Truss-style plain-text
predict streams, and fails every `fail_every`-th request with HTTP 500."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time

from aiohttp import web

MODEL = "fake-gemma"


class FakeOpenAIServer:
    def __init__(self, fail_every: int = 0, ttft_s: float = 0.02, itl_s: float = 0.002) -> None:
        self.fail_every = fail_every  # 2: requests 2, 4, 6, ... get HTTP 500 (exactly half of an even count)
        self.ttft_s = ttft_s
        self.itl_s = itl_s
        self.bodies: list[dict] = []
        self._count = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- routes --------------------------------------------------------------------------------------
    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def _gate(self, request: web.Request) -> tuple[dict, web.Response | None]:
        body = await request.json()
        self.bodies.append(body)
        n = next(self._count)
        if self.fail_every and n % self.fail_every == 0:
            return body, web.json_response(
                {"error": {"message": "engine overloaded", "type": "server_error", "code": 500}}, status=500)
        if body.get("fake_hang_s"):
            await asyncio.sleep(body["fake_hang_s"])
        return body, None

    async def _sse(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body, error = await self._gate(request)
        if error is not None:
            return error
        n = body.get("max_tokens") or 8
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())

        async def send(choices: list, usage: dict | None = None) -> None:
            event = {"id": "cmpl-1", "object": obj, "created": created, "model": MODEL, "choices": choices}
            if usage is not None:
                event["usage"] = usage
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())

        if chat:
            await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        await asyncio.sleep(self.ttft_s)
        for i in range(n):
            if i:
                await asyncio.sleep(self.itl_s)
            piece = f" tok{i}"
            await send([{"index": 0, "delta": {"content": piece}, "finish_reason": None} if chat
                        else {"index": 0, "text": piece, "finish_reason": None}])
        await send([{"index": 0, "delta": {}, "finish_reason": "length"} if chat
                    else {"index": 0, "text": "", "finish_reason": "length"}])
        if (body.get("stream_options") or {}).get("include_usage"):
            prompt_tokens = 17
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                     "total_tokens": prompt_tokens + n}
            await send([], usage)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._sse(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._sse(request, chat=False)

    async def _predict(self, request: web.Request) -> web.StreamResponse:
        body, error = await self._gate(request)
        if error is not None:
            return error
        n = body.get("max_tokens") or 8
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        await asyncio.sleep(self.ttft_s)
        for i in range(n):
            if i:
                await asyncio.sleep(self.itl_s)
            await resp.write(f" tok{i}".encode())
        await resp.write_eof()
        return resp

    # --- lifecycle -----------------------------------------------------------------------------------
    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/models/model:predict", self._predict)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    def __enter__(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
