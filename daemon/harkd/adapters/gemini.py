"""Gemini Live (BidiGenerateContent over WebSocket): the wire mapping and the transport.

A connection sends `setup` and waits for `setupComplete`. Microphone audio goes out
as `realtimeInput.audio` (16 kHz PCM16); answers come back as 24 kHz PCM16 in
`serverContent.modelTurn.parts[].inlineData`, with input and output transcriptions
alongside. Gemini speaks in turns, not items, so the decoder keeps a little state to
give each model turn a response id and one assistant item, and each user turn an item
built from its transcription.

What differs from OpenAI, and how harkd copes:

* **Sessions are resumed, not replayed.** Setup always asks for `sessionResumption`;
  every `sessionResumptionUpdate` that is `resumable` becomes a `ResumeHandle`, and a
  `goAway` becomes `GoingAway`: the connection supervisor then opens a new connection
  whose setup carries the newest handle, so the model keeps the whole conversation and
  nothing is replayed. `contextWindowCompression` (a sliding window) is always on, so a
  long conversation is trimmed by the server instead of ending at its context limit.
* **No truncation** (`can_truncate=False`). Gemini's context keeps what the server had
  generated and sent when the user barged in, which can be more than the user heard
  (audio arrives faster than real time); harkd still marks the message interrupted at
  what was heard. `interrupted` from the server (the user spoke over the answer) is a
  `SpeechStarted`, the neutral event of a server-side barge-in: playback is flushed.
* **No cancel.** `CancelResponse` sends nothing: the adapter ends the response at once
  and drops the rest of the model's turn as it arrives; the next activity or completed
  text turn interrupts the server's generation (which it keeps in its context).
* **Manual turns** are `activityStart`/`activityEnd` with automatic activity detection
  disabled. A discarded turn (too short) cannot be taken back: its activity is left
  open and the next turn continues it, so its few milliseconds of sound are heard as
  the start of the next turn instead of being answered on their own.
* **Text turns** are `clientContent` turns; `RequestResponse` completes them
  (`turnComplete`). The model answers audio turns and tool results by itself.
* **Tools** are declared `BLOCKING` (the model waits for every result before it goes
  on), from the tools' JSON Schema (`parametersJsonSchema`). A `toolCall` ends the
  current response, so harkd runs the calls and answers with one `toolResponse` each;
  results of calls the server cancelled (`toolCallCancellation`) are not sent.
* **No semantic VAD.** `vad_mode="semantic"` is refused (config: `realtime.turn_detection`).
* **Settings changes** (instructions, tools) go out as `contextUpdate`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import logging
import re
import secrets
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
)
from harkd.adapters.openai import AUDIO_LANE_FRAMES, DropLog
from harkd.adapters.registry import GEMINI_MODEL, GEMINI_URL
from harkd.messages import RealtimeToken

log = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 15.0
CLOSE_TIMEOUT_S = 2.0
INPUT_RATE = 16_000
OUTPUT_RATE = 24_000
_AUTH_REASON = re.compile(r"api[ _]?key|permission[ _]denied|unauthenticated", re.IGNORECASE)
"""Close reasons that mean the credential was refused (the service closes the socket
with its error message, e.g. 1007 "API key not valid. Please pass a valid API key.")."""

TRAITS = ProviderTraits(
    input_format=AudioFormat(INPUT_RATE),
    output_format=AudioFormat(OUTPUT_RATE),
    server_turns=True,
    manual_turns=True,
    answers_by_itself=True,  # activityEnd (or the server's own VAD) starts the answer
    can_truncate=False,
    resume="handle",
)
"""What Gemini Live can do, as `GeminiLiveAdapter.traits`."""

_INPUT_MIME = f"audio/pcm;rate={INPUT_RATE}"

# --- encoding ---------------------------------------------------------------------


def model_name(model: str) -> str:
    """The setup's model resource name (`models/...`)."""
    return model if model.startswith("models/") else f"models/{model}"


def function_declarations(settings: ev.SessionSettings) -> list[dict[str, Any]]:
    """harkd's tools as blocking function declarations with their JSON Schema."""
    return [
        {
            "name": tool.name,
            "description": tool.description,
            "parametersJsonSchema": dict(tool.parameters),
            # The session answers all calls of a response, then the model goes on:
            # asynchronous (NON_BLOCKING, some models' default) calls would talk on.
            "behavior": "BLOCKING",
        }
        for tool in settings.tools
    ]


