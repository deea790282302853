"""The decode-graph runner's bookkeeping (padding to the batch ladder, static buffers, scratch block,
stale block-table columns), checked on CPU: the 'graph' replays the same static-shape forward
eagerly. The real capture and replay are checked on a GPU in tests/gpu/test_cuda_graphs.py. The engines here are
built with cuda_graphs=False so that, on a GPU too, only the simulated graphs run."""

import random

import pytest
import torch
from gemma_serve.engine.cuda_graphs import BATCH_LADDER, DecodeGraphs, graph_batch_sizes
from gemma_serve.engine.sampling_params import SamplingParams

from .conftest import engine_for, prompt
from .test_batching import run_staggered


def test_batch_ladder_is_capped_at_max_num_seqs():
    assert graph_batch_sizes(256) == list(BATCH_LADDER)
    assert graph_batch_sizes(16) == [1, 2, 4, 8, 16]
    assert graph_batch_sizes(100) == [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 100]
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(512) == list(BATCH_LADDER)


class EagerReplay:
    """Stands in for a CUDA graph: recomputes the captured forward into the same output buffer."""

    def __init__(self, graphs: DecodeGraphs, batch: int) -> None:
        self.graphs, self.batch = graphs, batch
        self.replays = 0

    def replay(self) -> None:
        self.graphs.outputs[self.batch].copy_(self.graphs._forward(self.batch))
        self.replays += 1


def simulated_graphs(engine) -> DecodeGraphs:
    """Give the engine's runner decode 'graphs' as CUDA capture would (scratch block included)."""
    runner = engine.runner
    runner.kv_caches = [(torch.cat([k, torch.zeros_like(k[:1])]), torch.cat([v, torch.zeros_like(v[:1])]))
                        for k, v in runner.kv_caches]
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
