"""Continuous batching: batch invariance, no leaked blocks, prefix caching, preemption, limits."""

import random

import pytest
from gemma_serve.engine.outputs import EngineOverloadedError, RequestRejectedError
from gemma_serve.engine.block_manager import FREED
from gemma_serve.engine.sampling_params import SamplingParams

from .conftest import engine_for, prompt

GREEDY = dict(temperature=0.0)


def run_staggered(engine, requests: dict[str, tuple[list[int], SamplingParams]], join_at: dict[str, int]):
    """Add each request at its step; run until all finish. Returns outputs and, per step, the running set."""
    outputs = {rid: [] for rid in requests}
    step, steps_running = 0, []
    while True:
        for rid, at in join_at.items():
            if at == step:
                engine.add_request(rid, *requests[rid])
        if not engine.has_unfinished() and all(at <= step for at in join_at.values()):
            break
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
        steps_running.append(len(engine.scheduler.running))
        step += 1
    return outputs, steps_running


@pytest.mark.parametrize("generation", ["gemma2", "gemma3"])
def test_greedy_output_is_the_same_alone_and_among_seven_others(checkpoints, generation):
    folder, _ = checkpoints[generation]
    target = (prompt(0, 23), SamplingParams(max_tokens=24, **GREEDY))
    alone = engine_for(folder).generate([target[0]], target[1])[0]

    engine = engine_for(folder, max_num_batched_tokens=32)
    rng = random.Random(0)
    requests = {"target": target}
    join_at = {"target": 3}
    for i in range(7):
        requests[f"other{i}"] = (prompt(100 + i, rng.randint(3, 40)),
                                 SamplingParams(max_tokens=rng.randint(2, 30), temperature=rng.choice([0.0, 0.8]),
                                                seed=i))
        join_at[f"other{i}"] = rng.randint(0, 12)
    outputs, running = run_staggered(engine, requests, join_at)
    assert outputs["target"] == alone
    assert max(running) >= 4, "the requests never actually shared a step"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_no_block_leaks_after_finish_and_abort_at_every_stage(checkpoints):
    folder, _ = checkpoints["gemma3"]
    engine = engine_for(folder, max_num_batched_tokens=8)
    bm = engine.block_manager
    engine.add_request("mid-prefill", prompt(1, 30), SamplingParams(max_tokens=10))
    engine.add_request("mid-decode", prompt(2, 5), SamplingParams(max_tokens=50))
    engine.add_request("waiting", prompt(3, 5), SamplingParams(max_tokens=5))
    engine.add_request("finishes", prompt(4, 3), SamplingParams(max_tokens=2))
    engine.step()
    assert engine.sequences["mid-prefill"].num_computed_tokens < 30  # still prefilling
    assert engine.abort("mid-prefill")
    for _ in range(6):
        engine.step()
    assert engine.sequences["mid-decode"].num_output_tokens > 0
    assert engine.abort("mid-decode")
    assert engine.abort("waiting") or True
    while engine.has_unfinished():
        engine.step()
    assert not engine.abort("finishes")  # already finished: abort is a no-op
    assert bm.num_free_blocks == bm.num_blocks
    assert all(c == 0 for c in bm.ref_counts)


def test_prefix_cache_reuses_blocks_and_gives_identical_output(checkpoints):
    folder, _ = checkpoints["gemma3"]
    engine = engine_for(folder)
    shared = prompt(5, 40)
    params = SamplingParams(max_tokens=12, **GREEDY)
    first = engine.generate([shared + [7, 8]], params)[0]
    engine.add_request("again", shared + [7, 8], params)
    seq = engine.sequences["again"]
    engine.step()
    assert seq.num_cached_tokens >= 36  # 9 of the 10 full 4-token blocks of the shared prefix
    out = list(seq.output_token_ids)
    while engine.has_unfinished():
        for o in engine.step():
            out = list(seq.output_token_ids)
    assert out == first
    cold = engine_for(folder, enable_prefix_caching=False).generate([shared + [7, 8]], params)[0]
    assert cold == first


def test_preemption_when_blocks_run_out_keeps_outputs_identical(checkpoints):
    folder, _ = checkpoints["gemma3"]
    prompts = [prompt(10 + i, 12) for i in range(6)]
    params = [SamplingParams(max_tokens=30, temperature=0.0) if i % 2 else SamplingParams(max_tokens=30, temperature=1.0, seed=i)
              for i in range(6)]
    roomy = engine_for(folder).generate(prompts, params)
    tight = engine_for(folder, num_kv_blocks=30)  # 6 x 42 tokens need 66 blocks: preemption is forced
    assert tight.generate(prompts, params) == roomy
    assert tight.scheduler.num_preemptions > 0
    assert tight.block_manager.num_free_blocks == 30


def test_token_budget_is_respected_every_step(checkpoints):
    folder, _ = checkpoints["gemma1"]
    engine = engine_for(folder, max_num_batched_tokens=10, max_num_seqs=4)
    for i in range(6):
        engine.add_request(f"r{i}", prompt(20 + i, 17), SamplingParams(max_tokens=5))
    while engine.has_unfinished():
        chunks = engine.scheduler.schedule()
        assert sum(c.num_tokens for c in chunks) <= 10
        assert len(engine.scheduler.running) <= 4
        engine.run_step(chunks)