def _instruction(settings: ev.SessionSettings) -> dict[str, Any]:
    return {"parts": [{"text": settings.instructions}]}


def setup_message(
    model: str, settings: ev.SessionSettings, resume_handle: str | None = None
) -> dict[str, Any]:
    """The `setup` message for these settings (resuming `resume_handle` if given)."""
    if settings.vad_mode == "semantic":
        raise ValueError("Gemini Live has no semantic VAD (use server or manual turns)")
    generation: dict[str, Any] = {}
    if settings.output_modalities == ("text",):
        generation["responseModalities"] = ["TEXT"]
    else:
        generation["responseModalities"] = ["AUDIO"]
        voice = {"prebuiltVoiceConfig": {"voiceName": settings.voice}}
        generation["speechConfig"] = {"voiceConfig": voice}
    activity: dict[str, Any] = {
        "automaticActivityDetection": {"disabled": settings.vad_mode == "manual"}
    }
    if settings.vad_mode == "server":
        activity["activityHandling"] = (
            "START_OF_ACTIVITY_INTERRUPTS" if settings.interrupt_response else "NO_INTERRUPTION"
        )
    setup: dict[str, Any] = {
        "model": model_name(model),
        "generationConfig": generation,
        "systemInstruction": _instruction(settings),
        "realtimeInputConfig": activity,
        # Asked for on every connection: without it no handles come to resume with.
        "sessionResumption": {"handle": resume_handle} if resume_handle else {},
        "contextWindowCompression": {"slidingWindow": {}},
        "outputAudioTranscription": {},
    }
    if settings.transcription_model is not None:
        # Gemini transcribes with its own model: only whether to is configurable.
        setup["inputAudioTranscription"] = {}
    if settings.tools:
        setup["tools"] = [{"functionDeclarations": function_declarations(settings)}]
    return {"setup": setup}


def context_update(settings: ev.SessionSettings) -> dict[str, Any]:
    """A `contextUpdate` replacing the instructions and the tools of an open session."""
    tools = [{"functionDeclarations": function_declarations(settings)}] if settings.tools else []
    return {
        "contextUpdate": {"systemInstruction": _instruction(settings), "tools": {"tools": tools}}
    }


def audio_message(pcm: bytes) -> str:
    """A `realtimeInput.audio` message as JSON text, written directly (50 a second)."""
    data = base64.b64encode(pcm).decode("ascii")
    return f'{{"realtimeInput":{{"audio":{{"mimeType":"{_INPUT_MIME}","data":"{data}"}}}}}}'


_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]+);base64,(?P<data>.*)$", re.DOTALL)


def content_turn(message: ev.CreateMessage) -> dict[str, Any]:
    """A conversation message as a `Content` turn (a system note is a user turn: Gemini
    has no system role after setup)."""
    parts: list[dict[str, Any]] = []
    if message.text is not None:
        parts.append({"text": message.text})
    if message.image_url is not None:
        found = _DATA_URL.match(message.image_url)
        if found is None:
            # Only inline images reach the Live API; a remote one is named instead.
            log.warning("Gemini Live takes inline images only; sending the URL as text")
            parts.append({"text": f"(image: {message.image_url})"})
        else:
            parts.append({"inlineData": {"mimeType": found["mime"], "data": found["data"]}})
    return {"role": "model" if message.role == "assistant" else "user", "parts": parts}


def function_response(result: ev.ToolResult) -> dict[str, Any]:
    """A tool result as a `FunctionResponse`: `{"error": ...}` stays an error, anything
    else is the call's `output`."""
    try:
        value = json.loads(result.output)
    except ValueError:
        value = result.output
    is_error = isinstance(value, dict) and set(value) == {"error"}
    response = value if is_error else {"output": value}
    return {"id": result.call_id, "name": result.name, "response": response}


@dataclass
class _Content:
    """A `clientContent` message still in the control lane: text turns queued together
    become one message, and a `RequestResponse` right behind them completes it."""

    turns: list[dict[str, Any]] = field(default_factory=list)
    turn_complete: bool = False

    def message(self) -> str:
        content = {"turns": self.turns, "turnComplete": self.turn_complete}
        return json.dumps({"clientContent": content})


