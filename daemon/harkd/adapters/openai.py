"""OpenAI Realtime (GA) over WebSocket: the wire mapping and the transport.

Everything harkd sends is GA-shaped; decoding accepts the retired beta event names
as a fallback. Providers that speak these events with a few differences of their own
(xAI Grok, Azure OpenAI) reuse all of it through a `Dialect`. The transport keeps two
lanes so control commands (cancel, truncate, turn end, tool results) never wait behind
queued microphone audio.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

from harkd import events as ev
from harkd.adapters.base import (
    AudioFormat,
    AuthenticationFailed,
    ConnectionFailed,
    ConnectionLost,
    ProtocolError,
    ProviderTraits,
    serve_until_lost,
)
from harkd.audio.base import PROVIDER_RATE
from harkd.messages import RealtimeToken

log = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 15.0
CLOSE_TIMEOUT_S = 2.0
AUTH_CLOSE_CODES = {3000, 4001, 4003}
AUDIO_LANE_FRAMES = 250
"""Appends queued behind a slow socket before the oldest is dropped: ~5 s of 20 ms frames."""

TRAITS = ProviderTraits(
    input_format=AudioFormat(PROVIDER_RATE),  # audio/pcm is 24 kHz only
    output_format=AudioFormat(PROVIDER_RATE),
    server_turns=True,
    manual_turns=True,
    # After a commit it waits for response.create (server VAD answers by itself only
    # because session.update sets create_response).
    answers_by_itself=False,
    can_truncate=True,
    resume="replay",  # a session cannot be resumed: context is replayed as items
)
"""What OpenAI Realtime can do, as `OpenAIRealtimeAdapter.traits`."""

_INPUT_FORMAT = {"type": "audio/pcm", "rate": TRAITS.input_format.rate}
_OUTPUT_FORMAT = {"type": "audio/pcm", "rate": TRAITS.output_format.rate}

# --- encoding ---------------------------------------------------------------------


def session_update(settings: ev.SessionSettings) -> dict[str, Any]:
    """The GA `session.update` event for these settings."""
    turn_detection: dict[str, Any] | None = None
    if settings.vad_mode == "server":
        turn_detection = {
            "type": "server_vad",
            "create_response": True,
            "interrupt_response": settings.interrupt_response,
        }
    elif settings.vad_mode == "semantic":
        turn_detection = {
            "type": "semantic_vad",
            "create_response": True,
            "interrupt_response": settings.interrupt_response,
        }
    transcription = (
        {"model": settings.transcription_model} if settings.transcription_model else None
    )
    session: dict[str, Any] = {
        "type": "realtime",
        "output_modalities": list(settings.output_modalities),
        "instructions": settings.instructions,
        "audio": {
            "input": {
                "format": _INPUT_FORMAT,
                "transcription": transcription,
                "turn_detection": turn_detection,
            },
            "output": {"format": _OUTPUT_FORMAT, "voice": settings.voice},
        },
        "tools": function_tools(settings),
        "tool_choice": "auto",
    }
    return {"type": "session.update", "session": session}


def function_tools(settings: ev.SessionSettings) -> list[dict[str, Any]]:
    """The session's tools as Realtime `function` tools."""
    return [
        {
            "type": "function",
            "name": tool.name,
            "description": tool.description,
            "parameters": dict(tool.parameters),
        }
        for tool in settings.tools
    ]


def append_message(pcm: bytes) -> str:
    """`encode(AppendAudio(pcm))` as JSON text, written directly.

    It is sent 50 times a second, base64 never needs JSON escaping, and json.dumps
    was a fifth of harkd's own work per captured frame.
    """
    audio = base64.b64encode(pcm).decode("ascii")
    return f'{{"type":"input_audio_buffer.append","audio":"{audio}"}}'


