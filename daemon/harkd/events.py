"""Provider-neutral events: what adapters decode from the wire and what the session
core asks them to send. One vocabulary of frozen values, so the session state machine
never sees JSON and every adapter maps through one table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from harkd.tools import ToolSpec

VadMode: TypeAlias = Literal["server", "semantic", "manual"]
"""Who decides turns: the provider's VAD, its semantic VAD, or harkd (push-to-talk or
its own on-device VAD)."""

MIN_COMMIT_MS = 100
"""A turn with less audio (or speech) than this is discarded, never ended: providers
reject or mishear such scraps (OpenAI refuses commits under 100 ms)."""

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
    """Decoded PCM16 audio of an assistant item, in the adapter's output format."""

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
    error_code: str | None = None
    """Why a failed response failed, in the provider's words (None: not said)."""
    function_calls: tuple[FunctionCallDone, ...] = ()


@dataclass(frozen=True, slots=True)
class ItemTruncated:
    """The server cut an assistant item's audio at `audio_end_ms`."""

    item_id: str
    audio_end_ms: int


ErrorKind: TypeAlias = Literal["harmless", "auth", "busy", "empty_turn", "expired", "other"]
"""What a provider error means for the session, decided by the adapter's decoder:
`harmless` we raced the server (e.g. cancelled a response that had just ended);
`auth` the credential was refused; `busy` a response was requested while one is
active; `empty_turn` an ended turn held too little audio; `expired` the provider ended
the session at its time limit; `other` anything else."""


@dataclass(frozen=True, slots=True)
class ServerError:
    """An error the provider reported; `code` and `message` are its own words."""

    code: str
    message: str
    kind: ErrorKind = "other"
    type: str = "error"
    event_id: str | None = None
    param: str | None = None


@dataclass(frozen=True, slots=True)
class AudioDropped:
    """The connection could not take this much queued microphone audio and dropped it
    (reported by the transport, not the server): it never reached the provider."""

    pcm_bytes: int


@dataclass(frozen=True, slots=True)
class GoingAway:
    """The provider will close this connection soon: move to a new one before then,
    resuming with the newest `ResumeHandle` where the provider gives them."""

    time_left_ms: int | None
    """How long the connection has left; None: not said."""


@dataclass(frozen=True, slots=True)
class ResumeHandle:
    """A handle that resumes this session on a new connection; a newer one replaces it."""

    handle: str


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
    | GoingAway
    | ResumeHandle
    | Ignored
    | Unknown
)

# --- client -> server --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AppendAudio:
    """Microphone audio (PCM16 mono, in the adapter's input format) for the provider."""

    pcm: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class StartTurn:
    """harkd opened a turn (push-to-talk, its own VAD): the audio from here on is it."""


@dataclass(frozen=True, slots=True)
class EndTurn:
    """The open turn is over: its audio becomes a user item. It follows the turn's
    audio, never overtakes it."""


@dataclass(frozen=True, slots=True)
class DiscardTurn:
    """Forget the open turn's audio (too short, no speech): no user item, no answer."""


@dataclass(frozen=True, slots=True)
class RequestResponse:
    """Ask the model to answer now; `instructions` replace the session's for this one
    answer (where the provider has that: others have them as a system message too)."""

    instructions: str | None = None


@dataclass(frozen=True, slots=True)
class CancelResponse:
    """Stop the response being generated."""


@dataclass(frozen=True, slots=True)
class TruncateItem:
    """Cut an assistant item's audio at what the user really heard (sent only to
    providers that can truncate)."""

    item_id: str
    heard_ms: int


@dataclass(frozen=True, slots=True)
class CreateMessage:
    """Add a text and/or image message to the conversation."""

    item_id: str
    role: Literal["user", "assistant", "system"]
    text: str | None = None
    image_url: str | None = None


@dataclass(frozen=True, slots=True)
class ToolResult:
    """Give the model the result of one of its tool calls."""

    call_id: str
    name: str
    output: str
    """JSON text: the tool's output, or `{"error": ...}`."""


Command: TypeAlias = (
    AppendAudio
    | StartTurn
    | EndTurn
    | DiscardTurn
    | RequestResponse
    | CancelResponse
    | TruncateItem
    | CreateMessage
    | ToolResult
)


@dataclass(frozen=True)
class SessionSettings:
    """What a session is configured with; the adapter maps it to its wire shape."""

    instructions: str
    voice: str
    vad_mode: VadMode = "server"
    transcription_model: str | None = None
    tools: tuple[ToolSpec, ...] = ()
    interrupt_response: bool = True
    output_modalities: tuple[Literal["audio", "text"], ...] = ("audio",)
