"""What the client needs from a provider adapter, what an adapter declares it can do,
and how connections fail."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, NoReturn, Protocol

from harkd.events import Command, ServerEvent, SessionSettings
from harkd.messages import RealtimeToken


@dataclass(frozen=True)
class AudioFormat:
    """PCM16 mono little-endian audio at `rate` Hz."""

    rate: int

    @property
    def bytes_per_ms(self) -> float:
        """Bytes of one millisecond of this audio (2 bytes a sample)."""
        return self.rate * 2 / 1000


@dataclass(frozen=True)
class ProviderTraits:
    """What a provider can do, declared by its adapter. The session and the client
    decide from these, never from a provider's name."""

    input_format: AudioFormat
    """The microphone audio the provider takes (`AppendAudio`)."""
    output_format: AudioFormat
    """The answer audio it sends (`AudioDelta`)."""
    server_turns: bool
    """It can decide turns itself (server VAD): vad_mode server or semantic."""
    manual_turns: bool
    """harkd can decide turns (`StartTurn`, `EndTurn`): vad_mode manual."""
    answers_by_itself: bool
    """After `EndTurn` it answers without a `RequestResponse`."""
    can_truncate: bool
    """It can cut an answer at the heard position (`TruncateItem`); without it, the
    message is still marked interrupted at that position."""
    resume: Literal["handle", "replay"]
    """After a drop a session is resumed with the provider's `ResumeHandle`, or a fresh
    one gets the recent conversation replayed as context."""


class ConnectionFailed(Exception):
    """A connection could not be opened or set up (retry with backoff)."""


class AuthenticationFailed(ConnectionFailed):
    """The provider refused the credential: retrying quickly is pointless."""


class ConnectionLost(Exception):
    """An open connection ended: closed by the server, dropped, or a ping timed out."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection closed ({code}): {reason}" if code else reason)
        self.code = code
        self.reason = reason


class ProtocolError(ConnectionLost):
    """The server sent something that is not its protocol (a non-JSON or binary frame,
    a known event with missing or mistyped fields). The connection cannot be trusted
    to be in step any more, so it ends like a drop and is reconnected."""

    def __init__(self, reason: str) -> None:
        super().__init__(None, f"protocol error: {reason}")


class RealtimeConnection(Protocol):
    """One open provider session."""

    def send(self, command: Command) -> None:
        """Queue a command; control commands overtake queued audio."""

    async def send_audio(self, pcm: bytes) -> None:
        """Send microphone audio (in `traits.input_format`) behind anything queued."""

    def update_session(self, settings: SessionSettings) -> None:
        """Apply changed settings (instructions, tools) to the running session."""

    async def serve(self, on_event: Callable[[ServerEvent], None]) -> None:
        """Deliver decoded events until the connection ends.

        Always ends by raising: `ConnectionLost` (a close, a drop, a ping timeout or a
        `ProtocolError`), `AuthenticationFailed`, or whatever `on_event` raised.
        """

    async def close(self) -> None:
        """Close cleanly."""


class RealtimeAdapter(Protocol):
    """A provider: declares what it can do, opens configured sessions."""

    name: str
    traits: ProviderTraits

    async def connect(
        self, token: RealtimeToken, settings: SessionSettings, resume_handle: str | None = None
    ) -> RealtimeConnection:
        """Open a session configured with `settings` (waits until the provider accepted).

        With `resume_handle` (from a `ResumeHandle` event) a provider whose traits say
        `resume="handle"` continues that session; others ignore it.
        """


async def serve_until_lost(
    reader: Coroutine[Any, Any, None], writer: Coroutine[Any, Any, None]
) -> NoReturn:
    """Run a connection's reader and writer until either ends, then raise what ended
    it: one exception, never a group (no TaskGroup, no `except*`: before 3.11.4 an
    exception raised there comes out wrapped). Both may have seen the same close; the
    reader's account comes first, it has the close code. A clean end is a
    `ConnectionLost` too."""
    tasks = (
        asyncio.create_task(reader, name="ws-reader"),
        asyncio.create_task(writer, name="ws-writer"),
    )
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
    raise ConnectionLost(None, "connection ended")
