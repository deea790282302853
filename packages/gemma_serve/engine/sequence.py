"""`Sequence`: one request's whole life in the engine (tokens, KV blocks, progress, status)."""

from __future__ import annotations

import enum

import torch

from gemma_serve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: int) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival = arrival  # admission order; preemption evicts the latest arrival first
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # Tokens whose K/V are in the cache (computed, or found in the prefix cache).
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hits at the last admission
        # Full blocks whose hash is registered with the block manager.
        self.num_hashed_blocks = 0
        self.block_hashes: list[bytes] = []
        self.output_logprobs: list[float] = []
        self.num_emitted = 0  # output tokens already delivered as deltas
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None  # per-request randomness when seeded

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
