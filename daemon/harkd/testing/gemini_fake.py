"""A fake Gemini Live server: a real websocket server on loopback speaking
BidiGenerateContent, for the tests, the benchmarks and `harkd demo --provider gemini`.

Where harkd depends on it, it behaves like the service:

* the key comes in the `x-goog-api-key` header (or `?key=`); a bad one closes the
  socket after `setup` with 1007 "API key not valid. ...";
* every client message is validated against `google-genai`'s `LiveClientMessage`
  (and every message of its own against `LiveServerMessage`)
  (unknown fields are refused); an invalid one closes the socket with 1007 and the
  reason, as the service does. `setup` must come first, and only once;
* `setupComplete`; automatic activity detection (an energy VAD on the 16 kHz input)
  or `activityStart`/`activityEnd` when it is disabled; input transcriptions;
* scripted answers (`FakeScript`): tool calls by `ToolRule` (declared tools only),
  answered by `toolResponse`, or 24 kHz audio faster than real time (or paced) with
  output transcriptions, `generationComplete`, then `turnComplete` with usage;
* `interrupted` when the user speaks over an answer (or a new activity or completed
  text turn starts), keeping in the conversation only what had been sent; pending
  tool calls are cancelled (`toolCallCancellation`);
* session resumption: `sessionResumptionUpdate` handles at turn boundaries, and a
  setup with a handle continues that conversation; a `goAway` then a close after
  `max_connection_s` (the service's ~10 minute connection limit);
* injectable drops, closes, raw frames and auth failures.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import logging
import math
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .fake_server import EnergyVad, FakeScript, _split_pieces, synthesize_speech
from .gemini_validation import (
    ClientMessageInvalid,
    validate_client_message,
    validate_server_message,
)

logger = logging.getLogger(__name__)

__all__ = ["GeminiFakeServer", "GeminiFakeSession", "Turn"]

PATH = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
INPUT_RATE = 16_000
OUTPUT_RATE = 24_000
CLOSE_INVALID = 1007
"""The service's close code for a request it refuses (invalid argument, bad key)."""
CLOSE_POLICY = 1008
CLOSE_GOING_AWAY = 1001
BAD_KEY = "API key not valid. Please pass a valid API key."

Message = dict[str, Any]


@dataclass
class Turn:
    """One turn of the fake's conversation (what the model "remembers")."""

    role: str
    """"user" or "model"."""
    text: str
    source: str
    """"audio", "text", "tool_call" or "tool_response"."""
    interrupted: bool = False


@dataclass
class GeminiFakeSession:
    """What one connection did, for assertions (`index`: its place in `sessions`)."""

    index: int
    authorized: bool = True
    setup: Message = field(default_factory=dict)
    resumed_from: str | None = None
    history_at_start: list[Turn] = field(default_factory=list)
    """The conversation this connection started with (restored from its handle)."""
    turns: list[Turn] = field(default_factory=list)
    audio_ms_received: float = 0.0
    audio_ms_sent: float = 0.0
    speech_segments: list[tuple[int, int]] = field(default_factory=list)
    activities: int = 0
    interruptions: int = 0
    tool_calls: list[Message] = field(default_factory=list)
    tool_responses: list[Message] = field(default_factory=list)
    cancelled_calls: list[str] = field(default_factory=list)
    handles: list[str] = field(default_factory=list)
    went_away: bool = False
    connected: bool = True
    close_code: int | None = None
    close_reason: str = ""


