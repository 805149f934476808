"""What the client needs from a provider adapter, and how connections fail."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from harkd.events import Command, ServerEvent, SessionSettings
from harkd.messages import RealtimeToken


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
        """Send microphone audio (PCM16 24 kHz) behind anything already queued."""

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
    """A provider: opens configured sessions."""

    name: str

    async def connect(self, token: RealtimeToken, settings: SessionSettings) -> RealtimeConnection:
        """Open a session configured with `settings` (waits until the provider accepted)."""
