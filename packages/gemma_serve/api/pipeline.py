"""One request pipeline for every route (Truss predict, chat completions, completions):
validated fields + prompt ids -> contract request -> Triton stream -> text deltas -> final result.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Literal, Sequence

import numpy as np

from gemma_serve.api import errors
from gemma_serve.api.detokenizer import IncrementalDetokenizer
from gemma_serve.api.images import PreparedImage
from gemma_serve.api.schemas import SamplingFields
from gemma_serve.api.stop_strings import StopStringMatcher
from gemma_serve.api.tokenizer import Tokenizer
from gemma_serve.triton.client import TritonClient, TritonRequestError
from gemma_serve.triton.contract import GenerationRequest

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    """A validated request, ready to send."""

    request: GenerationRequest
    stop_strings: list[str]

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.input_ids)


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None


@dataclass
class Finished:
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int] = field(default_factory=list)

    @property
    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class GenerationPipeline:
    def __init__(self, tokenizer: Tokenizer, client: TritonClient, default_max_tokens: int) -> None:
        self.tokenizer = tokenizer
        self.client = client
        self.default_max_tokens = default_max_tokens

    @property
    def max_model_len(self) -> int:
        return self.tokenizer.info.max_model_len

    def prepare(self, prompt_ids: list[int], fields: SamplingFields, *, max_tokens: int | None = None,
                seed: int | None = None, logprobs: bool = False, images: Sequence[PreparedImage] = ()
                ) -> Prepared:
        """Check the request against the context window and build the contract request. `prompt_ids`
        already hold the image tokens of `images` (chat_prompt.py)."""
        info = self.tokenizer.info
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise errors.invalid("the prompt is empty", param="prompt")
        room = self.max_model_len - n_prompt
        if room < 1:
            raise errors.invalid(
                f"the prompt has {n_prompt} tokens, which leaves no room in this model's context window "
                f"of {self.max_model_len} tokens", param="messages", code="context_length_exceeded")
        requested = max_tokens if max_tokens is not None else fields.max_tokens
        if requested is None:
            requested = min(self.default_max_tokens, room)
        elif requested > room:
            raise errors.invalid(
                f"prompt ({n_prompt} tokens) + max_tokens ({requested}) = {n_prompt + requested} exceeds the "
                f"context window of {self.max_model_len} tokens; lower max_tokens to at most {room}",
                param="max_tokens", code="context_length_exceeded")
        if fields.min_tokens > requested:
            raise errors.invalid(f"min_tokens ({fields.min_tokens}) exceeds max_tokens ({requested})",
                                 param="min_tokens")
        greedy = fields.temperature == 0.0
        stop_ids = [] if fields.ignore_eos else info.stop_ids
        request = GenerationRequest(
            input_ids=list(prompt_ids),
            max_tokens=requested,
            end_id=stop_ids[0] if stop_ids else -1,
            pad_id=info.pad_id,
            streaming=True,
            # TensorRT-LLM has no temperature 0: greedy is top_k 1.
            temperature=1.0 if greedy else fields.temperature,
            top_k=1 if greedy else fields.top_k,
            top_p=1.0 if greedy else fields.top_p,
            repetition_penalty=fields.repetition_penalty,
            presence_penalty=fields.presence_penalty,
            frequency_penalty=fields.frequency_penalty,
            seed=fields.seed if seed is None else seed,
            min_tokens=fields.min_tokens,
            stop_sequences=[[i] for i in stop_ids[1:]],
            logprobs=logprobs,
            pixel_values=np.stack([image.pixel_values for image in images]) if images else None,
            image_hashes=[image.hash for image in images],
        )
        return Prepared(request, fields.stop_strings)

    async def stream(self, prepared: Prepared, request_id: str | None = None
                     ) -> AsyncIterator[TextDelta | Finished]:
        """A `TextDelta` per engine chunk (text as it becomes valid UTF-8, possibly ""), then one
        `Finished`. Raises `errors.APIError`."""
        request_id = request_id or uuid.uuid4().hex
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        matcher = StopStringMatcher(prepared.stop_strings)
        token_ids: list[int] = []
        stopped_by_string = False
        tokens = self.client.generate(prepared.request, request_id)
        try:
            async for chunk in tokens:
                token_ids.extend(chunk.token_ids)
                result = matcher.push(detokenizer.push(chunk.token_ids))
                # One delta per chunk, even with no text yet (half a character, held-back stop
                # prefix), so token ids and log-probs are never lost.
                yield TextDelta(result.text, chunk.token_ids, chunk.logprobs)
                if result.stopped:
                    stopped_by_string = True
                    break
        except TritonRequestError as exc:
            raise _api_error(exc) from exc
        finally:
            # Ends the gRPC stream; when a stop string matched early, Triton cancels the engine request.
            await tokens.aclose()
        if not stopped_by_string:
            result = matcher.push(detokenizer.flush())
            tail = result.text + ("" if result.stopped else matcher.flush())
            stopped_by_string = result.stopped
            if tail:
                yield TextDelta(tail, [], None)
        yield Finished(self._finish_reason(prepared.request, token_ids, stopped_by_string),
                       prepared.prompt_tokens, len(token_ids), token_ids)

    def _finish_reason(self, request: GenerationRequest, token_ids: list[int], stopped_by_string: bool
                       ) -> Literal["stop", "length"]:
        if stopped_by_string or not token_ids:
            return "stop"
        stop_ids = {request.end_id} | {s[0] for s in request.stop_sequences if len(s) == 1}
        if token_ids[-1] in stop_ids or len(token_ids) < request.max_tokens:
            return "stop"
        return "length"


def _api_error(exc: TritonRequestError) -> errors.APIError:
    if exc.kind == "invalid_request":
        return errors.invalid(str(exc))
    if exc.kind == "overloaded":
        return errors.overloaded(str(exc))
    logger.error("engine error: %s", exc)
    return errors.internal(f"the engine failed: {exc}")
