"""Plays a `Schedule`: releases requests on its clock, caps those in flight, and stops by itself.

A run is bounded twice: it releases at most the schedule's requests and none after its window; then
requests still in flight get `drain_s` seconds to finish before they are cancelled (the client marks
them incomplete). So a run never outlives window + drain, whatever the server does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from gemma_serve.bench.load_shapes import Schedule


@dataclass(frozen=True)
class DispatchOutcome:
    scheduled: int
    sent: int
    cancelled: int  # in flight when the drain limit passed

    @property
    def not_sent(self) -> int:  # still waiting for release when the window closed
        return self.scheduled - self.sent


async def dispatch(schedule: Schedule, start: Callable[[int, float], Awaitable[None]], *,
                   clock: Callable[[], float], drain_s: float,
                   on_done: Callable[[int], None] | None = None) -> DispatchOutcome:
    """Runs `start(index, scheduled_s)` for each release of `schedule`; `clock` reads run seconds."""
    cap = schedule.max_concurrency
    sem = asyncio.Semaphore(cap) if cap else None
    window = schedule.window_s
    tasks: list[asyncio.Task[None]] = []

    async def run_one(index: int, at: float) -> None:
        try:
            await start(index, at)
        finally:
            if sem is not None:
                sem.release()
            if on_done is not None:
                on_done(index)

    for index, at in enumerate(schedule.arrivals):
        if window is not None and at >= window:
            break
        delay = at - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        if sem is not None:
            if window is None:
                await sem.acquire()
            else:
                remaining = window - clock()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(sem.acquire(), remaining)
                except asyncio.TimeoutError:
                    break
        tasks.append(asyncio.create_task(run_one(index, at)))

    cancelled = 0
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        cancelled = len(pending)
        for task in tasks:  # a bug in `start` must surface, not vanish into a task
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    return DispatchOutcome(scheduled=schedule.num_requests, sent=len(tasks), cancelled=cancelled)
