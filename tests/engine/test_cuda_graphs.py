"""The graph runners' bookkeeping (padding to the batch and prompt-length ladders, static buffers,
scratch block, stale block-table columns), checked on CPU: the 'graph' replays the same static-shape
forward eagerly. The real capture and replay are checked on a GPU in tests/gpu/test_cuda_graphs.py. The engines here are
built with cuda_graphs=False so that, on a GPU too, only the simulated graphs run."""

import random

import pytest
import torch
from gemma_serve.engine import attention
from gemma_serve.engine.cuda_graphs import (BATCH_LADDER, DecodeGraphs, PrefillGraphs, graph_batch_sizes,
                                            prefill_graph_lengths)
from gemma_serve.engine.sampling_params import SamplingParams

from .conftest import engine_for, prompt
from .test_batching import run_staggered


def test_batch_ladder_is_capped_at_max_num_seqs():
    assert graph_batch_sizes(256) == list(BATCH_LADDER)
    assert graph_batch_sizes(16) == [1, 2, 4, 8, 16]
    assert graph_batch_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(512) == list(BATCH_LADDER)


def test_prefill_ladder_is_capped_at_a_step_and_the_context():
    assert prefill_graph_lengths(4096, 8192) == [16, 32, 64, 128, 256, 512]
    assert prefill_graph_lengths(100, 8192) == [16, 32, 64]
    assert prefill_graph_lengths(4096, 200) == [16, 32, 64, 128]
    assert prefill_graph_lengths(8, 8192) == []


class EagerReplay:
    """Stands in for a CUDA graph: recomputes the captured forward into the same output buffer."""

    def __init__(self, graphs: DecodeGraphs | PrefillGraphs, batch: int) -> None:
        self.graphs, self.batch = graphs, batch
        self.replays = 0

    def replay(self) -> None:
        self.graphs.outputs[self.batch].copy_(self.graphs._forward(self.batch))
        self.replays += 1


def _add_scratch_blocks(runner) -> None:
    """One block more per pool, as a runner with CUDA graphs allocates."""
    runner.kv_caches = [(torch.cat([k, torch.zeros_like(k[:1])]), torch.cat([v, torch.zeros_like(v[:1])]))
                        for k, v in runner.kv_caches]


def simulated_graphs(engine) -> DecodeGraphs:
    """Give the engine's runner decode 'graphs' as CUDA capture would (scratch block included)."""
    runner = engine.runner
    _add_scratch_blocks(runner)
    graphs = DecodeGraphs(runner, scratch_block=runner.num_blocks, window_scratch_block=runner.num_window_blocks)
    graphs._fill_padding()
    vocab = runner.model_config.vocab_size
    for batch in graphs.sizes:
        graphs.outputs[batch] = torch.empty(batch, vocab, device=runner.device)
        graphs.graphs[batch] = EagerReplay(graphs, batch)
    runner.graphs = graphs
    return graphs


@pytest.mark.parametrize("generation", ["gemma2", "gemma3"])
def test_padded_static_decode_steps_give_the_same_outputs(checkpoints, generation):
    folder, _ = checkpoints[generation]
    rng = random.Random(1)
    requests = {f"r{i}": (prompt(200 + i, rng.randint(3, 40)),
                          SamplingParams(max_tokens=rng.randint(5, 30), temperature=rng.choice([0.0, 0.7]), seed=i))
                for i in range(7)}
    join_at = {rid: rng.randint(0, 10) for rid in requests}
    expected, _ = run_staggered(engine_for(folder, max_num_batched_tokens=32, cuda_graphs=False), requests, join_at)

    engine = engine_for(folder, max_num_batched_tokens=32, cuda_graphs=False)
    graphs = simulated_graphs(engine)
    sentinel = [(k.clone(), v.clone()) for k, v in engine.runner.kv_caches]
    outputs, running = run_staggered(engine, requests, join_at)
    assert outputs == expected
    replays = {b: g.replays for b, g in graphs.graphs.items()}
    assert sum(replays.values()) > 10 and any(replays[b] for b in (4, 8)), replays  # padded batches ran
    # Padding rows wrote only the scratch block of each pool (the last one): no block past the ones
    # the block manager hands out was touched. Sliding-window layers have a pool of their own here.
    bm = engine.block_manager
    assert bm.window_pool is not None
    for i, ((k0, _), (k1, _)) in enumerate(zip(sentinel, engine.runner.kv_caches)):
        in_window = engine.runner.model_config.sliding[i]
        scratch = graphs.window_scratch_block if in_window else graphs.scratch_block
        assert k1.shape[0] == scratch + 1
        used = {int(b) for b in torch.nonzero((k0 != k1).flatten(1).any(1)).flatten()}
        assert scratch in used and max(used - {scratch}) < (bm.window_pool.num_blocks if in_window else bm.num_blocks)
    assert bm.num_free_blocks == bm.num_blocks and bm.num_free_window_blocks == bm.window_pool.num_blocks


def test_steps_with_prefill_chunks_or_too_many_rows_run_eagerly(checkpoints):
    folder, _ = checkpoints["gemma3"]
    engine = engine_for(folder, max_num_seqs=4, max_num_batched_tokens=16, cuda_graphs=False)
    graphs = simulated_graphs(engine)
    engine.add_request("a", prompt(1, 9), SamplingParams(max_tokens=4, temperature=0.0))
    chunks = engine.scheduler.schedule()
    assert not graphs.can_run(chunks)  # a prefill
    engine.run_step(chunks)
    chunks = engine.scheduler.schedule()
    assert graphs.can_run(chunks)  # one decode
    assert sum(g.replays for g in graphs.graphs.values()) == 0
    engine.run_step(chunks)
    assert graphs.graphs[1].replays == 1


