"""`Sequence`: one request's whole life in the engine (tokens, KV blocks, progress, status)."""

from __future__ import annotations

import enum

import torch

from gemma_serve.engine.multimodal import ImageSpan
from gemma_serve.engine.sampling_params import SamplingParams


# Stands in `token_ids` for a token sampled on the GPU whose value the host has not read yet (an
# overlapped step, see `LLMEngine.step`); never fed to the model (the graph takes it on the device).
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, arrival: int,
                 image_spans: list[ImageSpan] | None = None) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.arrival = arrival  # admission order; preemption evicts the latest arrival first
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # Bumped whenever block_table is replaced rather than appended to (blocks freed), so a cached
        # copy of the table (the graph runner's host rows) knows when its prefix is stale.
        self.block_table_epoch = 0
        # The sliding-window layers' blocks (BlockManager's window pool), indexed as block_table;
        # entries before `window_freed` were given back (FREED).
        self.window_table: list[int] = []
        self.window_freed = 0
        # Tokens whose K/V are in the cache (computed, or found in the prefix cache).
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prefix-cache hits at the last admission
        # Full blocks whose hash is registered with the block manager.
        self.num_hashed_blocks = 0
        self.block_hashes: list[bytes] = []
        self.output_logprobs: list[float] = []
        self.num_emitted = 0  # output tokens already delivered as deltas
        # Trailing PENDING_TOKEN entries of token_ids: sampled on the GPU, not read yet (0 or 1).
        self.num_pending = 0
        self.finish_reason: str | None = None
        self.generator: torch.Generator | None = None  # per-request randomness when seeded
        # The prompt's images, in position order (output tokens are always text, whatever their id).
        self.image_spans: list[ImageSpan] = list(image_spans or [])

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Output tokens sampled so far, pending ones included (what max_tokens and min_tokens count)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        """The output tokens whose values are known (pending ones excluded)."""
        return self.token_ids[self.num_prompt_tokens:len(self.token_ids) - self.num_pending]

    def drop_pending(self) -> None:
        """Forget tokens sampled past the end (the sequence finished before they were read)."""
        if self.num_pending:
            del self.token_ids[-self.num_pending:]
            self.num_pending = 0

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def spans_in(self, start: int, end: int) -> list[ImageSpan]:
        """The images with tokens in positions [start, end)."""
        return [s for s in self.image_spans if s.start < end and start < s.end]

    def image_key(self, start: int, end: int) -> bytes:
        """What identifies the images of positions [start, end) beyond their (identical) token ids:
        part of a KV block's hash, so that the same ids with another image never share a block."""
        return b"".join(s.key() for s in self.spans_in(start, end)) if self.image_spans else b""

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
