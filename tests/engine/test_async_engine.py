"""The async front: concurrent requests, early exit frees blocks, abort is idempotent."""

import asyncio

import pytest

from gemma_serve.engine.async_engine import AsyncEngine
from gemma_serve.engine.outputs import RequestRejectedError
from gemma_serve.engine.sampling_params import SamplingParams

from .conftest import engine_for
from .test_batching import prompt


@pytest.fixture
def async_engine(checkpoints):
    folder, _ = checkpoints["gemma3"]
    engine = AsyncEngine(engine_for(folder, max_model_len=128))
    engine.start()
    yield engine
    engine.shutdown()


async def collect(engine, rid, p, params):
    tokens, last = [], None
    async for out in engine.add_request(rid, p, params):
        tokens.extend(out.new_token_ids)
        last = out
    return tokens, last


async def test_concurrent_requests_match_the_sync_engine(checkpoints, async_engine):
    folder, _ = checkpoints["gemma3"]
    prompts = [prompt(40 + i, 5 + 3 * i) for i in range(8)]
    params = SamplingParams(max_tokens=10, temperature=0.0)
    expected = engine_for(folder).generate(prompts, params)
    results = await asyncio.gather(*(collect(async_engine, f"r{i}", p, params) for i, p in enumerate(prompts)))
    assert [r[0] for r in results] == expected
    assert all(r[1].finished and r[1].finish_reason == "length" for r in results)


async def test_leaving_early_aborts_and_frees_blocks(async_engine):
    bm = async_engine.engine.block_manager
    stream = async_engine.add_request("leaver", prompt(1, 10), SamplingParams(max_tokens=100))
    async for out in stream:
        break
    await stream.aclose()
    for _ in range(100):
        stats = async_engine.stats()
        if stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks:
            break
        await asyncio.sleep(0.02)
    assert bm.num_free_blocks == bm.num_blocks


async def test_cancelled_task_aborts(async_engine):
    async def consume():
        async for _ in async_engine.add_request("cancel-me", prompt(2, 10), SamplingParams(max_tokens=100)):
            await asyncio.sleep(0.01)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(100):
        if async_engine.stats().num_running == 0:
            break
        await asyncio.sleep(0.02)
    stats = async_engine.stats()
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks


async def test_abort_is_idempotent_and_rejections_are_synchronous(async_engine):
    async_engine.abort("never-existed")
    async_engine.abort("never-existed")
    with pytest.raises(RequestRejectedError):
        async_engine.add_request("too-long", prompt(3, 120), SamplingParams(max_tokens=20))
    tokens, last = await collect(async_engine, "after", prompt(4, 4), SamplingParams(max_tokens=3))
    assert len(tokens) == 3 and last.finished