def test_host_block_table_rows_follow_regrowth_and_reallocation(checkpoints):
    """The graph runner rewrites only what changed of each host row of the block tables: a table
    that grew, a row given to another sequence, a sequence whose blocks were freed and reallocated
    (same length, other blocks), a row that became padding."""
    from gemma_serve.engine.scheduler import ScheduledChunk
    from gemma_serve.engine.sequence import Sequence

    folder, _ = checkpoints["gemma1"]
    engine = engine_for(folder, cuda_graphs=False, enable_prefix_caching=False)
    graphs = simulated_graphs(engine)
    bm = engine.block_manager
    params = SamplingParams(max_tokens=5)
    a, b = (Sequence(name, prompt(i, 20), params, i) for i, name in enumerate("ab"))
    bm.allocate(a)
    bm.allocate(b)

    def sent(rows: int) -> list[list[int]]:
        return graphs.block_tables[:rows].tolist()

    graphs.run([ScheduledChunk(a, 19, 1), ScheduledChunk(b, 19, 1)])
    assert [r[:5] for r in sent(2)] == [a.block_table, b.block_table]
    a.token_ids.append(7)
    bm.grow(a, 21)  # a sixth block
    graphs.run([ScheduledChunk(a, 20, 1), ScheduledChunk(b, 19, 1)])
    assert sent(1)[0][:6] == a.block_table
    old = list(a.block_table)
    bm.free_blocks(a)
    c = Sequence("c", prompt(9, 30), params, 2)
    bm.allocate(c)  # takes the oldest free blocks first: a's come back in another order, or others
    bm.allocate(a)
    assert a.block_table != old[:len(a.block_table)]
    graphs.run([ScheduledChunk(a, 20, 1), ScheduledChunk(c, 29, 1), ScheduledChunk(b, 19, 1)])
    rows = sent(4)
    assert rows[0][:6] == a.block_table and rows[1][:8] == c.block_table and rows[2][:5] == b.block_table
    assert rows[3][0] == graphs.scratch_block  # the padding row of the batch of 4
    graphs.run([ScheduledChunk(a, 20, 1)])
    graphs.run([ScheduledChunk(a, 20, 1), ScheduledChunk(b, 19, 1)])
    assert sent(2)[1][:5] == b.block_table


def tokens_and_logprobs(engine, p: list[int], params: SamplingParams) -> tuple[list[int], list[float]]:
    engine.add_request("one", p, params)
    tokens, logprobs = [], []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
            logprobs += out.new_logprobs
    return tokens, logprobs


def simulated_prefill_graphs(engine) -> PrefillGraphs:
    """Give the engine's runner prefill 'graphs' (and the scratch blocks) as CUDA capture would."""
    runner = engine.runner
    _add_scratch_blocks(runner)
    graphs = PrefillGraphs(runner, runner.num_blocks, runner.num_window_blocks)
    graphs._fill_padding()
    for length in graphs.sizes:
        graphs.outputs[length] = torch.empty(1, runner.model_config.vocab_size, device=runner.device)
        graphs.graphs[length] = EagerReplay(graphs, length)
    runner.prefill_graphs = graphs
    return graphs


@pytest.mark.parametrize("generation", ["gemma2", "gemma3"])
def test_padded_static_prefill_steps_give_the_same_outputs(checkpoints, generation, monkeypatch):
    """Prompts prefilled alone through padded static buffers (the prefill kernel in Triton's
    interpreter, reading the prompt's extent from the device): the same tokens and logprobs as the
    eager step, for a 2-token prompt, exact and just-over ladder lengths, a prompt whose first
    blocks come from the prefix cache (the chunk starts mid-prompt) and one chunked across steps."""
    pytest.importorskip("triton")
    monkeypatch.setattr(attention, "use_prefill_kernel", lambda device: True)
    folder, _ = checkpoints[generation]
    eager = engine_for(folder, max_num_batched_tokens=64, cuda_graphs=False)
    graphed = engine_for(folder, max_num_batched_tokens=64, cuda_graphs=False)
    graphs = simulated_prefill_graphs(graphed)
    assert graphs.sizes == [16, 32, 64]
    shared = prompt(300, 23)
    prompts = [prompt(301, 2), prompt(302, 16), prompt(303, 17), shared, shared + prompt(304, 6), prompt(305, 90)]
    params = SamplingParams(max_tokens=5, temperature=0.0, logprobs=True)
    for i, p in enumerate(prompts):
        ours, theirs = tokens_and_logprobs(graphed, p, params), tokens_and_logprobs(eager, p, params)
        assert ours[0] == theirs[0], i
        assert ours[1] == pytest.approx(theirs[1], abs=1e-5), i
    # Padded to 16: the 2- and 16-token prompts and the 9 tokens after the prefix cache's five blocks
    # of 4 (29 would pad to 32); to 32: 17, 23 and the 90-token prompt's second chunk (26); to 64: its
    # first.
    assert graphed.block_manager.block_size == 4
    assert [graphs.graphs[n].replays for n in graphs.sizes] == [3, 3, 1]
    assert graphed.block_manager.num_free_blocks == graphed.block_manager.num_blocks
