"""Shared helpers for end-to-end tests against the fake realtime server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from harkd.adapters.openai import openai_realtime
from harkd.client import RealtimeClient, ReconnectPolicy
from harkd.messages import RealtimeStatus
from harkd.testing import FakeRealtimeServer, validate_client_event
from harkd.tokens import static_token


def fake_client(server: FakeRealtimeServer, key: str, **options: Any) -> RealtimeClient:
    """A RealtimeClient on `server` with test defaults (fast reconnects); `options` win."""
    defaults: dict[str, Any] = {
        "get_token": static_token(key),
        "adapter": openai_realtime(url=server.url),
        "instructions": "Be brief.",
        "transcription_model": "gpt-4o-mini-transcribe",
        "reconnect": ReconnectPolicy(0.05, 0.2),
    }
    return RealtimeClient(**{**defaults, **options})


async def until(predicate: Callable[[], bool], timeout_s: float = 5.0, what: str = "") -> None:
    """Wait for a condition the test can observe (polls; tests only)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)


def sent_types(server: FakeRealtimeServer, connection: int | None = None) -> list[str]:
    """Types of the client events the server received, in order."""
    return [e["type"] for i, e in server.received if connection is None or i == connection]


def assert_all_valid(server: FakeRealtimeServer) -> None:
    """Every event the daemon sent is valid for the real API; no error came back."""
    for _, event in server.received:
        validate_client_event(event)
    problems: list[dict[str, Any]] = [
        e for e in server.errors_sent if e.get("error", {}).get("code") != "session_expired"
    ]
    assert problems == [], problems


class Running:
    """A client running under its own `run()` task, as a supervisor would own it."""

    def __init__(self, client: RealtimeClient) -> None:
        self.client = client
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RealtimeClient:
        self.task = asyncio.create_task(self.client.run())
        await until(lambda: self.client.status is RealtimeStatus.CONNECTED, what="connected")
        return self.client

    async def __aexit__(self, *_: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
