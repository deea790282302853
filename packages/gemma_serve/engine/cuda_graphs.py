"""CUDA graphs of decode-only steps, and of steps that prefill one short prompt.

In the steady state every scheduled chunk is one decode token, and the step's GPU work is a few
thousand small kernels whose launches, not the GPU, set the pace. Such a step is padded to the next
batch size of a ladder and replayed from a graph of the model forward (embedding -> layers -> final
norm -> logits of every row); sampling stays outside, on the real rows.

A step that prefills a single prompt of a few hundred tokens (one user's time to first token) is
launch-bound too: ~300 launches against ~3.6 ms of GPU work on the 4B shapes. It is padded to the
next length of a second ladder (16 .. 512 tokens) and replayed the same way; longer prompts, steps
with several prompts or with images, and mixed steps run eagerly.

Static shapes: the graph's inputs live in buffers allocated once (token ids, positions, cache slots,
context lengths, block tables padded to max_model_len). Attention is the Triton paged kernels,
whose grids depend on the padded size and max_model_len only; the prefill kernel reads the prompt's
real length from the device. Padding rows write their K/V to a scratch block that the block manager
never hands out (decode padding rows also attend to that one slot), so they never touch a real
sequence's cache. All graphs share one memory pool and are captured, largest first, at engine start.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from gemma_serve.engine.attention import AttentionMetadata
from gemma_serve.engine.scheduler import ScheduledChunk
from gemma_serve.engine.sequence import Sequence

if TYPE_CHECKING:
    from gemma_serve.engine.model_runner import ModelRunner

logger = logging.getLogger(__name__)

BATCH_LADDER = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The ladder up to max_num_seqs, plus max_num_seqs itself when it falls between two rungs."""
    sizes = [s for s in BATCH_LADDER if s <= max_num_seqs]
    if max_num_seqs < BATCH_LADDER[-1] and max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sizes


class HostBlockTables:
    """The host's copy of one pool's block tables, row by row as last sent to the graphs' buffer: a
    row is rewritten only from where its sequence's table changed (tables grow one block every
    block_size tokens), instead of rebuilding batch x blocks ids each step. Per row: (sequence, its
    table epoch, length sent). Entries that become FREED later (window pool) are never read, so a
    stale id there is harmless."""

    def __init__(self, max_batch: int, max_blocks: int, scratch_block: int, window: bool) -> None:
        self.array = np.full((max_batch, max_blocks), scratch_block, dtype=np.int64)
        self.state: list[tuple[Sequence, int, int] | None] = [None] * max_batch
        self.scratch_block = scratch_block
        self.window = window

    def put(self, row: int, seq: Sequence) -> None:
        table = seq.window_table if self.window else seq.block_table
        state = self.state[row]
        sent = state[2] if state is not None and state[0] is seq and state[1] == seq.block_table_epoch else 0
        if sent < len(table):
            self.array[row, sent:len(table)] = [max(0, b) for b in table[sent:]] if self.window else table[sent:]
            self.state[row] = (seq, seq.block_table_epoch, len(table))

    def pad(self, row: int) -> None:
        """A padding row: reads the scratch block (context length 1)."""
        if self.state[row] is not None:
            self.array[row, 0] = self.scratch_block
            self.state[row] = None


class _StepGraphs:
    """What the decode and prefill graphs share: the scratch slots of both KV pools, host block
    tables, and capture (warm-up, then largest first into one memory pool)."""

    kind = ""

    def __init__(self, runner: ModelRunner, sizes: list[int], scratch_block: int, window_scratch_block: int,
                 pool=None) -> None:
        self.runner = runner
        self.device = runner.device
        self.block_size = runner.block_size
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * runner.block_size
        # The sliding-window layers' pool, when they have their own (its last block is its scratch).
        self.window = runner.kv_layout.window is not None
        self.window_scratch_block = window_scratch_block
        self.window_scratch_slot = window_scratch_block * runner.block_size
        self.sizes = sizes
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = pool
        self.capture_s = 0.0

    def _forward(self, size: int) -> torch.Tensor:
        raise NotImplementedError

    def _fill_padding(self) -> None:
        raise NotImplementedError

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.monotonic()
        self._fill_padding()
        free_before = torch.cuda.mem_get_info(self.device)[0]
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            # Warm-up outside capture: Triton compiles, cuBLAS picks its kernels for each size.
            for size in self.sizes:
                self._forward(size)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its pool memory
            t = time.monotonic()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
            logger.info("captured %s CUDA graph for %d in %.2f s", self.kind, size, time.monotonic() - t)
        torch.cuda.synchronize(self.device)
        self.capture_s = time.monotonic() - start
        used = (free_before - torch.cuda.mem_get_info(self.device)[0]) / 2**20
        logger.info("captured %d %s CUDA graphs (%s) in %.1f s, %.0f MiB", len(self.graphs), self.kind,
                    ",".join(map(str, self.sizes)), self.capture_s, used)