def test_limits_reject_or_refuse_with_clear_errors(checkpoints):
    folder, _ = checkpoints["gemma1"]
    engine = engine_for(folder, max_model_len=64, max_queue_len=2)
    with pytest.raises(RequestRejectedError, match="60.*10.*70.*64"):
        engine.add_request("long", prompt(1, 60), SamplingParams(max_tokens=10))
    with pytest.raises(RequestRejectedError, match="empty"):
        engine.add_request("empty", [], SamplingParams(max_tokens=1))
    with pytest.raises(RequestRejectedError, match="token ids"):
        engine.add_request("oov", [5, 100000], SamplingParams(max_tokens=1))
    engine.add_request("a", prompt(1, 4), SamplingParams(max_tokens=1))
    engine.add_request("b", prompt(2, 4), SamplingParams(max_tokens=1))
    with pytest.raises(EngineOverloadedError):
        engine.add_request("c", prompt(3, 4), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", prompt(1, 4), SamplingParams(max_tokens=1))


def test_decodes_keep_running_while_a_long_prompt_is_prefilled_in_chunks(checkpoints):
    folder, _ = checkpoints["gemma2"]
    # Steps run one at a time here (run_step needs nothing in flight), not overlapped.
    engine = engine_for(folder, max_num_batched_tokens=8, overlap_steps=False)
    engine.add_request("decoding", prompt(30, 3), SamplingParams(max_tokens=20, **GREEDY))
    engine.step()  # its prompt, and its first token
    engine.add_request("long", prompt(31, 60), SamplingParams(max_tokens=2, **GREEDY))
    for _ in range(8):  # 60 prompt tokens at most 7 a step: "long" prefills all along
        chunks = engine.scheduler.schedule()
        assert chunks[0].seq.request_id == "decoding" and chunks[0].num_tokens == 1
        assert sum(c.num_tokens for c in chunks) <= 8
        outputs = engine.run_step(chunks)
        assert [o.request_id for o in outputs] == ["decoding"]
    alone = engine_for(folder).generate([prompt(30, 3)], SamplingParams(max_tokens=20, **GREEDY))[0]
    decoded = list(engine.sequences["decoding"].output_token_ids)
    while engine.has_unfinished():
        decoded += [t for o in engine.step() if o.request_id == "decoding" for t in o.new_token_ids]
    assert decoded == alone
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_two_running_requests_share_a_cached_prefix(checkpoints):
    folder, _ = checkpoints["gemma3"]
    engine = engine_for(folder)
    shared = prompt(40, 24)
    params = SamplingParams(max_tokens=6, **GREEDY)
    expected = engine_for(folder, enable_prefix_caching=False).generate([shared + [9], shared + [11]], params)
    engine.add_request("first", shared + [9], params)
    engine.step()  # computes and publishes the prompt's full blocks
    engine.add_request("second", shared + [11], params)
    engine.step()
    first, second = engine.sequences["first"], engine.sequences["second"]
    assert second.num_cached_tokens == 24 and second.block_table[:6] == first.block_table[:6]
    assert all(engine.block_manager.ref_counts[b] == 2 for b in first.block_table[:6])
    outputs = {"first": list(first.output_token_ids), "second": list(second.output_token_ids)}
    while engine.has_unfinished():
        for o in engine.step():
            outputs[o.request_id].extend(o.new_token_ids)
    assert [outputs["first"], outputs["second"]] == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("generation", ["gemma1", "gemma3"])
def test_random_workload_with_shared_prefixes_tiny_pool_and_aborts(checkpoints, generation):
    """Prefix hits, preemption and aborts together: ref counts always match the block tables (both
    pools for Gemma 3's sliding-window layers, window 8), the survivors' outputs equal a roomy run's,
    and every block comes back."""
    folder, _ = checkpoints[generation]
    rng = random.Random(3)
    prefixes = [prompt(50, 9), prompt(51, 14)]
    requests = {}
    for i in range(12):
        p = rng.choice(prefixes)[:rng.randint(4, 14)] + prompt(60 + i, rng.randint(1, 6))
        requests[f"r{i}"] = (p, SamplingParams(max_tokens=rng.randint(3, 14), **GREEDY))
    ids = list(requests)
    roomy = dict(zip(ids, engine_for(folder).generate([requests[r][0] for r in ids], [requests[r][1] for r in ids])))

    engine = engine_for(folder, num_kv_blocks=12, max_num_batched_tokens=10)
    bm = engine.block_manager
    join_at = {r: rng.randint(0, 10) for r in ids}
    abort_at = {r: join_at[r] + rng.randint(0, 8) for r in rng.sample(ids, 3)}
    outputs = {r: [] for r in ids}
    finished, cache_hits = set(), 0
    step = 0
    while step <= 10 or engine.has_unfinished():
        for r in ids:
            if join_at[r] == step:
                engine.add_request(r, *requests[r])
            if abort_at.get(r) == step:
                engine.abort(r)
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
            if out.finished:
                finished.add(out.request_id)
        cache_hits += sum(s.num_cached_tokens for s in engine.scheduler.running)
        held = [b for s in engine.scheduler.running for b in s.block_table]
        assert sum(bm.ref_counts) == len(held)
        assert all(bm.ref_counts[b] == 0 for b in bm.pool.free) and not any(s.block_table for s in engine.scheduler.waiting)
        if bm.window_pool is not None:
            window_held = [b for s in engine.scheduler.running for b in s.window_table if b != FREED]
            assert sum(bm.window_pool.ref_counts) == len(window_held)
            assert all(bm.window_pool.ref_counts[b] == 0 for b in bm.window_pool.free)
            # A running sequence holds at most its window plus one step's tokens.
            for s in engine.scheduler.running:
                live = sum(1 for b in s.window_table if b != FREED)
                assert live <= bm.blocks_needed(8 - 1 + 10) + 1, (s, s.window_table)
        step += 1
    assert engine.scheduler.num_preemptions > 0 and cache_hits > 0
    for r in finished:
        assert outputs[r] == roomy[r], r
    assert len(finished) >= 9 - len(abort_at)
    assert bm.num_free_blocks == bm.num_blocks
    if bm.window_pool is not None:
        assert bm.num_free_window_blocks == bm.window_pool.num_blocks
