"""OpenAI Realtime (GA) over WebSocket: the wire mapping and the transport.

Everything harkd sends is GA-shaped; decoding accepts the retired beta event names
as a fallback. The transport keeps two lanes so control commands (cancel, truncate,
commit, tool outputs) never wait behind queued microphone audio.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

import websockets
from harkd import events as ev
from harkd.adapters.base import AuthenticationFailed, ConnectionFailed, ConnectionLost
from harkd.audio.base import PROVIDER_RATE
from harkd.messages import RealtimeToken
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

log = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 15.0
AUTH_CLOSE_CODES = {3000, 4001, 4003}
_PCM_FORMAT = {"type": "audio/pcm", "rate": PROVIDER_RATE}

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
                "format": _PCM_FORMAT,
                "transcription": transcription,
                "turn_detection": turn_detection,
            },
            "output": {"format": _PCM_FORMAT, "voice": settings.voice},
        },
        "tools": [dict(t) for t in settings.tools],
        "tool_choice": "auto",
    }
    return {"type": "session.update", "session": session}


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
        case ev.CommitAudio():
            return {"type": "input_audio_buffer.commit"}
        case ev.ClearAudio():
            return {"type": "input_audio_buffer.clear"}
        case ev.CreateResponse():
            return {"type": "response.create"}
        case ev.CancelResponse():
            return {"type": "response.cancel"}
        case ev.TruncateItem(item_id=item_id, audio_end_ms=end_ms):
            return {
                "type": "conversation.item.truncate",
                "item_id": item_id,
                "content_index": 0,
                "audio_end_ms": end_ms,
            }
        case ev.CreateMessage():
            return {"type": "conversation.item.create", "item": _message_item(command)}
        case ev.CreateFunctionOutput(call_id=call_id, output=output):
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


def _item_added(data: Mapping[str, Any]) -> ev.ServerEvent:
    item = data.get("item") or {}
    kind = item.get("type")
    content = item.get("content") or []
    texts = [c.get("text") for c in content if c.get("type") in ("input_text", "text")]
    return ev.ItemAdded(
        item_id=item.get("id", ""),
        kind=kind if kind in ("message", "function_call", "function_call_output") else "other",
        role=item.get("role"),
        previous_item_id=data.get("previous_item_id"),
        text=" ".join(t for t in texts if t) or None,
        has_audio=any(c.get("type") in ("input_audio", "audio") for c in content),
    )


def _output_item_added(data: Mapping[str, Any]) -> ev.ServerEvent:
    item = data.get("item") or {}
    kind = item.get("type")
    return ev.OutputItemAdded(
        response_id=data.get("response_id", ""),
        item_id=item.get("id", ""),
        kind=kind if kind in ("message", "function_call") else "other",
        call_id=item.get("call_id"),
        name=item.get("name"),
    )


def _response_done(data: Mapping[str, Any]) -> ev.ServerEvent:
    response = data.get("response") or {}
    calls = tuple(
        ev.FunctionCallDone(
            response_id=response.get("id", ""),
            item_id=item.get("id", ""),
            call_id=item.get("call_id", ""),
            name=item.get("name", ""),
            arguments=item.get("arguments") or "{}",
        )
        for item in response.get("output") or []
        if item.get("type") == "function_call"
    )
    return ev.ResponseDone(
        response_id=response.get("id", ""),
        status=response.get("status", "completed"),
        usage=response.get("usage"),
        status_details=response.get("status_details"),
        function_calls=calls,
    )


def _error(data: Mapping[str, Any]) -> ev.ServerEvent:
    error = data.get("error") or {}
    return ev.ServerError(
        code=str(error.get("code") or error.get("type") or "error"),
        message=str(error.get("message", "")),
        type=str(error.get("type", "error")),
        event_id=error.get("event_id"),
        param=error.get("param"),
    )


def _transcript_delta(spoken: bool) -> Callable[[Mapping[str, Any]], ev.ServerEvent]:
    def decode(d: Mapping[str, Any]) -> ev.ServerEvent:
        return ev.AssistantTranscriptDelta(d["response_id"], d["item_id"], d["delta"], spoken)

    return decode


def _transcript_done(key: str, spoken: bool) -> Callable[[Mapping[str, Any]], ev.ServerEvent]:
    def decode(d: Mapping[str, Any]) -> ev.ServerEvent:
        return ev.AssistantTranscriptDone(d["response_id"], d["item_id"], d.get(key) or "", spoken)

    return decode


def _audio_delta(d: Mapping[str, Any]) -> ev.ServerEvent:
    return ev.AudioDelta(d["response_id"], d["item_id"], base64.b64decode(d["delta"]))


_DECODERS: dict[str, Callable[[Mapping[str, Any]], ev.ServerEvent]] = {
    "session.created": lambda d: ev.SessionReady((d.get("session") or {}).get("id", "")),
    "session.updated": lambda d: ev.SessionUpdated(),
    "input_audio_buffer.speech_started": lambda d: ev.SpeechStarted(
        d["item_id"], int(d.get("audio_start_ms", 0))
    ),
    "input_audio_buffer.speech_stopped": lambda d: ev.SpeechStopped(
        d["item_id"], int(d.get("audio_end_ms", 0))
    ),
    "input_audio_buffer.committed": lambda d: ev.InputCommitted(
        d["item_id"], d.get("previous_item_id")
    ),
    "input_audio_buffer.cleared": lambda d: ev.InputCleared(),
    "conversation.item.added": _item_added,
    "conversation.item.created": _item_added,  # beta name
    "conversation.item.input_audio_transcription.delta": lambda d: ev.UserTranscriptDelta(
        d["item_id"], d.get("delta", "")
    ),
    "conversation.item.input_audio_transcription.completed": lambda d: ev.UserTranscriptDone(
        d["item_id"], d.get("transcript", "")
    ),
    "conversation.item.input_audio_transcription.failed": lambda d: ev.UserTranscriptFailed(
        d["item_id"], str((d.get("error") or {}).get("message", "failed"))
    ),
    "conversation.item.truncated": lambda d: ev.ItemTruncated(
        d["item_id"], int(d.get("audio_end_ms", 0))
    ),
    "response.created": lambda d: ev.ResponseCreated((d.get("response") or {}).get("id", "")),
    "response.output_item.added": _output_item_added,
    "response.output_audio.delta": _audio_delta,
    "response.audio.delta": _audio_delta,  # beta name
    "response.output_audio.done": lambda d: ev.AudioDone(d["response_id"], d["item_id"]),
    "response.audio.done": lambda d: ev.AudioDone(d["response_id"], d["item_id"]),
    "response.output_audio_transcript.delta": _transcript_delta(spoken=True),
    "response.audio_transcript.delta": _transcript_delta(spoken=True),
    "response.output_audio_transcript.done": _transcript_done("transcript", spoken=True),
    "response.audio_transcript.done": _transcript_done("transcript", spoken=True),
    "response.output_text.delta": _transcript_delta(spoken=False),
    "response.text.delta": _transcript_delta(spoken=False),
    "response.output_text.done": _transcript_done("text", spoken=False),
    "response.text.done": _transcript_done("text", spoken=False),
    "response.function_call_arguments.done": lambda d: ev.FunctionCallDone(
        d["response_id"], d["item_id"], d["call_id"], d.get("name", ""), d.get("arguments", "")
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
    }
)


def decode(data: Mapping[str, Any]) -> ev.ServerEvent:
    """One server event (parsed JSON) as a provider-neutral event."""
    kind = str(data.get("type", ""))
    decoder = _DECODERS.get(kind)
    if decoder is None:
        return ev.Ignored(kind) if kind in _IGNORED else ev.Unknown(kind)
    try:
        return decoder(data)
    except (KeyError, TypeError, ValueError) as exc:
        log.warning("malformed %s event: %s", kind, exc)
        return ev.Unknown(kind)


# --- transport --------------------------------------------------------------------


def realtime_url(url: str, model: str) -> str:
    """The endpoint URL with `?model=` added."""
    joiner = "&" if urlsplit(url).query else "?"
    return f"{url}{joiner}{urlencode({'model': model})}"


class OpenAIRealtimeAdapter:
    """Opens OpenAI Realtime sessions over WebSocket."""

    name = "openai"

    def __init__(
        self,
        model: str = "gpt-realtime",
        url: str = "wss://api.openai.com/v1/realtime",
        *,
        ping_interval_s: float = 20.0,
        ping_timeout_s: float = 20.0,
    ) -> None:
        self.model = model
        self.url = url
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s

    async def connect(self, token: RealtimeToken, settings: ev.SessionSettings) -> OpenAIConnection:
        """Open a session, configure it, and wait until the provider accepted it."""
        try:
            ws = await websockets.connect(
                realtime_url(self.url, self.model),
                additional_headers={"Authorization": f"Bearer {token.value}"},
                max_size=None,
                ping_interval=self.ping_interval_s,
                ping_timeout=self.ping_timeout_s,
                open_timeout=SETUP_TIMEOUT_S,
                compression=None,  # audio does not compress; deflate only costs CPU
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AuthenticationFailed(f"authentication failed (HTTP {status})") from None
            raise ConnectionFailed(f"handshake refused (HTTP {status})") from None
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            raise ConnectionFailed(f"cannot connect: {exc}") from None
        connection = OpenAIConnection(ws)
        try:
            await asyncio.wait_for(connection.setup(settings), SETUP_TIMEOUT_S)
        except BaseException:
            await connection.close()
            raise
        return connection


def openai_realtime(
    model: str = "gpt-realtime", url: str = "wss://api.openai.com/v1/realtime", **options: float
) -> OpenAIRealtimeAdapter:
    """The OpenAI adapter (named like the reference's `openaiRealtime()`)."""
    return OpenAIRealtimeAdapter(model, url, **options)


class OpenAIConnection:
    """One open OpenAI Realtime session."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._control: deque[str] = deque()
        self._audio: deque[str] = deque(maxlen=250)  # ~5 s of 20 ms frames
        self._wakeup = asyncio.Event()
        self._ids = itertools.count(1)
        self._early: list[ev.ServerEvent] = []

    async def setup(self, settings: ev.SessionSettings) -> None:
        """`session.created`, then our `session.update`, until `session.updated`."""
        try:
            await self._ws.send(json.dumps(self._stamp(session_update(settings))))
            await self._await_updated()
        except ConnectionClosed as exc:
            raise _as_failure(_lost(exc)) from None
        except ConnectionLost as exc:
            raise _as_failure(exc) from None

    async def _await_updated(self) -> None:
        while True:
            event = decode(await self._receive())
            if isinstance(event, ev.SessionUpdated):
                return
            if isinstance(event, ev.ServerError):
                if event.code == "invalid_api_key":
                    raise AuthenticationFailed(event.message or "invalid API key")
                raise ConnectionFailed(f"session rejected: {event.code}: {event.message}")
            if not isinstance(event, ev.SessionReady | ev.Ignored):
                self._early.append(event)

    async def _receive(self) -> dict[str, Any]:
        try:
            message = await self._ws.recv()
        except ConnectionClosed as exc:
            raise _lost(exc) from None
        data = json.loads(message)
        if not isinstance(data, dict):
            raise ConnectionFailed("server sent a non-object event")
        return data

    def send(self, command: ev.Command) -> None:
        """Queue a command; appends go to the audio lane, the rest overtake them
        (except a commit, which follows the audio it commits)."""
        if isinstance(command, ev.AppendAudio):
            self._audio.append(append_message(command.pcm))
        else:
            if isinstance(command, ev.CommitAudio):
                # A commit must not overtake its turn's own audio.
                self._control.extend(self._audio)
                self._audio.clear()
            elif isinstance(command, ev.ClearAudio):
                # Queued audio would be cleared anyway; sent after the clear, it would
                # leak into the next turn's buffer.
                self._audio.clear()
            self._control.append(json.dumps(self._stamp(encode(command))))
        self._wakeup.set()

    async def send_audio(self, pcm: bytes) -> None:
        """Send an append now when nothing is queued ahead of it, else queue it.

        Capture awaits this once per period: the common case writes straight to the
        socket instead of waking the writer task, which costs a loop pass per frame.
        Only a full socket buffer makes it wait; capture then drops its oldest frames
        rather than queueing audio without bound.
        """
        if self._control or self._audio or self._ws.state is not State.OPEN:
            # A closing socket would hold the sender until the close completes.
            self.send(ev.AppendAudio(pcm))
            return
        with contextlib.suppress(ConnectionClosed):  # the reader reports the close
            await self._ws.send(append_message(pcm))

    def update_session(self, settings: ev.SessionSettings) -> None:
        """Send a new `session.update` (instructions, tools) on the open session."""
        self._control.append(json.dumps(self._stamp(session_update(settings))))
        self._wakeup.set()

    def _stamp(self, event: dict[str, Any]) -> dict[str, Any]:
        # event_id is echoed in errors: lets the log say which command failed.
        return {"event_id": f"evt_hk{next(self._ids)}", **event}

    async def serve(self, on_event: Callable[[ev.ServerEvent], None]) -> None:
        """Deliver events until the connection ends.

        Always ends by raising: `ConnectionLost`, or `AuthenticationFailed` when the
        server closed because of the credential.
        """
        for event in self._early:
            on_event(event)
        self._early.clear()
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self._write(), name="ws-writer")
                tasks.create_task(self._read(on_event), name="ws-reader")
        except* (ConnectionLost, ConnectionFailed) as group:
            # Reader and writer see the same close: report it once, unwrapped.
            raise _first(group) from None

    async def _read(self, on_event: Callable[[ev.ServerEvent], None]) -> None:
        while True:
            event = decode(await self._receive())
            if isinstance(event, ev.Unknown):
                log.debug("unknown server event %s", event.type)
            on_event(event)

    async def _write(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._control or self._audio:
                    lane = self._control or self._audio
                    await self._ws.send(lane.popleft())
        except ConnectionClosed as exc:
            raise _lost(exc) from None

    async def close(self) -> None:
        """Close the websocket cleanly (bounded wait)."""
        await self._ws.close()


def _lost(exc: ConnectionClosed) -> ConnectionFailed | ConnectionLost:
    close = exc.rcvd
    code = close.code if close else None
    reason = close.reason if close else "connection dropped"
    if code in AUTH_CLOSE_CODES or "invalid_api_key" in reason:
        return AuthenticationFailed(reason or "authentication failed")
    return ConnectionLost(code, reason or "connection dropped")


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def _as_failure(exc: ConnectionFailed | ConnectionLost) -> ConnectionFailed:
    """A close during setup is a failed attempt, not a lost session."""
    return exc if isinstance(exc, ConnectionFailed) else ConnectionFailed(str(exc))