def encode(command: ev.Command) -> dict[str, Any]:
    """A provider-neutral command as a GA client event."""
    match command:
        case ev.AppendAudio(pcm=pcm):
            return {
                "type": "input_audio_buffer.append",
                "audio": base64.b64encode(pcm).decode("ascii"),
            }
        case ev.StartTurn() | ev.DiscardTurn():
            # A turn starts with an empty buffer; a discarded one leaves it empty.
            return {"type": "input_audio_buffer.clear"}
        case ev.EndTurn():
            return {"type": "input_audio_buffer.commit"}
        case ev.RequestResponse(instructions=None):
            return {"type": "response.create"}
        case ev.RequestResponse(instructions=instructions):
            return {"type": "response.create", "response": {"instructions": instructions}}
        case ev.CancelResponse():
            return {"type": "response.cancel"}
        case ev.TruncateItem(item_id=item_id, heard_ms=heard_ms):
            return {
                "type": "conversation.item.truncate",
                "item_id": item_id,
                "content_index": 0,
                "audio_end_ms": heard_ms,
            }
        case ev.CreateMessage():
            return {"type": "conversation.item.create", "item": _message_item(command)}
        case ev.ToolResult(call_id=call_id, output=output):
            # The call id alone names the call here; the tool's name is not sent.
            item = {"type": "function_call_output", "call_id": call_id, "output": output}
            return {"type": "conversation.item.create", "item": item}
    raise TypeError(f"cannot encode {command!r}")


def _message_item(message: ev.CreateMessage) -> dict[str, Any]:
    text_type = "output_text" if message.role == "assistant" else "input_text"
    content: list[dict[str, Any]] = []
    if message.text is not None:
        content.append({"type": text_type, "text": message.text})
    if message.image_url is not None:
        content.append({"type": "input_image", "image_url": message.image_url})
    return {"id": message.item_id, "type": "message", "role": message.role, "content": content}


# --- decoding ---------------------------------------------------------------------


class _Fields:
    """Typed access to one server event (or a nested object of it).

    The server is trusted to speak the protocol, but not blindly: a field of the wrong
    type is a protocol error, raised here, instead of a crash deep in the session.
    """

    __slots__ = ("_data", "_kind")

    def __init__(self, kind: str, data: object) -> None:
        if not isinstance(data, Mapping):
            raise ProtocolError(f"{kind}: expected an object, got {type(data).__name__}")
        self._kind = kind
        self._data: Mapping[str, Any] = data

    def _bad(self, key: str, expected: str) -> ProtocolError:
        found = type(self._data.get(key)).__name__
        return ProtocolError(
            f"malformed {self._kind} event: {key}: expected {expected}, got {found}"
        )

    def text(self, key: str, default: str | None = None) -> str:
        value = self._data.get(key, default)
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def opt_text(self, key: str) -> str | None:
        value = self._data.get(key)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "a string or null")
        return value

    def number(self, key: str, default: int = 0) -> int:
        value = self._data.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, "a number")
        return int(value)

    def obj(self, key: str) -> _Fields:
        """A nested object; missing or null reads as empty."""
        value = self._data.get(key)
        return _Fields(f"{self._kind}.{key}", {} if value is None else value)

    def opt_mapping(self, key: str) -> Mapping[str, Any] | None:
        value = self._data.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise self._bad(key, "an object or null")
        return value

    def objs(self, key: str) -> list[_Fields]:
        """A list of objects; missing or null reads as empty."""
        value = self._data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self._bad(key, "a list")
        return [_Fields(f"{self._kind}.{key}[]", v) for v in value]

    def has(self, key: str) -> bool:
        return self._data.get(key) is not None


_ITEM_KINDS: dict[str, Literal["message", "function_call", "function_call_output"]] = {
    "message": "message",
    "function_call": "function_call",
    "function_call_output": "function_call_output",
}


def _item_added(d: _Fields) -> ev.ServerEvent:
    item = d.obj("item")
    content = item.objs("content")
    texts = [c.opt_text("text") for c in content if c.opt_text("type") in ("input_text", "text")]
    return ev.ItemAdded(
        item_id=item.text("id", ""),
        kind=_ITEM_KINDS.get(item.opt_text("type") or "", "other"),
        role=item.opt_text("role"),
        previous_item_id=d.opt_text("previous_item_id"),
        text=" ".join(t for t in texts if t) or None,
        has_audio=any(c.opt_text("type") in ("input_audio", "audio") for c in content),
    )


def _output_item_added(d: _Fields) -> ev.ServerEvent:
    item = d.obj("item")
    kind = item.opt_text("type")
    return ev.OutputItemAdded(
        response_id=d.text("response_id", ""),
        item_id=item.text("id", ""),
        kind="message"
        if kind == "message"
        else "function_call"
        if kind == "function_call"
        else "other",
        call_id=item.opt_text("call_id"),
        name=item.opt_text("name"),
    )


