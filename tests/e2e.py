"""Shared helpers for end-to-end tests against the fake realtime server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harkd.adapters.base import RealtimeAdapter, RealtimeConnection
from harkd.adapters.openai import openai_realtime
from harkd.audio.base import AudioFrame
from harkd.audio.wav import WavInput
from harkd.backoff import Backoff
from harkd.client import RealtimeClient
from harkd.events import AppendAudio, Command, ServerEvent, SessionSettings, Unknown
from harkd.messages import RealtimeStatus, RealtimeToken
from harkd.testing import FakeRealtimeServer, validate_client_event
from harkd.tokens import static_token


def fake_client(server: FakeRealtimeServer, key: str, **options: Any) -> RealtimeClient:
    """A RealtimeClient on `server` with test defaults (fast reconnects); `options` win."""
    defaults: dict[str, Any] = {
        "get_token": static_token(key),
        "adapter": openai_realtime(url=server.url),
        "instructions": "Be brief.",
        "transcription_model": "gpt-4o-mini-transcribe",
        "reconnect": Backoff(0.05, 0.2),
    }
    return RealtimeClient(**{**defaults, **options})


async def until(predicate: Callable[[], bool], timeout_s: float = 20.0, what: str = "") -> None:
    """Wait for a condition the test can observe (polls; tests only). The deadline only
    says when to give up: generous, so a loaded machine is not a failure."""
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


# --------------------------------------------------------------------------- timelines


@dataclass(frozen=True)
class Entry:
    """One thing a client did: `kind` is "frame" (the microphone delivered a period),
    "append" (audio went to the connection, its length in `detail`), "command" (another
    command, its class name in `detail`), "event" (a server event was handled, the event
    in `detail`) or whatever a test adds (e.g. "mode")."""

    kind: str
    at: float
    detail: Any = None


class Timeline(list[Entry]):
    """What one client did, in the order it did it. Everything is noted on the client's
    own event loop, so the order is exact whatever the machine's speed: tests assert on
    it (and on counts) rather than on time windows."""

    def add(self, kind: str, detail: Any = None) -> None:
        self.append(Entry(kind, time.monotonic(), detail))

    def index_of(self, kind: str, detail: Any = None, start: int = 0) -> int:
        """Index of the first `kind` entry (with `detail`, when given) from `start` on."""
        for i in range(start, len(self)):
            if self[i].kind == kind and (detail is None or self[i].detail == detail):
                return i
        raise ValueError(f"no {kind} {detail or ''} from {start}: {self.kinds()}")

    def tally(self, kind: str, start: int = 0, end: int | None = None) -> int:
        """How many `kind` entries in [start, end)."""
        return sum(1 for e in self[start:end] if e.kind == kind)

    def kinds(self) -> list[str]:
        return [e.kind for e in self]


SENTINEL = {"type": "harkd_test.sentinel"}
"""A server event no client knows (logged and ignored): sent after others, its turn on
a timeline shows the client has handled everything sent before it."""


def handled_sentinel(timeline: Timeline) -> bool:
    return any(
        e.kind == "event" and isinstance(e.detail, Unknown) and e.detail.type == SENTINEL["type"]
        for e in timeline
    )


class _LoggedConnection:
    def __init__(self, inner: RealtimeConnection, timeline: Timeline) -> None:
        self._inner = inner
        self._timeline = timeline

    def send(self, command: Command) -> None:
        if isinstance(command, AppendAudio):
            self._timeline.add("append", len(command.pcm))
        else:
            self._timeline.add("command", type(command).__name__)
        self._inner.send(command)

    async def send_audio(self, pcm: bytes) -> None:
        self._timeline.add("append", len(pcm))
        await self._inner.send_audio(pcm)

    def update_session(self, settings: SessionSettings) -> None:
        self._inner.update_session(settings)

    async def serve(self, on_event: Callable[[ServerEvent], None]) -> None:
        def handled(event: ServerEvent) -> None:
            on_event(event)
            self._timeline.add("event", event)

        await self._inner.serve(handled)

    async def close(self) -> None:
        await self._inner.close()


class LoggedAdapter:
    """A provider adapter that notes on `timeline` the audio the client sends and the
    server events it has handled (after handling them)."""

    def __init__(self, inner: RealtimeAdapter, timeline: Timeline) -> None:
        self._inner = inner
        self._timeline = timeline
        self.name = inner.name
        self.traits = inner.traits

    async def connect(
        self, token: RealtimeToken, settings: SessionSettings, resume_handle: str | None = None
    ) -> RealtimeConnection:
        inner = await self._inner.connect(token, settings, resume_handle)
        return _LoggedConnection(inner, self._timeline)


class LoggedInput(WavInput):
    """A paced WAV microphone that notes each period it delivers on `timeline`. The
    client handles a period before it asks for the next, so a "frame" entry is followed
    by what that period caused (an "append" or nothing). With `on`, it delivers nothing
    until that event is set."""

    def __init__(self, path: Path, timeline: Timeline, on: asyncio.Event | None = None) -> None:
        super().__init__(path)
        self._timeline = timeline
        self._on = on

    async def frames(self) -> AsyncIterator[AudioFrame]:
        if self._on is not None:
            # Switched on late (e.g. once connected): the file plays from its start
            # then, however long connecting took.
            await self._on.wait()
        async for frame in super().frames():
            self._timeline.add("frame")
            yield frame


def logged_client(
    server: FakeRealtimeServer, key: str, timeline: Timeline, **options: Any
) -> RealtimeClient:
    """`fake_client` whose connection notes on `timeline` (see `LoggedAdapter`)."""
    adapter = LoggedAdapter(openai_realtime(url=server.url), timeline)
    return fake_client(server, key, adapter=adapter, **options)
