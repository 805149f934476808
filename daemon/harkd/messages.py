"""The shared vocabulary of harkd: status, mode, messages and their parts, audio
visualization, client state and the events the client reports to its subscribers.

Everything here is a frozen value: the client replaces state, it never mutates it, so
subscribers (MQTT bridge, journal, monitor) can keep a snapshot without copying.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, TypeAlias

Role: TypeAlias = Literal["user", "assistant", "system"]


class RealtimeStatus(StrEnum):
    """Connection status of the realtime session."""

    IDLE = "idle"
    CONNECTING = "connecting"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    ERROR = "error"


class RealtimeMode(StrEnum):
    """What the conversation is doing right now."""

    IDLE = "idle"
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"


@dataclass(frozen=True)
class TextPart:
    """Typed text (user input or a text-only answer)."""

    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True)
class AudioPart:
    """Spoken audio, represented by its transcript and length."""

    transcript: str
    duration_ms: int | None = None
    type: Literal["audio"] = "audio"


@dataclass(frozen=True)
class ToolCallPart:
    """A function call the model made, with the output harkd sent back."""

    id: str
    name: str
    arguments: str
    output: str | None = None
    type: Literal["tool_call"] = "tool_call"


@dataclass(frozen=True)
class ToolResultPart:
    """The result of a tool call, as given to the model."""

    tool_call_id: str
    content: str
    type: Literal["tool_result"] = "tool_result"


@dataclass(frozen=True)
class ImagePart:
    """An image sent into the conversation (base64 data or a URL)."""

    data: str
    mime_type: str
    type: Literal["image"] = "image"


def is_url(data: str) -> bool:
    """Whether image data is an http(s) URL: a reference, not the image itself."""
    return data.startswith(("http://", "https://"))


def is_data_url(data: str) -> bool:
    """Whether image data is a `data:` URL: inline, and naming its own media type."""
    return data.startswith("data:")


MessagePart: TypeAlias = TextPart | AudioPart | ToolCallPart | ToolResultPart | ImagePart


@dataclass(frozen=True)
class RealtimeMessage:
    """One message of the conversation, in conversation order."""

    id: str
    role: Role
    timestamp: float = field(default_factory=time.time)
    parts: tuple[MessagePart, ...] = ()
    interrupted: bool = False
    duration_ms: int | None = None

    @property
    def text(self) -> str:
        """All text and transcripts of the message, joined."""
        pieces: list[str] = []
        for part in self.parts:
            if isinstance(part, TextPart):
                pieces.append(part.text)
            elif isinstance(part, AudioPart):
                pieces.append(part.transcript)
        return " ".join(p for p in pieces if p)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (MQTT `B/message`, transcript journal)."""
        return {
            "id": self.id,
            "role": self.role,
            "timestamp": self.timestamp,
            "parts": [part_to_dict(p) for p in self.parts],
            "interrupted": self.interrupted,
            "duration_ms": self.duration_ms,
        }


def part_to_dict(part: MessagePart) -> dict[str, Any]:
    """JSON-able form of one part, `type` first."""
    data = {k: v for k, v in vars(part).items() if k != "type"}
    return {"type": part.type, **data}


@dataclass(frozen=True)
class AudioVisualization:
    """Levels and spectra of the microphone and the speaker, for meters and UIs.

    Levels are RMS in 0..1 of full scale; frequency bins are magnitudes in 0..1
    (low to high frequency); time-domain samples are floats in -1..1.
    """

    input_level: float = 0.0
    output_level: float = 0.0
    input_frequency_data: tuple[float, ...] = ()
    output_frequency_data: tuple[float, ...] = ()
    input_time_domain_data: tuple[float, ...] = ()
    output_time_domain_data: tuple[float, ...] = ()
    input_sample_rate: int = 0
    output_sample_rate: int = 0


class RealtimeError(Exception):
    """An error the client shows to its users: a code and a readable message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ts = time.time()

    def __repr__(self) -> str:
        return f"RealtimeError({self.code!r}, {self.message!r})"

    def to_dict(self) -> dict[str, Any]:
        """JSON form for `B/error`."""
        return {"code": self.code, "message": self.message, "ts": self.ts}


@dataclass(frozen=True)
class RealtimeToken:
    """A credential for one connection: a static key or an ephemeral client secret."""

    value: str
    expires_at: float | None = None

    def __repr__(self) -> str:  # never print the secret
        return f"RealtimeToken(value='***', expires_at={self.expires_at!r})"


@dataclass(frozen=True)
class RealtimeState:
    """A snapshot of everything a subscriber may show.

    `messages` is the recent conversation (the client keeps a bounded window of the
    newest messages); the transcript journal holds the whole history.
    """

    status: RealtimeStatus = RealtimeStatus.IDLE
    mode: RealtimeMode = RealtimeMode.IDLE
    messages: tuple[RealtimeMessage, ...] = ()
    error: RealtimeError | None = None
    pending_user_transcript: str | None = None
    pending_assistant_transcript: str | None = None
    mic_muted: bool = False
    volume: int = 100


# Events the client reports besides state: what MQTT and the journal publish once.


@dataclass(frozen=True)
class MessageFinalized:
    """A message is complete (transcript final, answer done or interrupted)."""

    message: RealtimeMessage


@dataclass(frozen=True)
class PartialTranscript:
    """The running text of a message still being spoken."""

    role: Literal["user", "assistant"]
    message_id: str
    text: str


@dataclass(frozen=True)
class ToolCallFinished:
    """A tool ran (or failed); what the model was told."""

    call_id: str
    name: str
    arguments: str
    output: Any = None
    error: str | None = None
    duration_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON form for `B/tool_call`."""
        data: dict[str, Any] = {
            "call_id": self.call_id,
            "name": self.name,
            "arguments": self.arguments,
            "duration_ms": round(self.duration_ms, 1),
        }
        if self.error is not None:
            data["error"] = self.error
        else:
            data["output"] = self.output
        return data


@dataclass(frozen=True)
class UsageReported:
    """Token usage of one finished response."""

    response_id: str
    status: str
    usage: Mapping[str, Any]


@dataclass(frozen=True)
class WakeHeard:
    """A wake word (or `cmd/listen`, word `command`) and whether this device answers."""

    word: str
    score: float
    level: float
    """The wake word's RMS, 0..1 of full scale (0 for a command)."""
    ts: float
    """Wall-clock time of the detection."""
    answered: bool
    """False: another device answers, or the turn was dropped (nothing said in time)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON form for `B/wake`."""
        return {
            "word": self.word,
            "score": self.score,
            "level": self.level,
            "ts": self.ts,
            "answered": self.answered,
        }


ClientEvent: TypeAlias = (
    MessageFinalized | PartialTranscript | ToolCallFinished | UsageReported | WakeHeard
)
