"""The async front: concurrent requests, early exit frees blocks, abort is idempotent."""

import asyncio

import pytest
from gemma_serve.engine.async_engine import AsyncEngine
from gemma_serve.engine.outputs import EngineOverloadedError, RequestRejectedError
from gemma_serve.engine.sampling_params import SamplingParams

from .conftest import engine_for, prompt


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


async def wait_all_free(engine) -> None:
    for _ in range(200):
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"blocks still held: {engine.stats()}")


async def test_plain_break_and_a_never_read_stream_abort(async_engine):
    async for _ in async_engine.add_request("breaker", prompt(5, 10), SamplingParams(max_tokens=100)):
        break
    async_engine.add_request("ignored", prompt(6, 10), SamplingParams(max_tokens=100))  # dropped at once
    await wait_all_free(async_engine)
    assert not async_engine.engine.sequences


async def test_aclose_while_a_next_is_pending_in_another_task(async_engine):
    """The Triton model waits on `__anext__` in a task, cancels it and closes the stream."""
    stream = async_engine.add_request("pending", prompt(7, 10), SamplingParams(max_tokens=100))
    first = await stream.__anext__()
    assert not first.finished
    pending = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    pending.cancel()
    await stream.aclose()
    await wait_all_free(async_engine)
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


async def test_a_failing_step_fails_the_streams_and_the_engine_goes_on(async_engine, monkeypatch):
    runner = async_engine.engine.runner
    real_run, real_launch = runner.run, runner.launch

    def broken(chunks, previous=None):
        raise RuntimeError("device on fire")

    # Both ways a step reaches the device: run synchronously, or launched overlapped.
    monkeypatch.setattr(runner, "run", broken)
    monkeypatch.setattr(runner, "launch", broken)
    with pytest.raises(RuntimeError, match="device on fire"):
        await collect(async_engine, "doomed", prompt(8, 6), SamplingParams(max_tokens=4))
    await wait_all_free(async_engine)
    monkeypatch.setattr(runner, "run", real_run)
    monkeypatch.setattr(runner, "launch", real_launch)
    tokens, last = await collect(async_engine, "fine", prompt(8, 6), SamplingParams(max_tokens=4))
    assert len(tokens) == 4 and last.finish_reason == "length"


async def test_shutdown_fails_streams_in_flight(checkpoints):
    folder, _ = checkpoints["gemma1"]
    engine = AsyncEngine(engine_for(folder))
    engine.start()
    stream = engine.add_request("cut", prompt(9, 6), SamplingParams(max_tokens=400))
    await stream.__anext__()
    engine.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        async for _ in stream:
            pass


async def test_full_queue_is_refused_at_add_time(checkpoints):
    folder, _ = checkpoints["gemma1"]
    engine = AsyncEngine(engine_for(folder, max_queue_len=2))  # not started: nothing leaves the queue
    streams = [engine.add_request(f"q{i}", prompt(i, 4), SamplingParams(max_tokens=2)) for i in range(2)]
    with pytest.raises(EngineOverloadedError):
        engine.add_request("q2", prompt(2, 4), SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("q0", prompt(0, 4), SamplingParams(max_tokens=2))
    engine.start()
    lengths = []
    for stream in streams:
        lengths.append(sum([len(out.new_token_ids) async for out in stream]))
    assert lengths == [2, 2]
    engine.shutdown()


async def test_a_slow_consumer_takes_the_piled_up_deltas_at_once(checkpoints, async_engine):
    """take_ready() hands over what the engine delivered while the consumer was away, in order, and
    nothing is lost or repeated: the tokens equal the synchronous engine's."""
    folder, _ = checkpoints["gemma3"]
    p, params = prompt(77, 9), SamplingParams(max_tokens=12, temperature=0.0)
    expected = engine_for(folder).generate([p], params)[0]
    stream = async_engine.add_request("slow", p, params)
    first = await stream.__anext__()
    await asyncio.sleep(1.0)  # the engine runs ahead: the rest of the deltas pile up in the stream
    ready = stream.take_ready()
    assert len(ready) >= 2 and ready[-1].finished
    assert first.new_token_ids + [t for out in ready for t in out.new_token_ids] == expected
    assert stream.take_ready() == []
    with pytest.raises(StopAsyncIteration):
        await stream.__anext__()


async def test_an_error_met_by_take_ready_is_raised_by_the_next_read(async_engine, monkeypatch):
    runner = async_engine.engine.runner
    stream = async_engine.add_request("doomed", prompt(8, 6), SamplingParams(max_tokens=50))
    await stream.__anext__()

    def broken(chunks, previous=None):
        raise RuntimeError("device on fire")

    monkeypatch.setattr(runner, "run", broken)
    monkeypatch.setattr(runner, "launch", broken)
    await asyncio.sleep(0.5)
    stream.take_ready()  # the deltas before the failure, then the error is held back
    with pytest.raises(RuntimeError, match="device on fire"):
        await stream.__anext__()
    assert stream.take_ready() == []


@pytest.mark.parametrize("freeze", [True, False])
async def test_start_freezes_the_long_lived_objects_and_shutdown_gives_them_back(checkpoints, freeze):
    """freeze_gc: start() moves everything alive (the model, torch...) out of the collector's scans,
    requests are still served, and after shutdown() the engine, a reference cycle with its runner,
    is collectable again (a frozen one would never be freed)."""
    import gc
    import weakref

    folder, _ = checkpoints["gemma3"]
    engine = AsyncEngine(engine_for(folder, max_model_len=128, freeze_gc=freeze))
    runner = weakref.ref(engine.engine.runner)
    engine.engine.runner.cycle = engine.engine  # a cycle the collector must break
    gc.unfreeze()  # whatever an earlier test's engine left frozen
    engine.start()
    try:
        assert (gc.get_freeze_count() > 0) == freeze
        tokens, last = await collect(engine, "a", prompt(60, 6), SamplingParams(max_tokens=3, temperature=0.0))
        assert len(tokens) == 3 and last.finish_reason == "length"
    finally:
        engine.shutdown()
    assert gc.get_freeze_count() == 0
    del engine
    gc.collect()
    assert runner() is None