class DecodeGraphs(_StepGraphs):
    kind = "decode"

    def __init__(self, runner: ModelRunner, scratch_block: int, window_scratch_block: int = 0) -> None:
        super().__init__(runner, graph_batch_sizes(runner.config.max_num_seqs), scratch_block, window_scratch_block)
        self.max_batch = self.sizes[-1]
        dev = self.device
        # Rows: token ids, positions, cache slots, context lengths, window-pool slots (what the graphs
        # read), and for overlapped steps the row of the previous step's draws that holds each row's
        # token (-1: none).
        self.vectors = torch.zeros(6, self.max_batch, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(self.max_batch, self.max_blocks, dtype=torch.long, device=dev)
        self.window_tables = torch.zeros(self.max_batch, self.max_blocks, dtype=torch.long, device=dev)
        self.host_tables = HostBlockTables(self.max_batch, self.max_blocks, scratch_block, window=False)
        self.host_window_tables = HostBlockTables(self.max_batch, self.max_blocks, window_scratch_block, window=True)
        self.query_start = torch.arange(self.max_batch + 1, dtype=torch.long, device=dev)
        self.logits_indices = torch.arange(self.max_batch, dtype=torch.long, device=dev)

    # -- capture ---------------------------------------------------------------------------------

    def _meta(self, batch: int) -> AttentionMetadata:
        max_len = self.runner.max_model_len
        return AttentionMetadata(
            slot_mapping=self.vectors[2, :batch], block_tables=self.block_tables[:batch],
            context_lens=self.vectors[3, :batch], query_start=self.query_start[:batch + 1], num_decodes=batch,
            max_decode_context_len=max_len, query_start_host=list(range(batch + 1)),
            context_lens_host=[max_len] * batch, decode_node_len=self.runner.decode_node_len,
            window_block_tables=self.window_tables[:batch] if self.window else None,
            window_slot_mapping=self.vectors[4, :batch] if self.window else None)

    def _forward(self, batch: int) -> torch.Tensor:
        r = self.runner
        return r.model(self.vectors[0, :batch], self.vectors[1, :batch], r.kv_caches, self._meta(batch),
                       self.logits_indices[:batch])

    def _fill_padding(self) -> None:
        """Every row a padding row: token 0 at position 0, written to and reading the scratch slot."""
        self.vectors[0].zero_()
        self.vectors[1].zero_()
        self.vectors[2].fill_(self.scratch_slot)
        self.vectors[3].fill_(1)
        self.vectors[4].fill_(self.window_scratch_slot)
        self.block_tables.fill_(self.scratch_block)
        self.window_tables.fill_(self.window_scratch_block)

    # -- replay ----------------------------------------------------------------------------------

    def can_run(self, chunks: list[ScheduledChunk]) -> bool:
        return 0 < len(chunks) <= self.max_batch and all(c.num_tokens == 1 for c in chunks)

    def run(self, chunks: list[ScheduledChunk], previous_tokens: torch.Tensor | None = None,
            previous_rows: list[int] | None = None) -> tuple[torch.Tensor, list[Sequence]]:
        """Replay the graph for a step of single-token chunks. Returns the logits of the rows that
        sample (a view into the graph's output, valid until the next replay) and their sequences.
        `previous_rows[i] >= 0`: row i's token is `previous_tokens[previous_rows[i]]`, a draw of the
        previous step still on the device (its host value is PENDING_TOKEN)."""
        n = len(chunks)
        batch = self.sizes[bisect.bisect_left(self.sizes, n)]
        bs = self.block_size
        ids, positions, slots, ctx_lens, window_slots = [], [], [], [], []
        width = 1
        for i, c in enumerate(chunks):
            seq = c.seq
            table = seq.block_table
            pos = c.start
            ids.append(max(0, seq.token_ids[pos]))  # a pending token is filled in on the device
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            ctx_lens.append(pos + 1)
            width = max(width, len(table))
            self.host_tables.put(i, seq)
            if self.window:
                window_slots.append(seq.window_table[pos // bs] * bs + pos % bs)
                self.host_window_tables.put(i, seq)
        pad = batch - n
        for i in range(n, batch):
            self.host_tables.pad(i)
            self.host_window_tables.pad(i)
        if not self.window:
            window_slots = [self.window_scratch_slot] * n
        rows = [ids + [0] * pad, positions + [0] * pad, slots + [self.scratch_slot] * pad, ctx_lens + [1] * pad,
                window_slots + [self.window_scratch_slot] * pad, (previous_rows or [-1] * n) + [-1] * pad]
        host = torch.tensor(rows, dtype=torch.long)
        # Columns past a row's table keep stale ids: the kernel reads only the blocks below context_len.
        self.vectors[:, :batch].copy_(host, non_blocking=True)
        self.block_tables[:batch, :width].copy_(torch.from_numpy(self.host_tables.array[:batch, :width]),
                                                non_blocking=True)
        if self.window:
            self.window_tables[:batch, :width].copy_(torch.from_numpy(self.host_window_tables.array[:batch, :width]),
                                                     non_blocking=True)
        if previous_rows is not None:
            src = self.vectors[5, :batch]
            taken = previous_tokens[src.clamp(min=0)]
            self.vectors[0, :batch] = torch.where(src >= 0, taken, self.vectors[0, :batch])
        self.graphs[batch].replay()
        logits = self.outputs[batch]
        rows = [i for i, c in enumerate(chunks) if c.samples]
        seqs = [chunks[i].seq for i in rows]
        if len(rows) == n:
            return logits[:n], seqs
        return logits[torch.tensor(rows, dtype=torch.long, device=self.device)], seqs


# Padded prompt lengths of the prefill graphs. A prompt is padded to the next one, so the waste
# is at most half the rows; the GPU time of those rows is small next to ~300 launches saved.
PREFILL_LADDER = (16, 32, 64, 128, 256, 512)


def prefill_graph_lengths(max_num_batched_tokens: int, max_model_len: int) -> list[int]:
    """The ladder up to what one step may hold."""
    return [n for n in PREFILL_LADDER if n <= min(max_num_batched_tokens, max_model_len)]


def prefill_rows(seq: Sequence, start: int, n: int, length: int, block_size: int, scratch_slot: int,
                 window_scratch_slot: int, window: bool) -> np.ndarray:
    """The prefill graph's input rows [4, length] for tokens start..start+n of `seq`: token ids,
    positions, cache slots and window-pool slots (the scratch slot without a window pool); the
    padding rows are token 0 at position 0 in the scratch slots."""
    positions = np.arange(start, start + n)
    rows = np.empty((4, length), dtype=np.int64)
    rows[0, :n] = seq.token_ids[start:start + n]
    rows[1, :n] = positions
    rows[2, :n] = np.asarray(seq.block_table, dtype=np.int64)[positions // block_size] * block_size
    rows[2, :n] += positions % block_size
    if window:
        rows[3, :n] = np.maximum(np.asarray(seq.window_table, dtype=np.int64), 0)[positions // block_size] * block_size
        rows[3, :n] += positions % block_size
    else:
        rows[3, :n] = window_scratch_slot
    rows[:, n:] = np.array([[0], [0], [scratch_slot], [window_scratch_slot]])
    return rows


class PrefillGraphs(_StepGraphs):
    """Graphs of a step that is one prefill chunk of 2..512 tokens (a prompt, a prompt's next
    chunk, or the part of a prompt the prefix cache did not hold) with no image tokens."""

    kind = "prefill"

    def __init__(self, runner: ModelRunner, scratch_block: int, window_scratch_block: int, pool=None) -> None:
        from gemma_serve.engine.attention import prefill_tiles

        sizes = prefill_graph_lengths(runner.config.max_num_batched_tokens, runner.max_model_len)
        super().__init__(runner, sizes, scratch_block, window_scratch_block, pool)
        self.max_len = self.sizes[-1] if self.sizes else 0
        dev = self.device
        # Rows: token ids, positions, cache slots, window-pool slots.
        self.vectors = torch.zeros(4, self.max_len, dtype=torch.long, device=dev)
        # [context length, query start 0, query end, row of the last token]: the prompt's real extent.
        self.scalars = torch.zeros(4, dtype=torch.long, device=dev)
        self.block_tables = torch.zeros(1, self.max_blocks, dtype=torch.long, device=dev)
        self.window_tables = torch.zeros(1, self.max_blocks, dtype=torch.long, device=dev)
        self.host_tables = HostBlockTables(1, self.max_blocks, scratch_block, window=False)
        self.host_window_tables = HostBlockTables(1, self.max_blocks, window_scratch_block, window=True)
        # The prefill kernel's query tiles for each padded length (all of sequence 0), made here
        # rather than per step: a host-to-device copy cannot be captured.
        self.block_m = prefill_tiles(runner.model_config.head_dim, runner.dtype).block_m
        tiles = -(-self.max_len // self.block_m)
        self.tile_seq = torch.zeros(tiles, dtype=torch.int32, device=dev)
        self.tile_row = torch.arange(0, tiles * self.block_m, self.block_m, dtype=torch.int32, device=dev)

    def _meta(self, length: int) -> AttentionMetadata:
        meta = AttentionMetadata(
            slot_mapping=self.vectors[2, :length], block_tables=self.block_tables, context_lens=self.scalars[0:1],
            query_start=self.scalars[1:3], num_decodes=0, max_decode_context_len=0, query_start_host=[0, length],
            context_lens_host=[self.runner.max_model_len], decode_node_len=self.runner.decode_node_len,
            window_block_tables=self.window_tables if self.window else None,
            window_slot_mapping=self.vectors[3, :length] if self.window else None)
        tiles = -(-length // self.block_m)
        # Keyed as `_prefill_work` looks it up: by the tensors' device (cuda:0, not "cuda").
        meta.derived[("prefill", self.block_m, self.tile_seq.device)] = (self.tile_seq[:tiles],
                                                                          self.tile_row[:tiles], None)
        return meta

    def _forward(self, length: int) -> torch.Tensor:
        r = self.runner
        return r.model(self.vectors[0, :length], self.vectors[1, :length], r.kv_caches, self._meta(length),
                       self.scalars[3:4])

    def _fill_padding(self) -> None:
        """A one-token prompt at the scratch slot, every other row padding."""
        self.vectors[0].zero_()
        self.vectors[1].zero_()
        self.vectors[2].fill_(self.scratch_slot)
        self.vectors[3].fill_(self.window_scratch_slot)
        self.scalars.copy_(torch.tensor([1, 0, 1, 0]))
        self.block_tables.fill_(self.scratch_block)
        self.window_tables.fill_(self.window_scratch_block)

    def can_run(self, chunks: list[ScheduledChunk]) -> bool:
        if len(chunks) != 1:
            return False
        c = chunks[0]
        return (2 <= c.num_tokens <= self.max_len
                and not (c.seq.image_spans and c.seq.spans_in(c.start, c.start + c.num_tokens)))

    def run(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, list[Sequence]]:
        """Replay the graph for a one-chunk prefill step. Returns the logits of its last token (a
        view into the graph's output, valid until the next replay) and its sequence, if it samples."""
        (c,) = chunks
        seq, n, start = c.seq, c.num_tokens, c.start
        length = self.sizes[bisect.bisect_left(self.sizes, n)]
        rows = prefill_rows(seq, start, n, length, self.block_size, self.scratch_slot, self.window_scratch_slot,
                            self.window)
        self.vectors[:, :length].copy_(torch.from_numpy(rows), non_blocking=True)
        self.scalars.copy_(torch.tensor([start + n, 0, n, n - 1]), non_blocking=True)
        self.host_tables.put(0, seq)
        width = len(seq.block_table)
        self.block_tables[:, :width].copy_(torch.from_numpy(self.host_tables.array[:1, :width]), non_blocking=True)
        if self.window:
            self.host_window_tables.put(0, seq)
            width = len(seq.window_table)
            self.window_tables[:, :width].copy_(torch.from_numpy(self.host_window_tables.array[:1, :width]),
                                                non_blocking=True)
        self.graphs[length].replay()
        return self.outputs[length], [seq] if c.samples else []