# --- decoding ---------------------------------------------------------------------


class _Obj:
    """Typed access to one server message or a nested object of it: a field of the
    wrong type is a `ProtocolError` here, not a crash deep in the session."""

    __slots__ = ("_data", "_path")

    def __init__(self, path: str, data: object) -> None:
        if not isinstance(data, Mapping):
            raise ProtocolError(f"{path}: expected an object, got {type(data).__name__}")
        self._path = path
        self._data: Mapping[str, Any] = data

    def _bad(self, key: str, expected: str) -> ProtocolError:
        found = type(self._data.get(key)).__name__
        return ProtocolError(f"{self._path}.{key}: expected {expected}, got {found}")

    def has(self, key: str) -> bool:
        return self._data.get(key) is not None

    def text(self, key: str, default: str | None = None) -> str:
        value = self._data.get(key, default)
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def opt_text(self, key: str) -> str | None:
        value = self._data.get(key)
        if value is not None and not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def flag(self, key: str) -> bool:
        value = self._data.get(key)
        if value is not None and not isinstance(value, bool):
            raise self._bad(key, "a boolean")
        return bool(value)

    def obj(self, key: str) -> _Obj:
        value = self._data.get(key)
        return _Obj(f"{self._path}.{key}", {} if value is None else value)

    def objs(self, key: str) -> list[_Obj]:
        value = self._data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self._bad(key, "a list")
        return [_Obj(f"{self._path}.{key}[]", item) for item in value]

    def texts(self, key: str) -> list[str]:
        value = self._data.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "a list of strings")
        return value

    def opt_mapping(self, key: str) -> Mapping[str, Any] | None:
        value = self._data.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise self._bad(key, "an object")
        return value


def _duration_ms(value: str | None) -> int | None:
    """A protobuf JSON duration ("9.5s") in milliseconds."""
    if value is None:
        return None
    try:
        if not value.endswith("s"):
            raise ValueError(value)
        return round(float(value[:-1]) * 1000)
    except ValueError:
        raise ProtocolError(f"goAway.timeLeft: not a duration: {value!r}") from None


def _pcm(blob: _Obj) -> bytes | None:
    """The PCM of an `inlineData` blob; None when it is not audio."""
    mime = blob.text("mimeType", "")
    if not mime.startswith("audio/pcm"):
        return None
    rate = re.search(r"rate=(\d+)", mime)
    if rate is not None and int(rate[1]) != OUTPUT_RATE:
        raise ProtocolError(f"audio at {rate[1]} Hz, expected {OUTPUT_RATE}")
    try:
        return base64.b64decode(blob.text("data"), validate=True)
    except binascii.Error as exc:
        raise ProtocolError(f"malformed audio data: {exc}") from None


