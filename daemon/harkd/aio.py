"""asyncio helpers harkd's parts share."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has ended. Its own cancellation ends here; one
    aimed at the caller while it waits (a shutdown budget running out, the service
    being stopped) goes on, which `contextlib.suppress(CancelledError)` would swallow."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
