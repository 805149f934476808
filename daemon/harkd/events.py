"""Provider-neutral events: what adapters decode from the wire and what the session
core asks them to send. One vocabulary of frozen values, so the session state machine
never sees JSON and every adapter maps through one table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

# --- server -> client ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionReady:
    """The provider's session exists (`session.created`)."""

    session_id: str


@dataclass(frozen=True, slots=True)
class SessionUpdated:
    """Our session configuration was accepted."""


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """Server VAD heard the user start speaking."""

    item_id: str
    audio_start_ms: int


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """Server VAD heard the user stop speaking."""

    item_id: str
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class InputCommitted:
    """The input audio buffer became a user item."""

    item_id: str
    previous_item_id: str | None


@dataclass(frozen=True, slots=True)
class InputCleared:
    """The input audio buffer was emptied."""


@dataclass(frozen=True, slots=True)
class ItemAdded:
    """A conversation item appeared (user audio/text, assistant message, call...)."""

    item_id: str
    kind: Literal["message", "function_call", "function_call_output", "other"]
    role: str | None
    previous_item_id: str | None = None
    text: str | None = None
    has_audio: bool = False


@dataclass(frozen=True, slots=True)
class UserTranscriptDelta:
    """A piece of the transcript of a user audio item."""

    item_id: str
    delta: str


@dataclass(frozen=True, slots=True)
class UserTranscriptDone:
    """The final transcript of a user audio item."""

    item_id: str
    transcript: str


@dataclass(frozen=True, slots=True)
class UserTranscriptFailed:
    """Transcribing a user audio item failed."""

    item_id: str
    message: str


@dataclass(frozen=True, slots=True)
class ResponseCreated:
    """The model started a response."""

    response_id: str


@dataclass(frozen=True, slots=True)
class OutputItemAdded:
    """A response produced a new item."""

    response_id: str
    item_id: str
    kind: Literal["message", "function_call", "other"]
    call_id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class AudioDelta:
    """Decoded PCM16 24 kHz audio of an assistant item."""

    response_id: str
    item_id: str
    pcm: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class AudioDone:
    """All audio of an assistant item has arrived."""

    response_id: str
    item_id: str


@dataclass(frozen=True, slots=True)
class AssistantTranscriptDelta:
    """A piece of the assistant's spoken (or written) text."""

    response_id: str
    item_id: str
    delta: str
    spoken: bool = True


@dataclass(frozen=True, slots=True)
class AssistantTranscriptDone:
    """The assistant's final text for an item."""

    response_id: str
    item_id: str
    text: str
    spoken: bool = True


@dataclass(frozen=True, slots=True)
class FunctionCallDone:
    """A function call's arguments are complete."""

    response_id: str
    item_id: str
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ResponseDone:
    """A response ended (completed, cancelled, failed, incomplete)."""

    response_id: str
    status: str
    usage: Mapping[str, Any] | None = None
    status_details: Mapping[str, Any] | None = None
    function_calls: tuple[FunctionCallDone, ...] = ()


@dataclass(frozen=True, slots=True)
class ItemTruncated:
    """The server cut an assistant item's audio at `audio_end_ms`."""

    item_id: str
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class ServerError:
    """An `error` event."""

    code: str
    message: str
    type: str = "error"
    event_id: str | None = None
    param: str | None = None


@dataclass(frozen=True, slots=True)
class AudioDropped:
    """The connection could not take this much queued microphone audio and dropped it
    (reported by the transport, not the server): it never reached the provider."""

    pcm_bytes: int


@dataclass(frozen=True, slots=True)
class Ignored:
    """A known event harkd does not need (rate limits, part added...)."""

    type: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """An event type no table knows; logged, never fatal."""

    type: str


ServerEvent: TypeAlias = (
    SessionReady
    | SessionUpdated
    | SpeechStarted
    | SpeechStopped
    | InputCommitted
    | InputCleared
    | ItemAdded
    | UserTranscriptDelta
    | UserTranscriptDone
    | UserTranscriptFailed
    | ResponseCreated
    | OutputItemAdded
    | AudioDelta
    | AudioDone
    | AssistantTranscriptDelta
    | AssistantTranscriptDone
    | FunctionCallDone
    | ResponseDone
    | ItemTruncated
    | ServerError
    | AudioDropped
    | Ignored
    | Unknown
)

# --- client -> server --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AppendAudio:
    """Append PCM16 24 kHz mono to the input buffer."""

    pcm: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class CommitAudio:
    """Turn the input buffer into a user item."""


@dataclass(frozen=True, slots=True)
class ClearAudio:
    """Empty the input buffer."""


@dataclass(frozen=True, slots=True)
class CreateResponse:
    """Ask the model to answer."""


@dataclass(frozen=True, slots=True)
class CancelResponse:
    """Stop the response being generated."""


@dataclass(frozen=True, slots=True)
class TruncateItem:
    """Cut an assistant item's audio at what the user really heard."""

    item_id: str
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class CreateMessage:
    """Add a text and/or image message to the conversation."""

    item_id: str
    role: Literal["user", "assistant", "system"]
    text: str | None = None
    image_url: str | None = None


@dataclass(frozen=True, slots=True)
class CreateFunctionOutput:
    """Give the model a function call's result."""

    call_id: str
    output: str


Command: TypeAlias = (
    AppendAudio
    | CommitAudio
    | ClearAudio
    | CreateResponse
    | CancelResponse
    | TruncateItem
    | CreateMessage
    | CreateFunctionOutput
)


@dataclass(frozen=True)
class SessionSettings:
    """What a session is configured with; the adapter maps it to its wire shape."""

    instructions: str
    voice: str
    vad_mode: Literal["server", "semantic", "manual"] = "server"
    transcription_model: str | None = None
    tools: tuple[Mapping[str, Any], ...] = ()
    interrupt_response: bool = True
    output_modalities: tuple[Literal["audio", "text"], ...] = ("audio",)
