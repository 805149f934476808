"""Gemini Live's wire format, free of I/O: the messages harkd sends (setup, turns, tool
results, audio) and the `Decoder` that turns server messages into neutral events.

The transport and what each mapping means for a conversation are in
`harkd.adapters.gemini`.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import re
import secrets
from collections.abc import Mapping
from typing import Any

from harkd import events as ev
from harkd.adapters.base import ProtocolError

log = logging.getLogger(__name__)

INPUT_RATE = 16_000
"""Microphone audio Gemini takes: PCM16 mono at 16 kHz."""
OUTPUT_RATE = 24_000
"""Answer audio Gemini sends: PCM16 mono at 24 kHz."""
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
    except ValueError as exc:  # binascii.Error, or text that is not even ASCII
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
