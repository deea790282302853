"""/v1/chat/completions and /v1/completions over the same pipeline as Truss predict.

`n` choices of one prompt run as n engine requests; the first starts alone and the rest start once
it has produced its first token, so the prompt is computed once and the others find it in the
engine's prefix cache.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from starlette.responses import JSONResponse, Response, StreamingResponse

from gemma_serve.api import errors
from gemma_serve.api.chat_prompt import ChatPrompt
from gemma_serve.api.images import PreparedImage
from gemma_serve.api.openai_schemas import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    OpenAIFields,
    TokenLogprob,
    Usage,
)
from gemma_serve.api.pipeline import Finished, GenerationPipeline, Prepared, TextDelta

_DONE = object()


@dataclass
class ChoiceState:
    """What one choice has produced so far."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finished: Finished | None = None


async def run_choices(pipeline: GenerationPipeline, groups: list[list[Prepared]]
                      ) -> AsyncIterator[tuple[int, TextDelta | Finished]]:
    """Merge the events of every choice, tagged with its index. `groups` holds, per prompt, its
    choices; within a group the first choice leads and the rest wait for its first event."""
    queue: asyncio.Queue = asyncio.Queue()
    tasks: list[asyncio.Task] = []

    async def pump(index: int, prepared: Prepared, wait_for: asyncio.Event | None, lead: asyncio.Event | None):
        try:
            if wait_for is not None:
                await wait_for.wait()
            async for event in pipeline.stream(prepared):
                if lead is not None:
                    lead.set()
                await queue.put((index, event, None))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # delivered to the consumer, which re-raises it
            await queue.put((index, None, exc))
        finally:
            if lead is not None:
                lead.set()  # never leave followers waiting, even when the leader failed
            queue.put_nowait((index, _DONE, None))

    index = 0
    for group in groups:
        lead = asyncio.Event()
        for position, prepared in enumerate(group):
            leader = position == 0
            tasks.append(asyncio.create_task(
                pump(index, prepared, None if leader else lead, lead if leader and len(group) > 1 else None)))
            index += 1
    remaining = len(tasks)
    try:
        while remaining:
            idx, event, exc = await queue.get()
            if exc is not None:
                raise exc
            if event is _DONE:
                remaining -= 1
                continue
            yield idx, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class OpenAIRoutes:
    def __init__(self, pipeline: GenerationPipeline, model_name: str,
                 chat_prompt: Callable[[list], Awaitable[ChatPrompt]]) -> None:
        self.pipeline = pipeline
        self.model_name = model_name
        self._chat_prompt = chat_prompt

    # --- chat --------------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest) -> Response:
        prompt = await self._chat_prompt(body.messages)
        prompt_ids = prompt.ids
        groups = [self._choices(prompt_ids, body, body.requested_max_tokens, body.logprobs, prompt.images)]
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        events = run_choices(self.pipeline, groups)
        if body.stream:
            first = await _first(events)
            return _sse(self._chat_chunks(rid, created, body, first, events))
        states = await _collect(events, body.n)
        choices = [ChatChoice(index=i, message=ChatMessageOut(content="".join(s.text)),
                              finish_reason=s.finished.finish_reason,
                              logprobs=self._chat_logprobs(s.token_ids, s.logprobs) if body.logprobs else None)
                   for i, s in enumerate(states)]
        usage = _usage(states, prompt_counts=[len(prompt_ids)])
        return JSONResponse(ChatCompletion(id=rid, created=created, model=self.model_name, choices=choices,
                                           usage=usage).model_dump(exclude_none=False))

    async def _chat_chunks(self, rid: str, created: int, body: ChatCompletionRequest,
                           first: tuple[int, TextDelta | Finished] | None,
                           events: AsyncIterator[tuple[int, TextDelta | Finished]]) -> AsyncIterator[str]:
        def chunk(choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
            out = ChatCompletionChunk(id=rid, created=created, model=self.model_name, choices=choices, usage=usage)
            data = out.model_dump(exclude_none=True)
            if body.include_usage and usage is None:
                data["usage"] = None  # OpenAI sends an explicit null on every chunk but the last
            return f"data: {json.dumps(data)}\n\n"

        states = [ChoiceState() for _ in range(body.n)]
        for i in range(body.n):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        async for index, event in _prepend(first, events):
            state = states[index]
            if isinstance(event, TextDelta):
                if event.text or (body.logprobs and event.logprobs):
                    logprobs = self._chat_logprobs(event.token_ids, event.logprobs) if body.logprobs else None
                    yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=event.text), logprobs=logprobs)])
            else:
                state.finished = event
                yield chunk([ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=event.finish_reason)])
        if body.include_usage:
            yield chunk([], _usage(states, prompt_counts=[states[0].finished.prompt_tokens]))
        yield "data: [DONE]\n\n"

    def _chat_logprobs(self, token_ids: list[int], logprobs: list[float] | None) -> ChoiceLogprobs:
        entries = []
        for token_id, logprob in zip(token_ids, logprobs or []):
            text = self.pipeline.tokenizer.decode([token_id], skip_special_tokens=False)
            entries.append(TokenLogprob(token=text, logprob=logprob, bytes=list(text.encode("utf-8"))))
        return ChoiceLogprobs(content=entries)

    # --- completions -------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest) -> Response:
        tokenizer = self.pipeline.tokenizer
        prompts = [p if isinstance(p, list) else tokenizer.encode_prompt(p) for p in body.prompts]
        max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
        want_logprobs = body.logprobs is not None
        groups = [self._choices(ids, body, max_tokens, want_logprobs) for ids in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        events = run_choices(self.pipeline, groups)
        total = len(prompts) * body.n
        if body.stream:
            first = await _first(events)
            return _sse(self._completion_chunks(rid, created, body, total, first, events, want_logprobs))
        states = await _collect(events, total)
        choices = [CompletionChoice(index=i, text="".join(s.text), finish_reason=s.finished.finish_reason,
                                    logprobs=self._completion_logprobs(s.token_ids, s.logprobs) if want_logprobs else None)
                   for i, s in enumerate(states)]
        usage = _usage(states, prompt_counts=[len(ids) for ids in prompts])
        return JSONResponse(Completion(id=rid, created=created, model=self.model_name, choices=choices,
                                       usage=usage).model_dump())

    async def _completion_chunks(self, rid, created, body: CompletionRequest, total: int, first, events,
                                 want_logprobs: bool) -> AsyncIterator[str]:
        def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
            data = Completion(id=rid, created=created, model=self.model_name, choices=choices,
                              usage=usage).model_dump(exclude_none=True)
            if body.include_usage and usage is None:
                data["usage"] = None
            for c in data["choices"]:
                c.setdefault("finish_reason", None)
            return f"data: {json.dumps(data)}\n\n"

        states = [ChoiceState() for _ in range(total)]
        prompt_counts: dict[int, int] = {}
        async for index, event in _prepend(first, events):
            if isinstance(event, TextDelta):
                if event.text or (want_logprobs and event.logprobs):
                    lp = self._completion_logprobs(event.token_ids, event.logprobs) if want_logprobs else None
                    yield chunk([CompletionChoice(index=index, text=event.text, logprobs=lp)])
            else:
                states[index].finished = event
                prompt_counts[index // body.n] = event.prompt_tokens
                yield chunk([CompletionChoice(index=index, text="", finish_reason=event.finish_reason)])
        if body.include_usage:
            yield chunk([], _usage(states, prompt_counts=list(prompt_counts.values())))
        yield "data: [DONE]\n\n"

    def _completion_logprobs(self, token_ids: list[int], logprobs: list[float] | None) -> CompletionLogprobs:
        tokens = [self.pipeline.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return CompletionLogprobs(tokens=tokens, token_logprobs=list(logprobs or []), text_offset=offsets)

    # --- shared ------------------------------------------------------------------------------

    def _choices(self, prompt_ids: list[int], body: OpenAIFields, max_tokens: int | None, logprobs: bool,
                 images: list[PreparedImage] | None = None) -> list[Prepared]:
        # Distinct seeds per choice, so n > 1 gives n samples yet stays reproducible with a seed.
        return [self.pipeline.prepare(prompt_ids, body, max_tokens=max_tokens, logprobs=logprobs,
                                      seed=None if body.seed is None else body.seed + i, images=images or ())
                for i in range(body.n)]


async def _first(events):
    """Prime the stream so errors before the first token still get their status code."""
    try:
        return await events.__anext__()
    except StopAsyncIteration:
        return None
    except BaseException:
        await events.aclose()
        raise


async def _prepend(first, events):
    try:
        if first is not None:
            yield first
        async for item in events:
            yield item
    finally:
        await events.aclose()


async def _collect(events, count: int) -> list[ChoiceState]:
    states = [ChoiceState() for _ in range(count)]
    async for index, event in events:
        state = states[index]
        if isinstance(event, TextDelta):
            state.text.append(event.text)
            state.token_ids.extend(event.token_ids)
            if event.logprobs:
                state.logprobs.extend(event.logprobs)
        else:
            state.finished = event
    return states


def _usage(states: list[ChoiceState], prompt_counts: list[int]) -> Usage:
    prompt = sum(prompt_counts)
    completion = sum(s.finished.completion_tokens for s in states if s.finished is not None)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    async def guarded():
        try:
            async for c in chunks:
                yield c
        except errors.APIError as exc:  # after the headers: report in-band, as OpenAI does
            yield f"data: {json.dumps(exc.body())}\n\n"
    return StreamingResponse(guarded(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