class Decoder:
    """Server messages in, neutral events out; free of I/O.

    Gemini has turns where harkd has items and responses: this keeps the open model
    turn (its response id, its assistant item once it says something, its transcript
    so far) and the open user turn (its item id and transcript) of one connection.
    """

    def __init__(self) -> None:
        # Ids unique across connections: a resumed session's items join the same
        # conversation as the earlier connection's.
        self._tag = secrets.token_hex(4)
        self._ids = itertools.count(1)
        self._response: str | None = None
        self._item: str | None = None
        self._spoken = ""
        self._user_item: str | None = None
        self._user_text = ""
        self._usage: Mapping[str, Any] | None = None
        self._discarding = False
        """harkd cancelled the model's turn: the rest of it is dropped as it arrives."""
        self.cancelled_calls: set[str] = set()
        """Calls the server took back (`toolCallCancellation`): their results are not sent."""

    def cancel(self) -> list[ev.ServerEvent]:
        """harkd stopped the answer, and Gemini has no cancel: its response ends here,
        and the rest of the model's turn is dropped until the turn ends or is
        interrupted (by the next activity or completed text turn)."""
        if self._response is None:
            return []
        self._discarding = True
        return self._close_response("cancelled")

    def _id(self, kind: str) -> str:
        return f"{kind}_gm{self._tag}_{next(self._ids)}"

    def decode(self, data: object) -> list[ev.ServerEvent]:
        """One server message (parsed JSON) as events, in the order they happened.

        Anything that is not a message object, or a known field with a wrong shape,
        raises `ProtocolError`; an unknown field is an `Unknown` event.
        """
        if not isinstance(data, Mapping):
            raise ProtocolError(f"server sent a JSON {type(data).__name__}, not a message")
        message = _Obj("message", data)
        events: list[ev.ServerEvent] = [ev.Unknown(str(key)) for key in data if key not in _KNOWN]
        if message.has("usageMetadata"):
            self._usage = message.opt_mapping("usageMetadata")
        if message.has("setupComplete"):
            events.append(ev.SessionReady(message.obj("setupComplete").text("sessionId", "")))
        if message.has("serverContent"):
            events += self._server_content(message.obj("serverContent"))
        if message.has("toolCall"):
            if self._discarding:
                # A call of the cancelled answer: the next turn interrupts it.
                events.append(ev.Ignored("toolCall"))
            else:
                events += self._tool_call(message.obj("toolCall"))
        if message.has("toolCallCancellation"):
            ids = message.obj("toolCallCancellation").texts("ids")
            self.cancelled_calls.update(ids)
            log.info("the server cancelled tool calls %s", ", ".join(ids))
            events.append(ev.Ignored("toolCallCancellation"))
        if message.has("sessionResumptionUpdate"):
            update = message.obj("sessionResumptionUpdate")
            handle = update.opt_text("newHandle")
            if update.flag("resumable") and handle:
                events.append(ev.ResumeHandle(handle))
            else:
                events.append(ev.Ignored("sessionResumptionUpdate"))
        if message.has("goAway"):
            events.append(ev.GoingAway(_duration_ms(message.obj("goAway").opt_text("timeLeft"))))
        events += [ev.Ignored(key) for key in _IGNORED if message.has(key)]
        return events

    # --- server content

    def _server_content(self, content: _Obj) -> list[ev.ServerEvent]:
        events: list[ev.ServerEvent] = []
        if content.has("inputTranscription"):
            events += self._input_transcription(content.obj("inputTranscription"))
        if self._discarding:
            return events + self._discard(content)
        if content.flag("interrupted"):
            events += self._interrupted()
        for part in content.obj("modelTurn").objs("parts"):
            events += self._part(part)
        text = content.obj("outputTranscription").text("text", "")
        if text:
            events += self._say(text)
        if content.flag("generationComplete"):
            events += self._generation_complete()
        if content.flag("turnComplete"):
            events += self._turn_complete()
        return events

    def _discard(self, content: _Obj) -> list[ev.ServerEvent]:
        """Drop the cancelled turn's content (still checking its shape) until it ends."""
        for part in content.obj("modelTurn").objs("parts"):
            if part.has("inlineData"):
                _pcm(part.obj("inlineData"))
        content.obj("outputTranscription").opt_text("text")
        content.flag("generationComplete")
        if content.flag("interrupted") or content.flag("turnComplete"):
            self._discarding = False
            self._usage = None
            if content.flag("turnComplete"):
                return self._close_user_turn()
        return []

    def _open_response(self) -> list[ev.ServerEvent]:
        if self._response is not None:
            return []
        self._response = self._id("resp")
        return [ev.ResponseCreated(self._response)]

    def _open_item(self) -> tuple[str, str, list[ev.ServerEvent]]:
        """The open response and its assistant item, opening either if needed."""
        events = self._open_response()
        assert self._response is not None
        if self._item is None:
            self._item = self._id("item")
            self._spoken = ""
            events.append(ev.OutputItemAdded(self._response, self._item, "message"))
        return self._response, self._item, events

    def _say(self, text: str, spoken: bool = True) -> list[ev.ServerEvent]:
        response, item, events = self._open_item()
        self._spoken += text
        return [*events, ev.AssistantTranscriptDelta(response, item, text, spoken)]

    def _part(self, part: _Obj) -> list[ev.ServerEvent]:
        if part.flag("thought"):
            return []  # the model's reasoning, never spoken
        if part.has("inlineData"):
            pcm = _pcm(part.obj("inlineData"))
            if pcm is None:
                return [ev.Ignored("inlineData")]
            response, item, events = self._open_item()
            return [*events, ev.AudioDelta(response, item, pcm)]
        text = part.opt_text("text")
        return self._say(text, spoken=False) if text else []

    def _generation_complete(self) -> list[ev.ServerEvent]:
        """The open item has all its audio and text (it stays open for nothing)."""
        if self._response is None or self._item is None:
            return []
        item, self._item = self._item, None
        return [
            ev.AssistantTranscriptDone(self._response, item, self._spoken),
            ev.AudioDone(self._response, item),
        ]

    def _turn_complete(self) -> list[ev.ServerEvent]:
        # A turn with nothing in it (or the rest of one a tool call ended) is still a
        # response, so a session waiting for one stops waiting.
        events = self._close_user_turn() + self._open_response()
        return events + self._generation_complete() + self._close_response("completed")

    def _close_response(
        self, status: str, calls: tuple[ev.FunctionCallDone, ...] = ()
    ) -> list[ev.ServerEvent]:
        if self._response is None:
            return []
        done = ev.ResponseDone(self._response, status, self._usage, function_calls=calls)
        self._response = self._item = None
        self._usage = None
        return [done]

    def _interrupted(self) -> list[ev.ServerEvent]:
        # The user spoke over the answer: the speech is a new user turn.
        events = self._close_user_turn()
        self._user_item = self._id("user")
        events.append(ev.SpeechStarted(self._user_item, 0))
        return events + self._close_response("cancelled")

    # --- user turns

    def _input_transcription(self, transcription: _Obj) -> list[ev.ServerEvent]:
        text = transcription.text("text", "")
        events: list[ev.ServerEvent] = []
        if text:
            if self._user_item is None:
                self._user_item = self._id("user")
            if not self._user_text:
                events.append(ev.InputCommitted(self._user_item, None))
            self._user_text += text
            events.append(ev.UserTranscriptDelta(self._user_item, text))
        if transcription.flag("finished"):
            events += self._close_user_turn()
        return events

    def _close_user_turn(self) -> list[ev.ServerEvent]:
        item, text = self._user_item, self._user_text
        self._user_item, self._user_text = None, ""
        if item is None or not text:
            return []
        return [ev.UserTranscriptDone(item, text.strip())]

    # --- tools

    def _tool_call(self, tool_call: _Obj) -> list[ev.ServerEvent]:
        events = self._open_response()
        assert self._response is not None
        calls: list[ev.FunctionCallDone] = []
        for call in tool_call.objs("functionCalls"):
            call_id, name = call.text("id"), call.text("name")
            arguments = json.dumps(call.opt_mapping("args") or {})
            item = self._id("call")
            events.append(ev.OutputItemAdded(self._response, item, "function_call", call_id, name))
            calls.append(ev.FunctionCallDone(self._response, item, call_id, name, arguments))
        # The model waits for the results: this response is over, and the answer that
        # uses them is the next one.
        events += self._generation_complete()
        return [*events, *calls, *self._close_response("completed", tuple(calls))]


