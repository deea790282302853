from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


@dataclass
class RequestOutput:
    """One streamed delta of a request: the tokens produced since the previous delta."""

    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    # Output tokens produced so far, this delta included.
    num_output_tokens: int = 0
    # Log-probability of each token in `new_token_ids`, when the request asked for them.
    new_logprobs: list[float] | None = None


@dataclass
class EngineStats:
    """A snapshot of the engine's occupancy; exported as Triton metrics and checked by tests."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    extra: dict = field(default_factory=dict)


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 503)."""


class RequestRejectedError(ValueError):
    """The request can never be served by this engine as configured (e.g. prompt too long)."""
