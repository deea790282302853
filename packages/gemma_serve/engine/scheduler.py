"""`Scheduler`: decides what runs in each engine step. Memory belongs to the block manager.

Each step serves every running sequence (a decode token, or the next chunk of its prefill) and then
admits waiting sequences in arrival order, all under one token budget. When the cache runs out of
blocks, the latest-admitted running sequence is preempted: its blocks are freed and it waits to be
recomputed, instead of any request failing.

Chunked prefill never cuts an image's token run: the tokens of one image attend to each other in both
directions, so all of them must be in the forward that computes them. A chunk that would end inside a
run ends before it instead (the run starts the next chunk); a chunk that starts inside a run (the
prefix cache held its first blocks) waits for a step with budget for the rest of it. A run is never
longer than max_num_batched_tokens (refused at add_request), so every run fits a step on its own;
under heavy decode load an image prefill can wait until enough decodes have finished.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from gemma_serve.engine.block_manager import BlockManager
from gemma_serve.engine.outputs import EngineOverloadedError, RequestRejectedError
from gemma_serve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position computed in this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """This chunk reaches the end of the sequence, so its last row yields the next token."""
        return self.start + self.num_tokens == self.seq.num_tokens


def fit_image_runs(seq: Sequence, start: int, num_tokens: int) -> int:
    """The longest chunk from `start`, at most `num_tokens`, that does not end inside an image run;
    0 when even the shortest would (it starts inside a run whose rest does not fit)."""
    end = start + num_tokens
    for span in seq.image_spans:
        if span.start < end < span.end:
            return max(0, span.start - start)
    return num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, max_queue_len: int) -> None:
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.max_queue_len = max_queue_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def check(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Refuse what can never run (RequestRejectedError) or cannot queue now (EngineOverloadedError)."""
        if num_prompt_tokens < 1:
            raise RequestRejectedError("the prompt is empty")
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise RequestRejectedError(
                f"prompt ({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) = {total} exceeds the "
                f"engine's max_model_len of {self.max_model_len}")
        capacity = self.blocks.num_blocks * self.blocks.block_size
        if total > capacity:
            raise RequestRejectedError(f"the request needs {total} tokens of KV cache; the whole cache holds {capacity}")
        if self.blocks.window_pool is not None:
            # At most a window plus one step's tokens (and a partly used block at each end).
            need = self.blocks.blocks_needed(min(total, self.blocks.window - 1 + self.max_num_batched_tokens)) + 1
            if need > self.blocks.window_pool.num_blocks:
                raise RequestRejectedError(f"the sliding-window layers' cache ({self.blocks.window_pool.num_blocks} "
                                           f"blocks) is too small for one sequence ({need} blocks)")
        if len(self.waiting) >= self.max_queue_len:
            raise EngineOverloadedError(f"{len(self.waiting)} requests are already waiting (max_queue_len)")

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[int] = set()
        preempted = False
        # Running sequences first, decodes (1 token) before prefills in progress, so that a long
        # prompt being prefilled never stalls the streams that are already decoding.
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1):
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted for an earlier sequence of this step
            if seq.num_pending and (seq.num_output_tokens >= seq.params.max_tokens
                                    or seq.num_tokens >= self.max_model_len):
                continue  # its last token is still on the GPU: nothing left to compute
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if seq.image_spans:
                n = fit_image_runs(seq, seq.num_computed_tokens, n)
                if n == 0:
                    continue  # an image run that does not fit the budget left: next step
            if self.blocks.fits(seq, seq.num_computed_tokens + n):
                # The common decode step: the token fits the sequence's last block.
                if self.blocks.window_pool is not None:
                    self.blocks.trim_window(seq, seq.num_computed_tokens)
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
                scheduled.add(id(seq))
                budget -= n
                continue
            while not self.blocks.can_grow(seq, seq.num_computed_tokens + n):
                # Only sequences not yet scheduled in this step may give their blocks back, the
                # latest admitted first; that can be `seq` itself, which then waits at the head of
                # the queue (FIFO admission) until the sequences still running finish.
                victim = max((s for s in self.running if id(s) not in scheduled), key=lambda s: s.arrival)
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                continue
            self.blocks.grow(seq, seq.num_computed_tokens + n)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            scheduled.add(id(seq))
            budget -= n
        # Then admit waiting sequences in arrival order while budget, slots and blocks allow. Not
        # after a preemption: the blocks just freed are needed by the running sequences next step.
        while not preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq, budget):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = fit_image_runs(seq, seq.num_computed_tokens, min(seq.num_tokens - seq.num_computed_tokens, budget))
            if n == 0:
                break  # admitted, its first chunk (an image run) starts next step; later arrivals wait
            self.blocks.grow(seq, seq.num_computed_tokens + n)  # the window pool's blocks for the chunk
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        return chunks

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks and queue it first, to be recomputed (prompt + output so far)."""
        self.running.remove(seq)
        self.blocks.free_blocks(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        else:
            try:
                self.waiting.remove(seq)
            except ValueError:
                pass
        self.blocks.free_blocks(seq)
