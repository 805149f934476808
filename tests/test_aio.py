"""cancel_and_wait: a part stopped during shutdown does not swallow the shutdown's own
stop (a daemon whose shutdown budget ran out must still stop)."""

from __future__ import annotations

import asyncio

import pytest

from harkd.aio import cancel_and_wait


async def slow_to_stop(stopped: asyncio.Event) -> None:
    try:
        await asyncio.sleep(3600)
    finally:
        await stopped.wait()  # it takes its time to clean up


async def test_the_task_is_cancelled_and_the_caller_goes_on() -> None:
    task = asyncio.create_task(asyncio.sleep(3600))
    await cancel_and_wait(task)
    assert task.cancelled()


async def test_a_cancellation_of_the_caller_while_it_waits_goes_through() -> None:
    stopped = asyncio.Event()
    part = asyncio.create_task(slow_to_stop(stopped))
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # the shutdown budget
            await cancel_and_wait(part)
    stopped.set()
    await asyncio.gather(part, return_exceptions=True)