_IGNORED = ("voiceActivity", "voiceActivityDetectionSignal")


_KNOWN = frozenset(
    {
        "setupComplete",
        "serverContent",
        "toolCall",
        "toolCallCancellation",
        "usageMetadata",
        "goAway",
        "sessionResumptionUpdate",
        *_IGNORED,
    }
)


def parse(message: str | bytes) -> Any:
    """One websocket message as JSON (the service sends JSON text, sometimes in binary
    frames)."""
    try:
        return json.loads(message)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"server sent a frame that is not JSON: {exc}") from None


# --- transport --------------------------------------------------------------------


class GeminiLiveAdapter:
    """Opens Gemini Live sessions over WebSocket (key in the `x-goog-api-key` header)."""

    name = "gemini"
    traits = TRAITS

    def __init__(
        self,
        model: str = GEMINI_MODEL,
        url: str = GEMINI_URL,
        *,
        ping_interval_s: float = 20.0,
        ping_timeout_s: float = 20.0,
    ) -> None:
        self.model = model
        self.url = url
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s

    async def connect(
        self, token: RealtimeToken, settings: ev.SessionSettings, resume_handle: str | None = None
    ) -> GeminiConnection:
        """Open a session (resuming `resume_handle`'s), send `setup` and wait for
        `setupComplete`."""
        message = json.dumps(setup_message(self.model, settings, resume_handle))
        try:
            ws = await websockets.connect(
                self.url,
                additional_headers={"x-goog-api-key": token.value},
                max_size=None,
                ping_interval=self.ping_interval_s,
                ping_timeout=self.ping_timeout_s,
                open_timeout=SETUP_TIMEOUT_S,
                close_timeout=CLOSE_TIMEOUT_S,
                compression=None,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise AuthenticationFailed(f"authentication failed (HTTP {status})") from None
            raise ConnectionFailed(f"handshake refused (HTTP {status})") from None
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            raise ConnectionFailed(f"cannot connect: {exc}") from None
        connection = GeminiConnection(ws)
        try:
            await asyncio.wait_for(connection.setup(message), SETUP_TIMEOUT_S)
        except BaseException:
            await connection.close()
            raise
        if resume_handle is not None:
            log.info("resumed the Gemini session")
        return connection


def gemini_live(
    model: str = GEMINI_MODEL, url: str = GEMINI_URL, **options: float
) -> GeminiLiveAdapter:
    """The Gemini Live adapter (named like the reference's `geminiRealtime()`)."""
    return GeminiLiveAdapter(model, url, **options)


class GeminiConnection:
    """One open Gemini Live session: a control lane that overtakes a bounded audio lane."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._decoder = Decoder()
        self._control: deque[str | _Content] = deque()
        self._audio: deque[tuple[str, int]] = deque()
        self._wakeup = asyncio.Event()
        self._early: list[ev.ServerEvent] = []
        self._on_event: Callable[[ev.ServerEvent], None] | None = None
        self._open_content: _Content | None = None
        self._prompt_pending = False
        self._activity_open = False
        self._dropped_bytes = 0
        self._drop_report_scheduled = False
        self._drop_log = DropLog()

    async def setup(self, message: str) -> None:
        """Send `setup`; return at `setupComplete` (a close before it fails the attempt)."""
        try:
            await self._ws.send(message)
            while True:
                events = self._decoder.decode(parse(await self._receive()))
                ready = any(isinstance(e, ev.SessionReady) for e in events)
                self._early += [e for e in events if not isinstance(e, ev.SessionReady)]
                if ready:
                    return
        except ConnectionClosed as exc:
            raise _as_failure(_lost(exc)) from None
        except ConnectionLost as exc:
            raise _as_failure(exc) from None

    async def _receive(self) -> str | bytes:
        try:
            return await self._ws.recv()
        except ConnectionClosed as exc:
            raise _lost(exc) from None

    def send(self, command: ev.Command) -> None:
        """Queue a command: audio goes to the audio lane, the rest overtakes it (except
        a turn's end, which follows the audio of its turn)."""
        if isinstance(command, ev.AppendAudio):
            if len(self._audio) >= AUDIO_LANE_FRAMES:
                self._drop_oldest_audio()
            self._audio.append((audio_message(command.pcm), len(command.pcm)))
            self._wakeup.set()
            return
        match command:
            case ev.StartTurn():
                self._audio.clear()  # audio of a discarded turn stays unsent
                if not self._activity_open:
                    self._activity_open = True
                    self._queue({"realtimeInput": {"activityStart": {}}})
            case ev.EndTurn():
                self._control.extend(message for message, _ in self._audio)
                self._audio.clear()
                if self._activity_open:
                    self._activity_open = False
                    self._queue({"realtimeInput": {"activityEnd": {}}})
            case ev.DiscardTurn():
                # Gemini cannot forget an activity: it stays open for the next turn.
                self._audio.clear()
            case ev.CreateMessage():
                self._add_turn(content_turn(command))
            case ev.RequestResponse():
                self._complete_turn()
            case ev.ToolResult(call_id=call_id):
                if call_id in self._decoder.cancelled_calls:
                    log.info("result of cancelled tool call %s not sent", call_id)
                else:
                    self._queue(
                        {"toolResponse": {"functionResponses": [function_response(command)]}}
                    )
            case ev.CancelResponse():
                # Nothing to send: the answer ends here, and the next turn interrupts
                # the server's generation (see the module's docstring).
                cancelled = self._decoder.cancel()
                if cancelled:
                    asyncio.get_running_loop().call_soon(self._deliver, cancelled)
            case ev.TruncateItem():
                log.debug("Gemini cannot truncate: %s not sent", command)
        self._wakeup.set()

    def _queue(self, message: dict[str, Any]) -> None:
        self._control.append(json.dumps(message))

    def _add_turn(self, turn: dict[str, Any]) -> None:
        content = self._open_content
        if content is None or not self._control or self._control[-1] is not content:
            content = _Content()
            self._control.append(content)
            self._open_content = content
        content.turns.append(turn)
        self._prompt_pending = True

    def _complete_turn(self) -> None:
        content = self._open_content
        if content is not None and self._control and self._control[-1] is content:
            content.turn_complete = True
        elif self._prompt_pending:
            # The content went out earlier (e.g. while an answer was still running).
            self._queue({"clientContent": {"turnComplete": True}})
        else:
            return  # an audio turn or tool results: the model answers by itself
        self._open_content = None
        self._prompt_pending = False

    def _drop_oldest_audio(self) -> None:
        _, pcm_bytes = self._audio.popleft()
        self._dropped_bytes += pcm_bytes
        self._drop_log.dropped(pcm_bytes / TRAITS.input_format.bytes_per_ms)
        if not self._drop_report_scheduled:
            self._drop_report_scheduled = True
            asyncio.get_running_loop().call_soon(self._report_drops)

    def _deliver(self, events: list[ev.ServerEvent]) -> None:
        # Told to the session after the `send` that caused them, not from inside it.
        if self._on_event is not None:
            for event in events:
                self._on_event(event)

    def _report_drops(self) -> None:
        self._drop_report_scheduled = False
        dropped, self._dropped_bytes = self._dropped_bytes, 0
        if dropped and self._on_event is not None:
            self._on_event(ev.AudioDropped(dropped))

    async def send_audio(self, pcm: bytes) -> None:
        """Send audio now when nothing is queued ahead of it, else queue it."""
        if self._control or self._audio or self._ws.state is not State.OPEN:
            self.send(ev.AppendAudio(pcm))
            return
        with contextlib.suppress(ConnectionClosed):  # the reader reports the close
            await self._ws.send(audio_message(pcm))

    def update_session(self, settings: ev.SessionSettings) -> None:
        """Replace the open session's instructions and tools (`contextUpdate`)."""
        self._queue(context_update(settings))
        self._wakeup.set()

    async def serve(self, on_event: Callable[[ev.ServerEvent], None]) -> None:
        """Deliver events until the connection ends; always ends by raising (see
        `RealtimeConnection.serve`)."""
        self._on_event = on_event
        for event in self._early:
            on_event(event)
        self._early.clear()
        reader = asyncio.create_task(self._read(on_event), name="ws-reader")
        writer = asyncio.create_task(self._write(), name="ws-writer")
        try:
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
        for task in (reader, writer):
            if not task.cancelled() and (error := task.exception()) is not None:
                raise error
        raise ConnectionLost(None, "connection ended")

    async def _read(self, on_event: Callable[[ev.ServerEvent], None]) -> None:
        while True:
            for event in self._decoder.decode(parse(await self._receive())):
                if isinstance(event, ev.Unknown):
                    log.debug("unknown server message field %s", event.type)
                elif isinstance(event, ev.ResponseCreated):
                    # A model turn took in all content sent before it.
                    self._prompt_pending = False
                on_event(event)

    async def _write(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._control or self._audio:
                    if self._control:
                        entry = self._control.popleft()
                        if entry is self._open_content:
                            self._open_content = None
                        message = entry if isinstance(entry, str) else entry.message()
                    else:
                        message = self._audio.popleft()[0]
                    await self._ws.send(message)
        except ConnectionClosed as exc:
            raise _lost(exc) from None

    async def close(self) -> None:
        """Close the websocket cleanly (bounded wait)."""
        await self._ws.close()


def _lost(exc: ConnectionClosed) -> AuthenticationFailed | ConnectionLost:
    close = exc.rcvd
    code = close.code if close else None
    reason = close.reason if close else "connection dropped"
    if _AUTH_REASON.search(reason):
        return AuthenticationFailed(reason)
    return ConnectionLost(code, reason or "connection dropped")


def _as_failure(exc: ConnectionFailed | ConnectionLost) -> ConnectionFailed:
    """A close during setup is a failed attempt, not a lost session."""
    return exc if isinstance(exc, ConnectionFailed) else ConnectionFailed(str(exc))
