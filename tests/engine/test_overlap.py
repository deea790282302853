"""Overlapped steps (`LLMEngine.step`): a graphed decode step, or an eager prefill / mixed step, is
launched before the previous step's draws are read, taking its input tokens on the device. Checked on CPU with the simulated
graphs of test_cuda_graphs: the outputs (tokens, logprobs, finish reasons) equal those of the same
engine without overlap, whatever stops a request (stop token on a pending token, max_tokens,
max_model_len, abort, preemption), and no placeholder ever reaches a caller or the model."""

import random

import pytest
from gemma_serve.engine import model_runner
from gemma_serve.engine.sampling_params import SamplingParams
from gemma_serve.engine.sequence import PENDING_TOKEN

from .conftest import engine_for, prompt
from .test_cuda_graphs import simulated_graphs


def graphed_engine(folder, overlap: bool, **overrides):
    engine = engine_for(folder, cuda_graphs=False, overlap_steps=overlap, **overrides)
    simulated_graphs(engine)
    return engine


def count_launches(engine) -> list[int]:
    counter = [0]
    launch = engine.runner.launch

    def counting(chunks, previous):
        counter[0] += 1
        # The model never sees a placeholder: pending tokens are taken from the previous draws.
        assert all(c.seq.token_ids[c.start] != PENDING_TOKEN or previous is not None for c in chunks)
        return launch(chunks, previous)

    engine.runner.launch = counting
    return counter


def run_all(engine, requests, join_at):
    """run_staggered, plus every delta's fields, checked for placeholders."""
    deltas = {rid: [] for rid in requests}
    step = 0
    while True:
        for rid, at in join_at.items():
            if at == step:
                engine.add_request(rid, *requests[rid])
        if not engine.has_unfinished() and all(at <= step for at in join_at.values()):
            break
        for out in engine.step():
            assert PENDING_TOKEN not in out.new_token_ids
            deltas[out.request_id].append(out)
        step += 1
    return {rid: (sum((o.new_token_ids for o in outs), []), [o.finish_reason for o in outs if o.finished],
                  sum((o.new_logprobs or [] for o in outs), []), outs[-1].num_output_tokens if outs else 0)
            for rid, outs in deltas.items()}


def mixed_requests(seed: int, n: int = 9) -> tuple[dict, dict]:
    rng = random.Random(seed)
    requests = {}
    for i in range(n):
        params = dict(max_tokens=rng.randint(3, 30), temperature=rng.choice([0.0, 0.0, 0.8]), seed=i,
                      logprobs=rng.random() < 0.3)
        if i % 3 == 0:  # stop tokens that greedy decoding of the tiny model does produce
            params["stop_token_ids"] = (rng.randint(5, 300), rng.randint(5, 300))
            params["min_tokens"] = rng.randint(0, 2)
        if i == 4:
            params["repetition_penalty"] = 1.3  # needs the host's history: its steps run synchronously
        requests[f"r{i}"] = (prompt(300 + i, rng.randint(3, 40)), SamplingParams(**params))
    return requests, {rid: rng.randint(0, 12) for rid in requests}