class _Refused(Exception):
    """A client message the service refuses: the connection is closed with this."""

    def __init__(self, reason: str, code: int = CLOSE_INVALID) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class GeminiFakeServer:
    """A websocket server speaking Gemini Live's BidiGenerateContent on loopback.

    `api_keys=None` accepts any key; `port=0` picks a free port (see `url`).
    `max_connection_s` sends `goAway` that long after a connection opened and closes it
    `go_away_grace_s` later. `record=False` keeps `received` empty (long demos).
    """

    def __init__(
        self,
        script: FakeScript | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        api_keys: set[str] | frozenset[str] | None = None,
        record: bool = True,
        *,
        max_connection_s: float | None = None,
        go_away_grace_s: float = 5.0,
    ) -> None:
        self.script = script if script is not None else FakeScript()
        self.host = host
        self.api_keys = None if api_keys is None else frozenset(api_keys)
        self.record = record
        self.max_connection_s = max_connection_s
        self.go_away_grace_s = go_away_grace_s
        self.received: list[tuple[int, Message]] = []
        """Every valid client message, with its connection's index."""
        self.sessions: list[GeminiFakeSession] = []
        self.handles: dict[str, list[Turn]] = {}
        """Resumption handles given out, each with the conversation it restores."""
        self._port = port
        self._server: Server | None = None
        self._connections: dict[int, _Connection] = {}
        self._fail_auth = 0
        self._changed = asyncio.Condition()

    # ---- lifecycle

    async def start(self) -> None:
        """Bind and serve."""
        self._server = await serve(
            self._handle,
            self.host,
            self._port,
            process_request=self._process_request,
            max_size=None,
            compression=None,
            close_timeout=2,
        )
        logger.info("fake Gemini Live server on %s", self.url)

    async def stop(self) -> None:
        """Close every connection and the endpoint."""
        if self._server is not None:
            self._server.close(close_connections=False)
            await self.close_all(CLOSE_GOING_AWAY, "server shutting down")
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> GeminiFakeServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The port actually bound."""
        if self._server is None:
            raise RuntimeError("server not started")
        port: int = next(iter(self._server.sockets)).getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """Where a client connects (the service's path on loopback)."""
        return f"ws://{self.host}:{self.port}{PATH}"

    @property
    def audio_ms_received(self) -> float:
        """Microphone audio received so far, over all sessions, in milliseconds."""
        return sum(session.audio_ms_received for session in self.sessions)

    def realtime_config(self, api_key: str) -> dict[str, Any]:
        """The `realtime:` section that points harkd at this server with `api_key`."""
        return {"provider": "gemini", "url": self.url, "api_key": api_key}

    # ---- injection

    def fail_auth_next(self, n: int = 1) -> None:
        """Refuse the key of the next `n` connections."""
        self._fail_auth += n

    async def drop_all(self) -> None:
        """Abort every connection's transport (no close handshake); wait for cleanup."""
        connections = list(self._connections.values())
        for conn in connections:
            conn.ws.transport.abort()
        for conn in connections:
            await conn.closed.wait()

    async def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "") -> None:
        """Close every connection cleanly with `code` and `reason`."""
        connections = list(self._connections.values())
        await asyncio.gather(*(conn.ws.close(code, reason) for conn in connections))
        for conn in connections:
            await conn.closed.wait()

    async def go_away(self, time_left_s: float | None = None, index: int | None = None) -> None:
        """Send `goAway` now (to one connection or all) and close it `time_left_s` later."""
        left = self.go_away_grace_s if time_left_s is None else time_left_s
        for conn in self._targets(index):
            await conn.go_away(left)

    async def send_message(self, message: Mapping[str, Any], index: int | None = None) -> None:
        """Inject a server message as given (unchecked: e.g. a field of a newer protocol)."""
        for conn in self._targets(index):
            await conn.send(dict(message), checked=False)

    async def send_raw(self, frame: str | bytes, index: int | None = None) -> None:
        """Inject a frame exactly as given (garbage a broken proxy might send)."""
        for conn in self._targets(index):
            await conn.ws.send(frame)

    def _targets(self, index: int | None) -> list[_Connection]:
        if index is None:
            return list(self._connections.values())
        return [self._connections[index]] if index in self._connections else []

    # ---- waiting helpers for tests

    async def wait_for(
        self, predicate: Callable[[], bool], *, timeout_s: float = 10.0, what: str = ""
    ) -> None:
        """Wait until `predicate()` holds (checked whenever something happened)."""
        try:
            async with asyncio.timeout(timeout_s), self._changed:
                await self._changed.wait_for(predicate)
        except TimeoutError:
            raise AssertionError(f"fake Gemini server: timed out waiting for {what}") from None

    async def wait_for_sessions(
        self, count: int = 1, *, timeout_s: float = 10.0
    ) -> GeminiFakeSession:
        """Wait until `count` connections have come; return the last."""
        await self.wait_for(
            lambda: len(self.sessions) >= count, timeout_s=timeout_s, what="sessions"
        )
        return self.sessions[count - 1]

    def messages(self, kind: str, index: int | None = None) -> list[Message]:
        """The received client messages with top-level field `kind`."""
        return [m for i, m in self.received if kind in m and (index is None or i == index)]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ---- websocket

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path.rstrip("/") != PATH:
            return ws.respond(404, "Not Found\n")
        return None

    def _key_ok(self, request: Request) -> bool:
        if self._fail_auth > 0:
            self._fail_auth -= 1
            return False
        key = request.headers.get("x-goog-api-key")
        if key is None:
            key = parse_qs(urlsplit(request.path).query).get("key", [None])[0]
        return self.api_keys is None or (key is not None and key in self.api_keys)

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        session = GeminiFakeSession(index=len(self.sessions))
        session.authorized = self._key_ok(ws.request)
        self.sessions.append(session)
        conn = _Connection(self, ws, session)
        self._connections[session.index] = conn
        await self._notify()
        try:
            await conn.run()
        finally:
            del self._connections[session.index]
            session.connected = False
            session.close_code = ws.close_code
            session.close_reason = ws.close_reason or ""
            conn.closed.set()
            await self._notify()

    async def _record(self, index: int, message: Message) -> None:
        if self.record:
            self.received.append((index, message))
        await self._notify()


