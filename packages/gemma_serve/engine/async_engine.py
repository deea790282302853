"""`AsyncEngine`: the engine loop in one background thread, requests as async iterators.

Requests and aborts from any thread or event loop go through a command queue that the engine thread
drains between steps, so the engine's state is only ever changed by its own thread. Deltas go back
to each request's event loop with `call_soon_threadsafe`. Leaving a stream early (break, task
cancelled, aclose, or just dropping it) aborts the request and frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass

from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.gc_freeze import freeze_long_lived, unfreeze
from gemma_serve.engine.llm_engine import LLMEngine
from gemma_serve.engine.multimodal import ImageInput
from gemma_serve.engine.outputs import EngineOverloadedError, EngineStats, RequestOutput
from gemma_serve.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    sink: asyncio.Queue
    images: list[ImageInput] | None = None


class RequestStream:
    """The deltas of one request, ending after the finished one. An exception delivered by the
    engine (a failed step, shutdown) is raised from `__anext__`.

    A plain class rather than an async generator: `aclose()` must work while an `__anext__` is
    pending in another task (an async generator refuses: "already running"), and a stream that is
    dropped, even before its first `__anext__`, must still abort its request (`__del__`)."""

    def __init__(self, engine: AsyncEngine, request: _Request) -> None:
        self._engine = engine
        self._request = request
        self._done = False
        self._error: BaseException | None = None  # met by take_ready(), raised by the next __anext__

    @property
    def request_id(self) -> str:
        return self._request.request_id

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._error is not None:
            error, self._error, self._done = self._error, None, True
            raise error
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._request.sink.get()
        except BaseException:  # cancelled while waiting: the consumer is gone
            self._leave()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finished:
            self._done = True
        return item

    def take_ready(self) -> list[RequestOutput]:
        """The outputs already delivered, without waiting. A consumer that falls behind the engine
        (many streams, one event loop) sends what piled up as one message instead of one per step;
        one that keeps up gets [] and adds no latency. An error met here is raised by the next
        `__anext__`."""
        ready: list[RequestOutput] = []
        while not self._done and self._error is None:
            try:
                item = self._request.sink.get_nowait()
            except asyncio.QueueEmpty:
                break
            if isinstance(item, BaseException):
                self._error = item
                break
            if item.finished:
                self._done = True
            ready.append(item)
        return ready

    async def aclose(self) -> None:
        self._leave()

    def _leave(self) -> None:
        if not self._done:
            self._done = True
            self._engine.abort(self.request_id)

    def __del__(self) -> None:
        try:
            self._leave()
        except Exception:  # interpreter shutdown
            pass


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sinks: dict[str, _Request] = {}
        self._lock = threading.Lock()
        self._pending_adds = 0

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Load the model and allocate the KV cache (not started: call `start()`)."""
        return cls(LLMEngine(config))

    def start(self) -> None:
        if self._thread is None:
            if self.engine.config.freeze_gc:
                freeze_long_lived()
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="gemma-engine", daemon=True)
            self._thread.start()

    def shutdown(self) -> None:
        """Stop the loop; requests still in flight fail with RuntimeError."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
            if self.engine.config.freeze_gc:
                unfreeze()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    images: list[ImageInput] | None = None) -> RequestStream:
        """Validate now (raises RequestRejectedError / EngineOverloadedError / ValueError for a
        duplicate id or images that do not match the prompt), then stream deltas. Call from a
        running event loop."""
        self.engine.check_request(prompt_token_ids, params, images)
        loop = asyncio.get_running_loop()
        with self._lock:
            if request_id in self._sinks:
                raise ValueError(f"request id {request_id!r} is already in use")
            if len(self.engine.scheduler.waiting) + self._pending_adds >= self.engine.config.max_queue_len:
                raise EngineOverloadedError(
                    f"{self.engine.config.max_queue_len} requests are already waiting (max_queue_len)")
            request = _Request(request_id, list(prompt_token_ids), params, loop, asyncio.Queue(),
                               list(images) if images else None)
            self._sinks[request_id] = request
            self._pending_adds += 1
        self._commands.put(("add", request))
        self._wake.set()
        return RequestStream(self, request)

    def abort(self, request_id: str) -> None:
        """Thread-safe and idempotent; the request's blocks are freed before the next step."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def _deliver(self, request: _Request, item: RequestOutput | BaseException) -> None:
        try:
            request.loop.call_soon_threadsafe(request.sink.put_nowait, item)
        except RuntimeError:  # that event loop is closed: nobody is listening any more
            self._commands.put(("abort", request.request_id))

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._lock:
                    self._pending_adds -= 1
                    current = self._sinks.get(payload.request_id)
                if current is not payload:
                    continue  # aborted (and its id possibly reused) before it reached the engine
                try:
                    self.engine.add_request(payload.request_id, payload.prompt_token_ids, payload.params,
                                            payload.images)
                except Exception as exc:
                    with self._lock:
                        self._sinks.pop(payload.request_id, None)
                    self._deliver(payload, exc)
            else:
                self.engine.abort(payload)
                with self._lock:
                    self._sinks.pop(payload, None)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._drain_commands()
            if not self.engine.has_unfinished():
                # Sleep until a command arrives; the timeout only re-checks `_stop`.
                self._wake.wait(timeout=1.0)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:
                logger.exception("engine step failed; failing every request in flight")
                self._fail_all(exc)
                continue
            for out in outputs:
                with self._lock:
                    request = self._sinks.get(out.request_id)
                    if request is not None and out.finished:
                        del self._sinks[out.request_id]
                if request is not None:
                    self._deliver(request, out)
        self._drain_commands()
        self._fail_all(RuntimeError("the engine was shut down"))

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            requests = list(self._sinks.values())
            self._sinks.clear()
        for request in requests:
            self.engine.abort(request.request_id)
            self._deliver(request, exc)
