"""Validate client events against xAI's Grok Voice Agent API, as its docs describe it.

xAI ships no SDK models for its realtime API, so its `session.update` is modelled here
from the documentation, strictly (an unknown key is an error, as a misspelling would be
ignored or refused by the real service): a flat session with `instructions`, `voice`,
`turn_detection` (`server_vad` or null), `audio.{input,output}.format`, `tools`. The
other events Grok takes have OpenAI's shape and are checked against the `openai`
models; an event type Grok does not document (`conversation.item.truncate`,
`conversation.item.delete`, ...) is refused.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from .validation import ClientEventInvalid, from_validation_error, validate_client_event

__all__ = ["GROK_CLIENT_EVENTS", "GROK_VOICES", "validate_grok_event"]

GROK_VOICES = frozenset({"eve", "ara", "rex", "sal", "leo"})
"""The built-in voices; the service takes them in any case."""

GROK_CLIENT_EVENTS = frozenset(
    {
        "session.update",
        "input_audio_buffer.append",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "conversation.item.create",
        "response.create",
        "response.cancel",
    }
)
"""The client events the Voice Agent API takes."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Pcm(_Strict):
    type: Literal["audio/pcm"]
    rate: Literal[8000, 16000, 22050, 24000, 32000, 44100, 48000] = 24000


class _G711(_Strict):
    type: Literal["audio/pcmu", "audio/pcma"]


_Format = Annotated[_Pcm | _G711, Field(discriminator="type")]


class _Transcription(_Strict):
    language_hint: str | None = None
    keyterms: list[str] | None = None


class _AudioInput(_Strict):
    format: _Format | None = None
    transcription: _Transcription | None = None


class _AudioOutput(_Strict):
    format: _Format | None = None
    speed: Annotated[float, Field(ge=0.7, le=1.5)] | None = None


class _Audio(_Strict):
    input: _AudioInput | None = None
    output: _AudioOutput | None = None


class _ServerVad(_Strict):
    type: Literal["server_vad"]
    threshold: Annotated[float, Field(ge=0.1, le=0.9)] | None = None
    prefix_padding_ms: Annotated[int, Field(ge=0, le=10_000)] | None = None
    silence_duration_ms: Annotated[int, Field(ge=0, le=10_000)] | None = None
    idle_timeout_ms: int | None = None


class _FunctionTool(_Strict):
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any]


class _WebSearch(_Strict):
    type: Literal["web_search"]


class _XSearch(_Strict):
    type: Literal["x_search"]
    allowed_x_handles: list[str] | None = None


_Tool = Annotated[_FunctionTool | _WebSearch | _XSearch, Field(discriminator="type")]


class _Session(_Strict):
    instructions: str | None = None
    voice: str | None = None
    turn_detection: _ServerVad | None = None
    audio: _Audio | None = None
    tools: list[_Tool] | None = None


class _SessionUpdate(_Strict):
    type: Literal["session.update"]
    event_id: str | None = None
    session: _Session


@functools.cache
def _session_update() -> TypeAdapter[_SessionUpdate]:
    return TypeAdapter(_SessionUpdate)


def validate_grok_event(event: Any) -> None:
    """Raise `ClientEventInvalid` if the Voice Agent API would refuse `event`."""
    if not isinstance(event, dict):
        raise ClientEventInvalid("Event must be a JSON object.", code="invalid_type")
    kind = event.get("type")
    if kind not in GROK_CLIENT_EVENTS:
        raise ClientEventInvalid(
            f"Invalid value: '{kind}'. Unknown client event type.", param="type"
        )
    if kind != "session.update":
        validate_client_event(event)
        return
    try:
        update = _session_update().validate_python(event)
    except ValidationError as exc:
        raise from_validation_error(exc, event) from exc
    voice = update.session.voice
    if voice is not None and voice.lower() not in GROK_VOICES:
        raise ClientEventInvalid(
            f"Invalid value: '{voice}'. Supported voices: {', '.join(sorted(GROK_VOICES))}.",
            param="session.voice",
        )