def _response_done(d: _Fields) -> ev.ServerEvent:
    response = d.obj("response")
    response_id = response.text("id", "")
    calls = tuple(
        ev.FunctionCallDone(
            response_id=response_id,
            item_id=item.text("id", ""),
            call_id=item.text("call_id", ""),
            name=item.text("name", ""),
            arguments=item.opt_text("arguments") or "{}",
        )
        for item in response.objs("output")
        if item.opt_text("type") == "function_call"
    )
    return ev.ResponseDone(
        response_id=response_id,
        status=response.text("status", "completed"),
        usage=response.opt_mapping("usage"),
        error_code=_failure_code(response.opt_mapping("status_details")),
        function_calls=calls,
    )


def _failure_code(details: Mapping[str, Any] | None) -> str | None:
    """`status_details.error.code` of a failed response, where the server says it."""
    error = (details or {}).get("error")
    if not isinstance(error, Mapping):
        return None
    code = error.get("code")
    return None if code is None else str(code)


_ERROR_KINDS: dict[str, ev.ErrorKind] = {
    "response_cancel_not_active": "harmless",
    "invalid_api_key": "auth",
    "conversation_already_has_active_response": "busy",
    "input_audio_buffer_commit_empty": "empty_turn",
    "session_expired": "expired",
}
"""What the error codes the session acts on mean; any other code is `other`."""


def _error(d: _Fields) -> ev.ServerEvent:
    error = d.obj("error")
    code = error.opt_text("code") or error.opt_text("type") or "error"
    return ev.ServerError(
        code=code,
        message=error.text("message", ""),
        kind=_ERROR_KINDS.get(code, "other"),
        type=error.text("type", "error"),
        event_id=error.opt_text("event_id"),
        param=error.opt_text("param"),
    )


def _audio_delta(d: _Fields) -> ev.ServerEvent:
    try:
        pcm = base64.b64decode(d.text("delta"), validate=True)
    except ValueError as exc:  # binascii.Error, or text that is not even ASCII
        raise ProtocolError(f"malformed audio delta: {exc}") from None
    return ev.AudioDelta(d.text("response_id"), d.text("item_id"), pcm)


def _transcript_delta(spoken: bool) -> Callable[[_Fields], ev.ServerEvent]:
    def decode(d: _Fields) -> ev.ServerEvent:
        return ev.AssistantTranscriptDelta(
            d.text("response_id"), d.text("item_id"), d.text("delta"), spoken
        )

    return decode


def _transcript_done(key: str, spoken: bool) -> Callable[[_Fields], ev.ServerEvent]:
    def decode(d: _Fields) -> ev.ServerEvent:
        text = d.opt_text(key) or ""
        return ev.AssistantTranscriptDone(d.text("response_id"), d.text("item_id"), text, spoken)

    return decode


_DECODERS: dict[str, Callable[[_Fields], ev.ServerEvent]] = {
    "session.created": lambda d: ev.SessionReady(d.obj("session").text("id", "")),
    "session.updated": lambda d: ev.SessionUpdated(),
    "input_audio_buffer.speech_started": lambda d: ev.SpeechStarted(
        d.text("item_id"), d.number("audio_start_ms")
    ),
    "input_audio_buffer.speech_stopped": lambda d: ev.SpeechStopped(
        d.text("item_id"), d.number("audio_end_ms")
    ),
    "input_audio_buffer.committed": lambda d: ev.InputCommitted(
        d.text("item_id"), d.opt_text("previous_item_id")
    ),
    "input_audio_buffer.cleared": lambda d: ev.InputCleared(),
    "conversation.item.added": _item_added,
    "conversation.item.created": _item_added,  # beta name
    "conversation.item.input_audio_transcription.delta": lambda d: ev.UserTranscriptDelta(
        d.text("item_id"), d.text("delta", "")
    ),
    "conversation.item.input_audio_transcription.completed": lambda d: ev.UserTranscriptDone(
        d.text("item_id"), d.text("transcript", "")
    ),
    "conversation.item.input_audio_transcription.failed": lambda d: ev.UserTranscriptFailed(
        d.text("item_id"), d.obj("error").text("message", "failed")
    ),
    "conversation.item.truncated": lambda d: ev.ItemTruncated(
        d.text("item_id"), d.number("audio_end_ms")
    ),
    "response.created": lambda d: ev.ResponseCreated(d.obj("response").text("id", "")),
    "response.output_item.added": _output_item_added,
    "response.output_audio.delta": _audio_delta,
    "response.audio.delta": _audio_delta,  # beta name
    "response.output_audio.done": lambda d: ev.AudioDone(d.text("response_id"), d.text("item_id")),
    "response.audio.done": lambda d: ev.AudioDone(d.text("response_id"), d.text("item_id")),
    "response.output_audio_transcript.delta": _transcript_delta(spoken=True),
    "response.audio_transcript.delta": _transcript_delta(spoken=True),
    "response.output_audio_transcript.done": _transcript_done("transcript", spoken=True),
    "response.audio_transcript.done": _transcript_done("transcript", spoken=True),
    "response.output_text.delta": _transcript_delta(spoken=False),
    "response.text.delta": _transcript_delta(spoken=False),
    "response.output_text.done": _transcript_done("text", spoken=False),
    "response.text.done": _transcript_done("text", spoken=False),
    "response.function_call_arguments.done": lambda d: ev.FunctionCallDone(
        d.text("response_id"),
        d.text("item_id"),
        d.text("call_id"),
        d.text("name", ""),
        d.text("arguments", ""),
    ),
    "response.done": _response_done,
    "error": _error,
}