@pytest.mark.parametrize("generation", ["gemma2", "gemma3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_overlapped_steps_give_the_same_outputs(checkpoints, generation, seed):
    folder, _ = checkpoints[generation]
    requests, join_at = mixed_requests(seed)
    expected = run_all(graphed_engine(folder, False, max_num_batched_tokens=32), requests, join_at)
    engine = graphed_engine(folder, True, max_num_batched_tokens=32)
    launches = count_launches(engine)
    got = run_all(engine, requests, join_at)
    assert got == expected
    assert launches[0] >= 5  # fewer while the penalised request runs (its steps are synchronous)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.sequences and engine._in_flight is None


@pytest.mark.parametrize("overlap_eager", [True, False])
def test_prefill_and_mixed_steps_are_overlapped_too(checkpoints, monkeypatch, overlap_eager):
    """An eager step (prompt chunks, with or without decode rows) is launched before the previous
    step's draws are read, its decode rows' tokens taken on the device: the same outputs as
    synchronous steps, with launched steps that mix a prompt chunk and a still-pending decode row.
    GEMMA_OVERLAP_EAGER=0 (OVERLAP_EAGER False) launches graphed decode steps only."""
    monkeypatch.setattr(model_runner, "OVERLAP_EAGER", overlap_eager)
    folder, _ = checkpoints["gemma3"]
    requests, join_at = mixed_requests(2)
    expected = run_all(graphed_engine(folder, False, max_num_batched_tokens=32), requests, join_at)
    engine = graphed_engine(folder, True, max_num_batched_tokens=32)
    kinds = {"eager": 0, "mixed with a pending row": 0}
    launch = engine.runner.launch

    def counting(chunks, previous):
        if any(c.num_tokens > 1 for c in chunks):
            kinds["eager"] += 1
            if any(c.seq.token_ids[c.start] == PENDING_TOKEN for c in chunks):
                kinds["mixed with a pending row"] += 1
        return launch(chunks, previous)

    engine.runner.launch = counting
    assert run_all(engine, requests, join_at) == expected
    if overlap_eager:
        assert kinds["eager"] > 3 and kinds["mixed with a pending row"] > 0, kinds
    else:
        assert kinds["eager"] == 0, kinds
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_stop_on_a_pending_token_drops_the_token_computed_after_it(checkpoints):
    folder, _ = checkpoints["gemma3"]
    target = prompt(7, 12)
    free_run = graphed_engine(folder, False).generate([target], SamplingParams(max_tokens=20, temperature=0.0))[0]
    stop = free_run[6]
    cut = free_run[:free_run.index(stop) + 1]
    engine = graphed_engine(folder, True)
    launches = count_launches(engine)
    params = SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=(stop,))
    got = run_all(engine, {"t": (target, params)}, {"t": 0})["t"]
    assert got[0] == cut and got[1] == ["stop"] and got[3] == len(cut)
    assert launches[0] >= len(cut) - 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_max_model_len_is_never_exceeded(checkpoints):
    folder, _ = checkpoints["gemma2"]
    engine = graphed_engine(folder, True, max_model_len=40)
    out = run_all(engine, {"a": (prompt(1, 30), SamplingParams(max_tokens=10, temperature=0.0))}, {"a": 0})["a"]
    assert len(out[0]) == 10 and out[1] == ["length"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_abort_while_a_step_is_in_flight(checkpoints):
    folder, _ = checkpoints["gemma3"]
    engine = graphed_engine(folder, True)
    for rid in ("a", "b"):
        engine.add_request(rid, prompt(ord(rid), 10), SamplingParams(max_tokens=30, temperature=0.0))
    seen = {"a": [], "b": []}
    while engine._in_flight is None:
        for out in engine.step():
            seen[out.request_id].extend(out.new_token_ids)
    assert engine.abort("a")
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == "b"
            seen["b"].extend(out.new_token_ids)
    assert len(seen["b"]) == 30 and PENDING_TOKEN not in seen["b"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_with_overlapped_steps(checkpoints, prefix_caching):
    """Without prefix caching a recomputed sequence gets other blocks: the graph runner's cached
    host rows of its block table must be rewritten, not extended."""
    folder, _ = checkpoints["gemma2"]
    prompts = [prompt(40 + i, 20) for i in range(6)]
    params = SamplingParams(max_tokens=22, temperature=0.0)
    roomy = graphed_engine(folder, False).generate(prompts, params)
    tight = graphed_engine(folder, True, num_kv_blocks=30, enable_prefix_caching=prefix_caching)  # needs 66
    launches = count_launches(tight)
    assert tight.generate(prompts, params) == roomy
    assert tight.scheduler.num_preemptions > 0 and launches[0] > 0
    assert tight.block_manager.num_free_blocks == 30


# -- through AsyncEngine (the serving loop) ----------------------------------------------------------


async def _collect(engine, rid, p, params):
    tokens, last = [], None
    async for out in engine.add_request(rid, p, params):
        assert PENDING_TOKEN not in out.new_token_ids
        tokens.extend(out.new_token_ids)
        last = out
    return tokens, last


async def test_async_engine_with_overlapped_steps(checkpoints):
    """Concurrent streams, one of them dropped mid-way, through the engine thread: the others get the
    synchronous engine's tokens, and every block comes back."""
    import asyncio

    from gemma_serve.engine.async_engine import AsyncEngine

    folder, _ = checkpoints["gemma3"]
    prompts = [prompt(60 + i, 4 + 3 * i) for i in range(6)]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    expected = graphed_engine(folder, False).generate(prompts, params)
    engine = graphed_engine(folder, True)
    launches = count_launches(engine)
    front = AsyncEngine(engine)
    front.start()
    try:
        async def leaver():
            async for _ in front.add_request("leaver", prompt(5, 8), SamplingParams(max_tokens=200)):
                await asyncio.sleep(0.005)
                if engine.runner._launches > 4:
                    break

        results = await asyncio.gather(leaver(), *(_collect(front, f"r{i}", p, params) for i, p in enumerate(prompts)))
        assert [r[0] for r in results[1:]] == expected
        assert all(r[1].finish_reason == "length" for r in results[1:])
        for _ in range(100):
            stats = front.stats()
            if stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks:
                break
            await asyncio.sleep(0.02)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert launches[0] > 10
    finally:
        front.shutdown()


async def test_a_failing_overlapped_launch_fails_the_streams_and_the_engine_goes_on(checkpoints, monkeypatch):
    from gemma_serve.engine.async_engine import AsyncEngine

    folder, _ = checkpoints["gemma3"]
    engine = graphed_engine(folder, True)
    front = AsyncEngine(engine)
    front.start()
    try:
        real = engine.runner.launch

        def broken(chunks, previous):
            raise RuntimeError("device on fire")

        monkeypatch.setattr(engine.runner, "launch", broken)
        with pytest.raises(RuntimeError, match="device on fire"):
            await _collect(front, "doomed", prompt(8, 6), SamplingParams(max_tokens=6))
        monkeypatch.setattr(engine.runner, "launch", real)
        tokens, last = await _collect(front, "fine", prompt(8, 6), SamplingParams(max_tokens=6, temperature=0.0))
        assert len(tokens) == 6 and last.finish_reason == "length"
        assert engine._in_flight is None and engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    finally:
        front.shutdown()
