"""Sliding-window layers' K/V in a pool of their own (`BlockManager` window pool): blocks older than
the window are given back as sequences advance, prefix-cache hits need the window's blocks too, and
the outputs equal those of an engine that keeps every layer's whole context (tiny Gemma 2/3, window
8 tokens, blocks of 4)."""

import random

import pytest
import torch
from gemma_serve.engine.block_manager import FREED, BlockManager
from gemma_serve.engine.config import EngineConfig
from gemma_serve.engine.model_config import ModelConfig
from gemma_serve.engine.model_runner import plan_kv_cache
from gemma_serve.engine.sampling_params import SamplingParams
from gemma_serve.engine.sequence import Sequence

from .conftest import engine_for, prompt

GREEDY = dict(temperature=0.0)


def seq(tokens: list[int], name: str = "s") -> Sequence:
    return Sequence(name, tokens, SamplingParams(), 0)


def test_window_blocks_are_given_back_as_the_sequence_advances():
    bm = BlockManager(num_blocks=32, block_size=4, window=8, num_window_blocks=8)
    s = seq(list(range(40)))
    bm.allocate(s)
    assert len(s.block_table) == 10 and s.window_table == []  # window blocks come with the chunks
    for start in range(0, 40, 6):  # chunks of 6
        end = min(40, start + 6)
        s.num_computed_tokens = start
        assert bm.can_grow(s, end)
        bm.grow(s, end)
        live = [i for i, b in enumerate(s.window_table) if b != FREED]
        # Blocks from the one holding (start - 7) on: what the chunk's queries read.
        assert live == list(range(max(0, start - 7) // 4, -(-end // 4)))
        assert sum(bm.window_pool.ref_counts) == len(live) <= 4
    bm.free_blocks(s)
    assert bm.num_free_window_blocks == 8 and bm.num_free_blocks == 32


def test_can_grow_counts_the_blocks_a_step_gives_back():
    bm = BlockManager(num_blocks=32, block_size=4, window=8, num_window_blocks=4)
    s = seq(list(range(30)))
    bm.allocate(s)
    s.num_computed_tokens = 0
    bm.grow(s, 12)  # blocks 0-2
    assert bm.num_free_window_blocks == 1
    s.num_computed_tokens = 12
    # 12..19 needs blocks 3 and 4. Queries from 12 read keys from 5 on, so block 0 goes back: two new
    # blocks fit the one free and the one given back.
    assert bm.can_grow(s, 20)
    bm.grow(s, 20)
    assert s.window_table[0] == FREED and bm.num_free_window_blocks == 0
    s.num_computed_tokens = 20
    # Queries from 20 read keys from 13 on (blocks 3-4 kept, 1-2 come back): 20..23 needs one new
    # block, 20..29 three.
    assert bm.can_grow(s, 24) and not bm.can_grow(s, 30)


def test_prefix_hits_need_the_window_blocks_too():
    bm = BlockManager(num_blocks=64, block_size=4, window=8, num_window_blocks=64)
    first = seq(list(range(30)), "first")
    bm.allocate(first)
    first.num_computed_tokens = 0
    bm.grow(first, 30)
    first.num_computed_tokens = 30
    bm.register_computed(first)
    second = seq(list(range(30)) + [99], "second")
    bm.allocate(second)
    # 7 full blocks cached in the full pool; the window before token 28 (blocks 5, 6) in the window pool.
    assert second.num_computed_tokens == 28
    assert second.window_table[:5] == [FREED] * 5 and second.window_table[5:] == first.window_table[5:7]
    bm.free_blocks(first)
    bm.free_blocks(second)
    # The window pool's blocks of that prefix reused by others: the hit shrinks to what both pools hold.
    bm2 = BlockManager(num_blocks=64, block_size=4, window=8, num_window_blocks=64)
    a = seq(list(range(30)), "a")
    bm2.allocate(a)
    a.num_computed_tokens = 0
    bm2.grow(a, 30)
    a.num_computed_tokens = 30
    bm2.register_computed(a)
    for block in a.window_table[5:7]:
        del bm2.window_pool.cached[bm2.window_pool.hash_of[block]]
    b = seq(list(range(30)) + [99], "b")
    bm2.allocate(b)
    assert b.num_computed_tokens < 28


def test_plan_splits_memory_between_the_pools(checkpoints):
    folder, _ = checkpoints["gemma3"]
    cfg = ModelConfig.from_folder(folder)  # 4 layers, 2 sliding (window 8), 2 kv heads x 16
    config = EngineConfig(model=str(folder), block_size=4, max_num_seqs=16, max_num_batched_tokens=64)
    layer_block = 2 * 4 * 2 * 16 * 4  # K and V, float32
    free = 10_000 * layer_block * cfg.num_layers
    single = int(free * config.kv_cache_memory_fraction) // (cfg.num_layers * layer_block)  # one pool
    plan = plan_kv_cache(cfg, config, 512, torch.float32, free)
    assert plan.window == 8
    assert plan.num_window_blocks == 16 * (2 + 2) + 16  # each sequence's window, plus one step's tokens
    used = (plan.num_window_blocks * 2 + plan.num_blocks * 2) * layer_block
    assert used <= free * config.kv_cache_memory_fraction < used + 2 * layer_block
    # The full-attention pool holds more tokens than one pool for every layer would.
    assert plan.num_blocks > single
    # Little memory: the window pool gets no more blocks than one pool would (short sequences fit
    # as many as before), the full-attention pool at least as many.
    small = 40 * layer_block * cfg.num_layers
    tight = plan_kv_cache(cfg, config, 512, torch.float32, small)
    single_small = int(small * config.kv_cache_memory_fraction) // (cfg.num_layers * layer_block)
    assert tight.num_window_blocks == single_small and tight.num_blocks >= single_small
    off = EngineConfig(model=str(folder), block_size=4, sliding_window_kv=False)
    assert plan_kv_cache(cfg, off, 512, torch.float32, free).window is None
    assert plan_kv_cache(cfg, config, 8, torch.float32, free).window is None  # the window covers everything
    explicit = EngineConfig(model=str(folder), block_size=4, num_kv_blocks=30, max_num_seqs=16,
                            max_num_batched_tokens=64)
    assert plan_kv_cache(cfg, explicit, 512, torch.float32, None).num_window_blocks == 30


@pytest.mark.parametrize("generation", ["gemma2", "gemma3"])
def test_outputs_equal_an_engine_that_keeps_every_token(checkpoints, generation):
    """Many sequences far longer than the window, a window pool far smaller than their contexts:
    the same tokens as with the whole context kept."""
    folder, _ = checkpoints[generation]
    rng = random.Random(4)
    prompts = [prompt(400 + i, rng.randint(10, 60)) for i in range(12)]
    params = [SamplingParams(max_tokens=rng.randint(20, 50), **GREEDY) for _ in prompts]
    full = engine_for(folder, sliding_window_kv=False, max_num_batched_tokens=32)
    assert full.block_manager.window_pool is None
    expected = full.generate(prompts, params)
    engine = engine_for(folder, max_num_batched_tokens=32)
    bm = engine.block_manager
    assert bm.window_pool is not None and bm.window_pool.num_blocks < 16 * 30  # << the contexts' blocks
    assert engine.generate(prompts, params) == expected
    assert bm.num_free_blocks == bm.num_blocks and bm.num_free_window_blocks == bm.window_pool.num_blocks


def test_a_tight_window_pool_preempts_instead_of_failing(checkpoints):
    folder, _ = checkpoints["gemma3"]
    prompts = [prompt(500 + i, 30) for i in range(8)]
    params = SamplingParams(max_tokens=30, **GREEDY)
    expected = engine_for(folder, sliding_window_kv=False).generate(prompts, params)
    engine = engine_for(folder, max_num_batched_tokens=16)
    engine.block_manager.window_pool.__init__(14)  # room for about three sequences' windows
    assert engine.generate(prompts, params) == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_window_blocks == 14


def test_shared_prefix_longer_than_the_window_hits_in_both_pools(checkpoints):
    folder, _ = checkpoints["gemma3"]
    common = prompt(600, 33)
    engine = engine_for(folder)
    expected = engine_for(folder, enable_prefix_caching=False).generate(
        [common + prompt(601, 5), common + prompt(602, 7)], SamplingParams(max_tokens=10, **GREEDY))
    first = engine.generate([common + prompt(601, 5)], SamplingParams(max_tokens=10, **GREEDY))[0]
    engine.add_request("second", common + prompt(602, 7), SamplingParams(max_tokens=10, **GREEDY))
    second = engine.sequences["second"]
    out = []
    while engine.has_unfinished():
        if second.num_cached_tokens:
            hits = second.num_cached_tokens
        for o in engine.step():
            out.extend(o.new_token_ids)
    assert hits == 32  # the 8 full blocks of the common prefix
    assert [first, out] == expected


@pytest.mark.parametrize("graphs", [False, True])
def test_warm_up_step_writes_only_scratch_or_unallocated_blocks(checkpoints, graphs):
    """The start-up step (run on CUDA before serving) with both pools: it runs, and it touches only
    each pool's scratch block (with graphs) or block 0 (nothing allocated yet)."""
    from .test_cuda_graphs import simulated_graphs

    folder, _ = checkpoints["gemma3"]
    engine = engine_for(folder, cuda_graphs=False)
    runner = engine.runner
    if graphs:
        simulated_graphs(engine)
    before = [k.clone() for k, _ in runner.kv_caches]
    runner._warm_up()
    for i, (k0, (k1, _)) in enumerate(zip(before, runner.kv_caches)):
        touched = {int(b) for b in torch.nonzero((k0 != k1).flatten(1).any(1)).flatten()}
        in_window = runner.model_config.sliding[i]
        expected = (runner.num_window_blocks if in_window else runner.num_blocks) if graphs else 0
        assert touched == {expected}, (i, touched)


def test_long_context_benchmark_runs_both_layouts_and_compares_their_tokens(checkpoints):
    """engine_bench's W4 on the CPU at toy sizes: one row per layout, same greedy tokens."""
    from gemma_serve.bench.engine_bench import run_long_context

    folder, _ = checkpoints["gemma3"]
    base = dict(model=str(folder), device="cpu", dtype="float32", block_size=4, max_num_seqs=4,
                max_num_batched_tokens=32, cpu_kv_cache_tokens=400)
    rows = run_long_context(base, requests=6, prompt_len=40, output_len=8, max_model_len=128)
    on, off = rows
    assert on.extra["sliding_window_kv"] and not off.extra["sliding_window_kv"]
    assert on.extra["kv_window_tokens"] > 0 and off.extra["kv_window_tokens"] == 0
    assert on.extra["same_tokens_as_whole_context"] is True
    assert 1 <= on.extra["max_running"] <= 4 and on.output_tok_s > 0