_IGNORED = frozenset(
    {
        "rate_limits.updated",
        "conversation.item.done",
        "conversation.item.deleted",
        "conversation.item.retrieved",
        "conversation.item.input_audio_transcription.segment",
        "input_audio_buffer.timeout_triggered",
        "response.output_item.done",
        "response.content_part.added",
        "response.content_part.done",
        "response.function_call_arguments.delta",
        "output_audio_buffer.started",
        "output_audio_buffer.stopped",
        "output_audio_buffer.cleared",
        "conversation.created",
        "ping",  # xAI's keep-alive
    }
)


def decode(data: object) -> ev.ServerEvent:
    """One server event (parsed JSON) as a provider-neutral event.

    An unknown event type is a value (the protocol grows); anything that is not an
    event object, or a known event with missing or mistyped fields, raises
    `ProtocolError`, which ends the connection like a drop.
    """
    if not isinstance(data, Mapping):
        raise ProtocolError(f"server sent a JSON {type(data).__name__}, not an event object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("server event without a type")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        return ev.Ignored(kind) if kind in _IGNORED else ev.Unknown(kind)
    return decoder(_Fields(kind, data))


def parse(message: str | bytes) -> ev.ServerEvent:
    """One websocket message as an event; the realtime API sends only JSON text."""
    if isinstance(message, bytes):
        raise ProtocolError(f"server sent a binary frame ({len(message)} bytes)")
    try:
        data = json.loads(message)
    except ValueError as exc:
        raise ProtocolError(f"server sent a frame that is not JSON: {exc}") from None
    return decode(data)


# --- transport --------------------------------------------------------------------


def realtime_url(url: str, model: str) -> str:
    """The endpoint URL with `?model=` added."""
    joiner = "&" if urlsplit(url).query else "?"
    return f"{url}{joiner}{urlencode({'model': model})}"


def bearer_auth(token: RealtimeToken) -> dict[str, str]:
    """OpenAI's handshake credential: `Authorization: Bearer KEY`."""
    return {"Authorization": f"Bearer {token.value}"}


@dataclass(frozen=True)
class Dialect:
    """How a provider that speaks the OpenAI Realtime events differs from OpenAI itself.

    Everything else (the commands' encoding, decoding, the two-lane transport, error
    handling) is shared: a provider declares only these.
    """

    name: str
    """The adapter's name (`RealtimeAdapter.name`)."""
    traits: ProviderTraits
    """What the provider can do."""
    session_update: Callable[[ev.SessionSettings], dict[str, Any]]
    """Settings -> its `session.update` event."""
    auth_headers: Callable[[RealtimeToken], dict[str, str]] = bearer_auth
    """Credential -> the handshake's headers."""


OPENAI = Dialect("openai", TRAITS, session_update)
"""OpenAI Realtime GA itself."""


class OpenAIRealtimeAdapter:
    """Opens OpenAI Realtime sessions over WebSocket (or those of a provider speaking
    its events, described by a `Dialect`)."""

    name = OPENAI.name
    traits = OPENAI.traits

    def __init__(
        self,
        model: str = "gpt-realtime",
        url: str = "wss://api.openai.com/v1/realtime",
        *,
        ping_interval_s: float = 20.0,
        ping_timeout_s: float = 20.0,
        dialect: Dialect = OPENAI,
    ) -> None:
        self.model = model
        self.url = url
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.dialect = dialect
        self.name = dialect.name
        self.traits = dialect.traits

    async def connect(
        self, token: RealtimeToken, settings: ev.SessionSettings, resume_handle: str | None = None
    ) -> OpenAIConnection:
        """Open a session, configure it, and wait until the provider accepted it.

        OpenAI sessions cannot be resumed (`traits.resume` is "replay"): a
        `resume_handle` never comes from this adapter and is ignored.
        """
        try:
            ws = await websockets.connect(
                realtime_url(self.url, self.model),
                additional_headers=self.dialect.auth_headers(token),
                max_size=None,
                ping_interval=self.ping_interval_s,
                ping_timeout=self.ping_timeout_s,
                open_timeout=SETUP_TIMEOUT_S,
                # After a ping timeout the peer is gone: don't wait websockets' default
                # 10 s for a closing handshake that cannot come.
                close_timeout=CLOSE_TIMEOUT_S,
                compression=None,  # audio does not compress; deflate only costs CPU
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AuthenticationFailed(f"authentication failed (HTTP {status})") from None
            raise ConnectionFailed(f"handshake refused (HTTP {status})") from None
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            raise ConnectionFailed(f"cannot connect: {exc}") from None
        connection = OpenAIConnection(ws, self.dialect)
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                await connection.setup(settings)
        except BaseException:
            await connection.close()
            raise
        return connection


def openai_realtime(
    model: str = "gpt-realtime",
    url: str = "wss://api.openai.com/v1/realtime",
    *,
    ping_interval_s: float = 20.0,
    ping_timeout_s: float = 20.0,
) -> OpenAIRealtimeAdapter:
    """The OpenAI adapter (named like the reference's `openaiRealtime()`)."""
    return OpenAIRealtimeAdapter(
        model, url, ping_interval_s=ping_interval_s, ping_timeout_s=ping_timeout_s
    )


class OpenAIConnection:
    """One open OpenAI Realtime session."""

    def __init__(self, ws: ClientConnection, dialect: Dialect = OPENAI) -> None:
        self._ws = ws
        self._dialect = dialect
        self._control: deque[str] = deque()
        # Audio waiting for the socket, with each message's PCM length. Bounded: a
        # connection that cannot keep up loses its oldest audio, and says so.
        self._audio: deque[tuple[str, int]] = deque()
        self._wakeup = asyncio.Event()
        self._ids = itertools.count(1)
        self._early: list[ev.ServerEvent] = []
        self._on_event: Callable[[ev.ServerEvent], None] | None = None
        self._dropped_bytes = 0
        self._drop_report_scheduled = False
        self._drop_log = DropLog()

    async def setup(self, settings: ev.SessionSettings) -> None:
        """`session.created`, then our `session.update`, until `session.updated`."""
        try:
            await self._ws.send(json.dumps(self._stamp(self._dialect.session_update(settings))))
            await self._await_updated()
        except ConnectionClosed as exc:
            raise _as_failure(_lost(exc)) from None
        except ConnectionLost as exc:
            raise _as_failure(exc) from None

    async def _await_updated(self) -> None:
        while True:
            event = parse(await self._receive())
            if isinstance(event, ev.SessionUpdated):
                return
            if isinstance(event, ev.ServerError):
                if event.kind == "auth":
                    raise AuthenticationFailed(event.message or "invalid API key")
                raise ConnectionFailed(f"session rejected: {event.code}: {event.message}")
            if not isinstance(event, ev.SessionReady | ev.Ignored):
                self._early.append(event)

    async def _receive(self) -> str | bytes:
        try:
            return await self._ws.recv()
        except ConnectionClosed as exc:
            raise _lost(exc) from None

    def send(self, command: ev.Command) -> None:
        """Queue a command; appends go to the audio lane, the rest overtake them
        (except a turn's end, which follows the audio it commits)."""
        if isinstance(command, ev.AppendAudio):
            if len(self._audio) >= AUDIO_LANE_FRAMES:
                self._drop_oldest_audio()
            self._audio.append((append_message(command.pcm), len(command.pcm)))
        else:
            if isinstance(command, ev.EndTurn):
                # A commit must not overtake its turn's own audio.
                self._control.extend(message for message, _ in self._audio)
                self._audio.clear()
            elif isinstance(command, ev.StartTurn | ev.DiscardTurn):
                # Queued audio would be cleared anyway; sent after the clear, it would
                # leak into the next turn's buffer.
                self._audio.clear()
            self._control.append(json.dumps(self._stamp(encode(command))))
        self._wakeup.set()

    def _drop_oldest_audio(self) -> None:
        _, pcm_bytes = self._audio.popleft()
        self._dropped_bytes += pcm_bytes
        self._drop_log.dropped(pcm_bytes / self._dialect.traits.input_format.bytes_per_ms)
        if not self._drop_report_scheduled:
            # Told to the session after this send returns, not from inside it.
            self._drop_report_scheduled = True
            asyncio.get_running_loop().call_soon(self._report_drops)

    def _report_drops(self) -> None:
        self._drop_report_scheduled = False
        dropped, self._dropped_bytes = self._dropped_bytes, 0
        if dropped and self._on_event is not None:
            self._on_event(ev.AudioDropped(dropped))

    async def send_audio(self, pcm: bytes) -> None:
        """Send an append now when nothing is queued ahead of it, else queue it.

        Capture awaits this once per period: the common case writes straight to the
        socket instead of waking the writer task, which costs a loop pass per frame.
        Only a full socket buffer makes it wait; behind it the audio lane is bounded
        and drops its oldest frames rather than queueing audio without bound.
        """
        if self._control or self._audio or self._ws.state is not State.OPEN:
            # A closing socket would hold the sender until the close completes.
            self.send(ev.AppendAudio(pcm))
            return
        with contextlib.suppress(ConnectionClosed):  # the reader reports the close
            await self._ws.send(append_message(pcm))

    def update_session(self, settings: ev.SessionSettings) -> None:
        """Send a new `session.update` (instructions, tools) on the open session."""
        self._control.append(json.dumps(self._stamp(self._dialect.session_update(settings))))
        self._wakeup.set()

    def _stamp(self, event: dict[str, Any]) -> dict[str, Any]:
        # event_id is echoed in errors: lets the log say which command failed.
        return {"event_id": f"evt_hk{next(self._ids)}", **event}

    async def serve(self, on_event: Callable[[ev.ServerEvent], None]) -> None:
        """Deliver events until the connection ends.

        Always ends by raising one exception, never a group: `ConnectionLost` (a close,
        a drop, a ping timeout, a `ProtocolError`), `AuthenticationFailed` when the
        server closed because of the credential, or whatever `on_event` raised.
        """
        self._on_event = on_event
        for event in self._early:
            on_event(event)
        self._early.clear()
        await serve_until_lost(self._read(on_event), self._write())

    async def _read(self, on_event: Callable[[ev.ServerEvent], None]) -> None:
        while True:
            event = parse(await self._receive())
            if isinstance(event, ev.Unknown):
                log.debug("unknown server event %s", event.type)
            on_event(event)

    async def _write(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._control or self._audio:
                    message = self._control.popleft() if self._control else self._audio.popleft()[0]
                    await self._ws.send(message)
        except ConnectionClosed as exc:
            raise _lost(exc) from None

    async def close(self) -> None:
        """Close the websocket cleanly (bounded wait)."""
        await self._ws.close()


class DropLog:
    """Logs audio the connection could not take, at most once per `interval_s`."""

    def __init__(self, interval_s: float = 10.0) -> None:
        self.interval_s = interval_s
        self.total_ms = 0.0
        self._unlogged_ms = 0.0
        self._last_log = -interval_s

    def dropped(self, ms: float) -> None:
        """Count `ms` of dropped audio; log the running figure when due."""
        self.total_ms += ms
        self._unlogged_ms += ms
        now = time.monotonic()
        if now - self._last_log >= self.interval_s:
            log.warning(
                "the connection cannot keep up: %.0f ms of microphone audio dropped "
                "(%.0f ms in all on this connection)",
                self._unlogged_ms,
                self.total_ms,
            )
            self._unlogged_ms = 0.0
            self._last_log = now


def _lost(exc: ConnectionClosed) -> ConnectionFailed | ConnectionLost:
    close = exc.rcvd
    code = close.code if close else None
    reason = close.reason if close else "connection dropped"
    if code in AUTH_CLOSE_CODES or "invalid_api_key" in reason:
        return AuthenticationFailed(reason or "authentication failed")
    return ConnectionLost(code, reason or "connection dropped")


def _as_failure(exc: ConnectionFailed | ConnectionLost) -> ConnectionFailed:
    """A close during setup is a failed attempt, not a lost session."""
    return exc if isinstance(exc, ConnectionFailed) else ConnectionFailed(str(exc))