def _close_reason(text: str) -> str:
    """A close reason within the 123 bytes a close frame holds."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


class _Connection:
    """One websocket: setup, conversation, activity detection, generation."""

    def __init__(
        self, server: GeminiFakeServer, ws: ServerConnection, session: GeminiFakeSession
    ) -> None:
        self.server = server
        self.ws = ws
        self.state = session
        self.script = server.script
        self.closed = asyncio.Event()
        self.turns = session.turns
        self.vad: EnergyVad | None = None
        self.activity_ms: float | None = None
        """Audio of the open activity (manual turns); None: no activity open."""
        self.speech_start_ms = 0
        self.generation: asyncio.Task[None] | None = None
        self.pending_calls: dict[str, str] = {}
        """Tool calls waiting for their response: id -> name."""
        self.answered: list[tuple[str, str]] = []
        self.tool_names: set[str] = set()
        self.resumable = False
        self.tasks: list[asyncio.Task[None]] = []

    # ---- plumbing

    async def run(self) -> None:
        """Serve the connection until either side closes it."""
        try:
            async for frame in self.ws:
                try:
                    message = validate_client_message(frame)
                except ClientMessageInvalid as exc:
                    raise _Refused(exc.reason) from None
                await self.server._record(self.state.index, message)
                await self._dispatch(message)
        except _Refused as refused:
            logger.info("connection %d refused: %s", self.state.index, refused.reason)
            with contextlib.suppress(ConnectionClosed):
                await self.ws.close(refused.code, _close_reason(refused.reason))
        except ConnectionClosed:
            pass
        finally:
            for task in [*self.tasks, self.generation]:
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.wait([task])

    async def send(self, message: Message, *, checked: bool = True) -> None:
        """Send one server message (as the service does: JSON in a binary frame),
        checked against `LiveServerMessage` unless it is an injected one."""
        if checked:
            validate_server_message(message)
        await self.ws.send(json.dumps(message).encode())

    async def _dispatch(self, message: Message) -> None:
        if not self.state.setup:
            if "setup" not in message:
                raise _Refused("The first message must be a setup message.")
            await self._setup(message["setup"])
            return
        if "setup" in message:
            raise _Refused("Setup may be sent only once, as the first message.")
        if "realtimeInput" in message:
            await self._realtime_input(message["realtimeInput"])
        elif "clientContent" in message:
            await self._client_content(message["clientContent"])
        elif "toolResponse" in message:
            await self._tool_response(message["toolResponse"])
        elif "contextUpdate" in message:
            self._context_update(message["contextUpdate"])

    # ---- setup

    async def _setup(self, setup: Message) -> None:
        if not self.state.authorized:
            raise _Refused(BAD_KEY)
        model = setup.get("model") or ""
        if not model.startswith("models/"):
            raise _Refused(f"Invalid model name {model!r}: expected models/NAME.", CLOSE_POLICY)
        resumption = setup.get("sessionResumption")
        handle = (resumption or {}).get("handle")
        if handle:
            if handle not in self.server.handles:
                raise _Refused("Session resumption handle is invalid or expired.", CLOSE_POLICY)
            self.turns[:] = copy.deepcopy(self.server.handles[handle])
            self.state.resumed_from = handle
        self.state.history_at_start = copy.deepcopy(self.turns)
        self.state.setup = setup
        self.resumable = resumption is not None
        self._declare(setup.get("tools") or [])
        detection = (setup.get("realtimeInputConfig") or {}).get("automaticActivityDetection") or {}
        if not detection.get("disabled", False):
            silence_ms = int(detection.get("silenceDurationMs") or 500)
            self.vad = EnergyVad(0.02, silence_ms=silence_ms, rate=INPUT_RATE)
        await self.send({"setupComplete": {"sessionId": f"session_{secrets.token_hex(6)}"}})
        await self._offer_handle()
        if self.server.max_connection_s is not None:
            self.tasks.append(
                asyncio.create_task(self._lifetime(self.server.max_connection_s), name="lifetime")
            )

    def _declare(self, tools: list[Message]) -> None:
        self.tool_names = {
            declaration.get("name", "")
            for tool in tools
            for declaration in tool.get("functionDeclarations") or []
        }

    def _context_update(self, update: Message) -> None:
        if "tools" in update:
            self._declare((update["tools"] or {}).get("tools") or [])

    def _config(self, key: str) -> Message:
        value: Message = self.state.setup.get(key) or {}
        return value

    async def _offer_handle(self) -> None:
        """A handle to the conversation as it is now (when the setup asked for them)."""
        if not self.resumable:
            return
        handle = f"handle_{secrets.token_hex(8)}"
        self.server.handles[handle] = copy.deepcopy(self.turns)
        self.state.handles.append(handle)
        await self.send({"sessionResumptionUpdate": {"newHandle": handle, "resumable": True}})

    async def _lifetime(self, after_s: float) -> None:
        await asyncio.sleep(after_s)
        await self.go_away(self.server.go_away_grace_s)

    async def go_away(self, time_left_s: float) -> None:
        """Warn of the close, then close `time_left_s` later."""
        self.state.went_away = True
        with contextlib.suppress(ConnectionClosed):
            await self.send({"goAway": {"timeLeft": f"{time_left_s:g}s"}})
        self.tasks.append(asyncio.create_task(self._close_later(time_left_s), name="go-away"))

    async def _close_later(self, after_s: float) -> None:
        await asyncio.sleep(after_s)
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(CLOSE_GOING_AWAY, "connection lifetime reached")

    # ---- input

    async def _realtime_input(self, realtime: Message) -> None:
        if "activityStart" in realtime:
            await self._activity_start()
        audio = realtime.get("audio")
        if audio is not None:
            await self._audio(audio)
        if "activityEnd" in realtime:
            await self._activity_end()
        if realtime.get("audioStreamEnd") and self.vad is not None and self.vad.in_speech:
            self.vad.reset()
            await self._speech_stopped(self.vad.position_ms)
        if realtime.get("text"):
            await self._user_turn(str(realtime["text"]), "text")

    async def _audio(self, audio: Message) -> None:
        mime = str(audio.get("mimeType", ""))
        found = re.fullmatch(r"audio/pcm(?:;rate=(\d+))?", mime)
        if found is None:
            raise _Refused(f"Unsupported audio mime type {mime!r}.")
        rate = int(found[1] or INPUT_RATE)
        pcm = base64.b64decode(audio.get("data") or "")
        ms = len(pcm) / (rate * 2 / 1000)
        self.state.audio_ms_received += ms
        if self.activity_ms is not None:
            self.activity_ms += ms
        if self.vad is None or rate != INPUT_RATE:
            return
        for boundary in self.vad.feed(pcm):
            if boundary.kind == "start":
                await self._speech_started(boundary.ms)
            else:
                await self._speech_stopped(boundary.ms)

    def _interrupts(self) -> bool:
        handling = self._config("realtimeInputConfig").get("activityHandling")
        return handling != "NO_INTERRUPTION"

    async def _speech_started(self, onset_ms: int) -> None:
        self.speech_start_ms = onset_ms
        if self._interrupts():
            await self._interrupt()

    async def _speech_stopped(self, end_ms: int) -> None:
        self.state.speech_segments.append((self.speech_start_ms, end_ms))
        transcript = self.script.next_transcript(end_ms - self.speech_start_ms)
        await self._user_turn(transcript, "audio")

    async def _activity_start(self) -> None:
        if self.vad is not None:
            raise _Refused("activityStart needs automatic activity detection disabled.")
        if self.activity_ms is not None:
            raise _Refused("activityStart while an activity is already open.")
        self.activity_ms = 0.0
        self.state.activities += 1
        if self._interrupts():
            await self._interrupt()

    async def _activity_end(self) -> None:
        if self.activity_ms is None:
            raise _Refused("activityEnd without an open activity.")
        heard_ms, self.activity_ms = self.activity_ms, None
        if heard_ms > 0:
            await self._user_turn(self.script.next_transcript(heard_ms), "audio")

    async def _user_turn(self, text: str, source: str) -> None:
        if source == "audio" and "inputAudioTranscription" in self.state.setup:
            pieces = _split_pieces(text, 3)
            for number, piece in enumerate(pieces, 1):
                transcription: Message = {"text": piece}
                if number == len(pieces):
                    transcription["finished"] = True
                await self.send({"serverContent": {"inputTranscription": transcription}})
        self.turns.append(Turn("user", text, source))
        await self._respond()

    async def _client_content(self, content: Message) -> None:
        for turn in content.get("turns") or []:
            text = " ".join(str(p["text"]) for p in turn.get("parts") or [] if "text" in p)
            self.turns.append(Turn(turn.get("role") or "user", text, "text"))
        if content.get("turnComplete"):
            await self._respond()  # interrupts a running answer, as the service does
        else:
            await self._offer_handle()

    async def _tool_response(self, response: Message) -> None:
        for answer in response.get("functionResponses") or []:
            call_id = answer.get("id")
            name = self.pending_calls.pop(call_id, None)
            if name is None:
                raise _Refused(f"Function response for unknown call id {call_id!r}.")
            if answer.get("name") != name:
                raise _Refused(f"Function response {call_id!r} names {answer.get('name')!r}.")
            self.state.tool_responses.append(answer)
            response_ = answer.get("response") or {}
            # The tool's own JSON, as the script sees it from every provider's fake.
            output = json.dumps(response_.get("output", response_))
            self.turns.append(Turn("user", f"{name}: {output}", "tool_response"))
            self.answered.append((name, output))
        if not self.pending_calls and self.answered:
            outputs, self.answered = self.answered, []
            self._start(self.script.reply_after_tools(outputs))

    # ---- output

    async def _interrupt(self) -> None:
        if self.pending_calls:
            ids = list(self.pending_calls)
            self.pending_calls.clear()
            self.state.cancelled_calls += ids
            await self.send({"toolCallCancellation": {"ids": ids}})
        task = self.generation
        if task is None or task.done():
            return
        task.cancel()
        await asyncio.wait([task])
        self.state.interruptions += 1
        await self.send({"serverContent": {"interrupted": True}})

    async def _respond(self) -> None:
        await self._interrupt()
        last = next((t for t in reversed(self.turns) if t.role == "user"), None)
        user_text = last.text if last is not None else ""
        calls = (
            self._planned_calls(user_text)
            if last is not None and last.source != "tool_response"
            else []
        )
        if calls:
            await self._call_tools(calls)
        else:
            self._start(self.script.reply_text(user_text))

    def _planned_calls(self, text: str) -> list[tuple[str, Mapping[str, Any]]]:
        calls = self.script.calls_for(text)
        for name, _ in calls:
            if name not in self.tool_names:
                logger.warning("scripted call %r skipped: tool not declared in the setup", name)
        return [(name, args) for name, args in calls if name in self.tool_names]

    async def _call_tools(self, calls: list[tuple[str, Mapping[str, Any]]]) -> None:
        function_calls = []
        for name, arguments in calls:
            call_id = f"function-call-{secrets.token_hex(8)}"
            self.pending_calls[call_id] = name
            function_calls.append({"id": call_id, "name": name, "args": dict(arguments)})
            self.turns.append(Turn("model", f"{name}({dict(arguments)})", "tool_call"))
        self.state.tool_calls += function_calls
        await self.send({"toolCall": {"functionCalls": function_calls}})

    def _start(self, text: str) -> None:
        self.generation = asyncio.create_task(self._generate(text), name="fake-gemini-answer")

    async def _generate(self, text: str) -> None:
        """Stream one answer: audio with its transcription, then the turn's end."""
        turn = Turn("model", "", "audio", interrupted=True)
        self.turns.append(turn)
        audio = self._config("generationConfig").get("responseModalities") != ["TEXT"]
        transcribe = "outputAudioTranscription" in self.state.setup
        delta_ms = max(10, self.script.delta_ms)
        total_ms = max(float(delta_ms), len(text) * self.script.audio_ms_per_char)
        chunks = max(1, math.ceil(total_ms / delta_ms))
        words = _split_pieces(text, chunks)
        sample = 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            for index in range(chunks):
                chunk_ms = min(float(delta_ms), total_ms - index * delta_ms)
                piece = words[index] if index < len(words) else ""
                content: Message = {}
                if audio:
                    pcm = synthesize_speech(chunk_ms, start_sample=sample)
                    sample += len(pcm) // 2
                    data = base64.b64encode(pcm).decode()
                    blob = {"mimeType": f"audio/pcm;rate={OUTPUT_RATE}", "data": data}
                    content["modelTurn"] = {"parts": [{"inlineData": blob}]}
                    if piece and transcribe:
                        content["outputTranscription"] = {"text": piece}
                    self.state.audio_ms_sent += len(pcm) / (OUTPUT_RATE * 2 / 1000)
                elif piece:
                    content["modelTurn"] = {"parts": [{"text": piece}]}
                if content:
                    # Sent is kept: an interruption leaves this much in the context.
                    await self.send({"serverContent": content})
                    turn.text += piece
                await self._pause(chunk_ms)
            await self.send({"serverContent": {"generationComplete": True}})
            if audio:
                # The service assumes the client plays the answer in real time: the
                # turn ends (and can still be interrupted) until it would have played.
                await asyncio.sleep(max(0.0, started + total_ms / 1000 - loop.time()))
            turn.interrupted = False
            usage = {
                "promptTokenCount": sum(len(t.text) for t in self.turns) // 4,
                "responseTokenCount": len(text) // 4,
                "totalTokenCount": (sum(len(t.text) for t in self.turns) + len(text)) // 4,
            }
            # The turn is resumable before the client hears it is over: a client that
            # moves connections between turns resumes with a handle that has it.
            await self._offer_handle()
            await self.send({"serverContent": {"turnComplete": True}, "usageMetadata": usage})
        except ConnectionClosed:
            return

    async def _pause(self, media_ms: float) -> None:
        pace = self.script.pace
        await asyncio.sleep(media_ms / 1000 / pace if pace > 0 else 0)
