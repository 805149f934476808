"""A fake ElevenLabs Agents server: the conversational websocket on loopback.

It speaks the protocol of ElevenLabs' published AsyncAPI contract for agents wherever
harkd depends on it:

* one agent (`AGENT_ID`); with `api_keys` it is private: the websocket then needs a
  `conversation_signature` from ``GET /v1/convai/conversation/get-signed-url`` (same
  port, ``xi-api-key`` header; a bad key gets 401); a refused conversation is an HTTP
  403 handshake;
* the client's first message must be ``conversation_initiation_client_data``; the
  answer is ``conversation_initiation_metadata`` with pcm_16000 both ways;
* every client message is validated against a strict JSON Schema written from that
  contract (required fields, types, and no unknown fields, which the contract leaves
  open): the `elevenlabs` SDK has no models for these client events. An invalid
  message is answered like the server does, an ``error`` event and close 1008;
* energy VAD on the 16 kHz ``user_audio_chunk`` audio; a finished utterance gets a
  ``user_transcript`` and a scripted reply (``agent_response`` then ``audio`` chunks
  sharing the reply's ``event_id``, faster than real time); scripted tool calls as
  ``client_tool_call``, continued after the ``client_tool_result``;
* speech while a reply is still being heard is an ``interruption`` (chunks already in
  flight still arrive, with the interrupted reply's id), then an
  ``agent_response_correction`` cut to what was heard;
* ``ping`` events (each ``pong`` must echo its id), ``user_message``,
  ``contextual_update``, injectable drops, closes and auth failures.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jsonschema
import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .fake_server import EnergyVad, FakeScript, synthesize_speech

logger = logging.getLogger(__name__)

Event = dict[str, Any]

AGENT_ID = "agent_fake_harkd"
CONVERSATION_PATH = "/v1/convai/conversation"
SIGNED_URL_PATH = "/v1/convai/conversation/get-signed-url"
RATE = 16_000
BYTES_PER_MS = RATE * 2 // 1000
IN_FLIGHT_CHUNKS = 2
"""Chunks of a reply already on their way when it is interrupted."""
CLOSE_POLICY = 1008

_STRING = {"type": "string"}
_OVERRIDE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "agent": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "first_message": {"type": ["string", "null"]},
                "language": {"type": ["string", "null"]},
                "prompt": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"prompt": {"type": ["string", "null"]}},
                },
            },
        },
        "tts": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "voice_id": {"type": ["string", "null"]},
                "stability": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "speed": {"type": ["number", "null"], "minimum": 0.7, "maximum": 5},
                "similarity_boost": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
            },
        },
        "conversation": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"text_only": {"type": ["boolean", "null"]}},
        },
    },
}


def _message(kind: str, properties: Mapping[str, Any], required: Iterable[str]) -> Event:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["type", *required],
        "properties": {"type": {"const": kind}, **properties},
    }


CLIENT_SCHEMAS: dict[str, Event] = {
    "conversation_initiation_client_data": _message(
        "conversation_initiation_client_data",
        {
            "conversation_config_override": _OVERRIDE,
            "custom_llm_extra_body": {"type": "object"},
            "dynamic_variables": {"type": "object"},
            "user_id": {"type": ["string", "null"]},
            "source_info": {"type": "object"},
        },
        [],
    ),
    "pong": _message("pong", {"event_id": {"type": "integer"}}, ["event_id"]),
    "user_message": _message("user_message", {"text": {"type": ["string", "null"]}}, []),
    "user_activity": _message("user_activity", {}, []),
    "contextual_update": _message("contextual_update", {"text": _STRING}, ["text"]),
    "client_tool_result": _message(
        "client_tool_result",
        {"tool_call_id": _STRING, "result": _STRING, "is_error": {"type": "boolean"}},
        ["tool_call_id", "result", "is_error"],
    ),
}
"""Client messages as ElevenLabs' AsyncAPI contract defines them, made strict."""
AUDIO_SCHEMA: Event = {
    "type": "object",
    "additionalProperties": False,
    "required": ["user_audio_chunk"],
    "properties": {"user_audio_chunk": {"type": "string", "contentEncoding": "base64"}},
}


class ClientMessageInvalid(Exception):
    """A client message the real server would refuse."""


def validate_client_message(message: Mapping[str, Any]) -> str:
    """The message's kind (``user_audio_chunk`` for audio); raises `ClientMessageInvalid`."""
    if "user_audio_chunk" in message:
        kind, schema = "user_audio_chunk", AUDIO_SCHEMA
    else:
        kind = str(message.get("type"))
        schema = CLIENT_SCHEMAS.get(kind, {})
        if not schema:
            raise ClientMessageInvalid(f"unknown client message type {message.get('type')!r}")
    try:
        jsonschema.validate(message, schema)
    except jsonschema.ValidationError as exc:
        where = ".".join(str(p) for p in exc.absolute_path) or kind
        raise ClientMessageInvalid(f"{kind}: {where}: {exc.message}") from None
    return kind


def _resample(pcm: bytes, src: int, dst: int) -> bytes:
    """Linear resampling (good enough for a VAD and for synthetic speech)."""
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    count = len(samples) * dst // src
    if count == 0:
        return b""
    positions = np.arange(count) * (src / dst)
    resampled = np.interp(positions, np.arange(len(samples)), samples).astype("<i2")
    data: bytes = resampled.tobytes()
    return data


@dataclass
class FakeConversation:
    """What one connection did, for assertions."""

    index: int
    authorized: bool
    signed: bool = False
    initiation: Event = field(default_factory=dict)
    audio_ms_received: float = 0.0
    user_messages: list[str] = field(default_factory=list)
    contextual_updates: list[str] = field(default_factory=list)
    tool_calls: list[Event] = field(default_factory=list)
    tool_results: list[Event] = field(default_factory=list)
    pings: list[int] = field(default_factory=list)
    pongs: list[int] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)
    interruptions: list[int] = field(default_factory=list)
    corrections: list[tuple[str, str]] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    connected: bool = True
    close_code: int | None = None


class ElevenLabsFakeServer:
    """A real websocket server speaking the ElevenLabs agents protocol on loopback.

    `api_keys=None`: the agent is public. `agent_tools`: the client tools configured
    in the agent (None: every tool the script's rules name). `ping_interval_s`: how
    often each conversation is pinged.
    """

    def __init__(
        self,
        script: FakeScript | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        api_keys: set[str] | frozenset[str] | None = None,
        record: bool = True,
        *,
        agent_tools: Iterable[str] | None = None,
        ping_interval_s: float = 2.0,
        output_format: str = "pcm_16000",
    ) -> None:
        self.script = script if script is not None else FakeScript()
        self.host = host
        self.api_keys = None if api_keys is None else frozenset(api_keys)
        self.record = record
        self.agent_tools = None if agent_tools is None else frozenset(agent_tools)
        self.ping_interval_s = ping_interval_s
        self.output_format = output_format
        self.received: list[tuple[int, Event]] = []
        self.conversations: list[FakeConversation] = []
        self.signed_url_requests = 0
        self._signatures: set[str] = set()
        self._port = port
        self._server: Server | None = None
        self._connections: dict[int, _Conversation] = {}
        self._fail_auth = 0
        self._changed = asyncio.Condition()

    async def start(self) -> None:
        """Bind the endpoint (websocket and signed-URL HTTP on one port)."""
        self._server = await serve(
            self._handle_ws,
            self.host,
            self._port,
            process_request=self._process_request,
            max_size=None,
            compression=None,
            close_timeout=2,
        )
        logger.info("fake ElevenLabs agent %s on %s", AGENT_ID, self.url)

    async def stop(self) -> None:
        """Close every conversation and the endpoint."""
        if self._server is not None:
            self._server.close(close_connections=False)
            await self.close_all(1001, "server shutting down")
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> ElevenLabsFakeServer:
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
    def url(self) -> str:
        """``ws://HOST:PORT/v1/convai/conversation`` (the client adds ``?agent_id=``)."""
        if self._server is None:
            raise RuntimeError("server not started")
        port = next(iter(self._server.sockets)).getsockname()[1]
        return f"ws://{self.host}:{port}{CONVERSATION_PATH}"

    def realtime_config(self, api_key: str) -> dict[str, Any]:
        """The `realtime:` section that points harkd at this agent with `api_key`."""
        return {"provider": "elevenlabs", "url": self.url, "agent_id": AGENT_ID, "api_key": api_key}

    @property
    def audio_ms_received(self) -> float:
        """Microphone audio received so far, over all conversations, in milliseconds."""
        return sum(conversation.audio_ms_received for conversation in self.conversations)

    # ---- injection

    def fail_auth_next(self, n: int = 1) -> None:
        """Refuse the next `n` conversations (HTTP 403), whatever their credentials."""
        self._fail_auth += n

    async def drop_all(self) -> None:
        """Abort every connection (no close handshake) and wait for the cleanup."""
        connections = list(self._connections.values())
        for conn in connections:
            conn.ws.transport.abort()
        for conn in connections:
            await conn.closed.wait()

    async def close_all(self, code: int = 1000, reason: str = "") -> None:
        """Close every connection cleanly with `code` and `reason`."""
        connections = list(self._connections.values())
        await asyncio.gather(*(conn.ws.close(code, reason) for conn in connections))
        for conn in connections:
            await conn.closed.wait()

    async def send_event(self, event: Event, index: int | None = None) -> None:
        """Inject a raw server event into one conversation (`index`) or all."""
        targets = self._connections.values() if index is None else [self._connections[index]]
        for conn in list(targets):
            await conn.send(event)

    # ---- waiting helpers for tests

    def kinds(self, index: int | None = None) -> list[str]:
        """Kinds of the client messages received (``user_audio_chunk`` for audio)."""
        return [
            "user_audio_chunk" if "user_audio_chunk" in e else str(e.get("type"))
            for i, e in self.received
            if index is None or i == index
        ]

    async def wait_for(self, predicate: Any, *, timeout_s: float = 10.0) -> None:
        """Wait until `predicate()` holds (checked whenever something happened)."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(predicate)

    async def wait_for_conversations(
        self, count: int = 1, *, timeout_s: float = 10.0
    ) -> FakeConversation:
        """Wait until `count` conversations were opened; return the last one."""
        await self.wait_for(lambda: len(self.conversations) >= count, timeout_s=timeout_s)
        return self.conversations[count - 1]

    async def notify(self) -> None:
        """Wake the waiters (something changed)."""
        async with self._changed:
            self._changed.notify_all()

    # ---- HTTP and handshake

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        query = parse_qs(parts.query)
        if parts.path.rstrip("/") == SIGNED_URL_PATH:
            return self._signed_url(query, request.headers)
        if parts.path.rstrip("/") != CONVERSATION_PATH:
            return _json_response(404, {"detail": "Not Found"})
        if query.get("agent_id") != [AGENT_ID]:
            return _json_response(404, {"detail": {"status": "agent_not_found"}})
        if self._fail_auth > 0:
            self._fail_auth -= 1
            return self._refuse()
        if self.api_keys is not None:
            signature = query.get("conversation_signature", [""])[0]
            if signature not in self._signatures:
                return self._refuse()
        return None

    def _refuse(self) -> Response:
        self.conversations.append(FakeConversation(len(self.conversations), authorized=False))
        asyncio.get_running_loop().create_task(self.notify())
        return _json_response(403, {"detail": {"status": "authorization_failed"}})

    def _signed_url(self, query: Mapping[str, list[str]], headers: Headers) -> Response:
        self.signed_url_requests += 1
        key = headers.get("xi-api-key")
        if self.api_keys is not None and key not in self.api_keys:
            detail = {"status": "invalid_api_key", "message": "Invalid API key"}
            return _json_response(401, {"detail": detail})
        agent = query.get("agent_id", [""])[0]
        if agent != AGENT_ID:
            return _json_response(404, {"detail": {"status": "agent_not_found"}})
        signature = secrets.token_urlsafe(16)
        self._signatures.add(signature)
        params = urlencode({"agent_id": agent, "conversation_signature": signature})
        return _json_response(200, {"signed_url": f"{self.url}?{params}"})

    async def _handle_ws(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        signed = "conversation_signature" in ws.request.path
        state = FakeConversation(len(self.conversations), authorized=True, signed=signed)
        self.conversations.append(state)
        conn = _Conversation(self, ws, state)
        self._connections[state.index] = conn
        await self.notify()
        try:
            await conn.run()
        finally:
            del self._connections[state.index]
            state.connected = False
            state.close_code = ws.close_code
            conn.closed.set()
            await self.notify()

    async def keep(self, index: int, event: Event) -> None:
        """Keep a received client message (unless `record` is off)."""
        if self.record:
            self.received.append((index, event))
            await self.notify()


def _json_response(status: int, body: Mapping[str, Any]) -> Response:
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    reasons = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}
    return Response(status, reasons.get(status, "Error"), headers, data)


@dataclass
class _Speaking:
    """A reply the client is hearing: when it started, how long it lasts, its text."""

    event_id: int
    text: str
    started: float
    total_ms: float
    task: asyncio.Task[None] | None = None


class _Conversation:
    """One accepted websocket: initiation, audio in, replies out, pings."""

    def __init__(self, server: ElevenLabsFakeServer, ws: ServerConnection, state: FakeConversation):
        self.server = server
        self.ws = ws
        self.state = state
        self.script = server.script
        self.closed = asyncio.Event()
        self.vad = EnergyVad(0.02)
        self.speaking: _Speaking | None = None
        self.pending_tools: dict[str, asyncio.Future[Event]] = {}
        self._event_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Serve the conversation until the client goes away."""
        pinger = asyncio.create_task(self._ping(), name="fake-el-ping")
        try:
            async for message in self.ws:
                await self._on_message(message)
        except ConnectionClosed:
            pass
        finally:
            for task in (pinger, *self._tasks):
                task.cancel()
            await asyncio.gather(pinger, *self._tasks, return_exceptions=True)

    def _next_id(self) -> int:
        return next(self._event_ids)

    async def send(self, event: Event) -> None:
        """Send one server event."""
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(json.dumps(event))

    async def _ping(self) -> None:
        while True:
            await asyncio.sleep(self.server.ping_interval_s)
            if not self.state.initiation:
                continue
            event_id = self._next_id()
            self.state.pings.append(event_id)
            await self.send({"type": "ping", "ping_event": {"event_id": event_id, "ping_ms": 20}})

    async def _refuse(self, reason: str) -> None:
        self.state.invalid.append(reason)
        logger.info("conversation %d: %s", self.state.index, reason)
        error = {"code": CLOSE_POLICY, "message": reason, "error_type": "invalid_message"}
        await self.send({"type": "error", "error_event": error})
        await self.ws.close(CLOSE_POLICY, "invalid message")

    async def _on_message(self, message: str | bytes) -> None:
        try:
            event = json.loads(message)
            if not isinstance(event, dict):
                raise ClientMessageInvalid("a message must be a JSON object")
            await self.server.keep(self.state.index, event)
            kind = validate_client_message(event)
        except (ValueError, ClientMessageInvalid) as exc:
            await self._refuse(str(exc))
            return
        if not self.state.initiation and kind != "conversation_initiation_client_data":
            await self._refuse(f"{kind} before conversation_initiation_client_data")
            return
        await getattr(self, f"_on_{kind}")(event)
        await self.server.notify()

    async def _on_conversation_initiation_client_data(self, event: Event) -> None:
        self.state.initiation = event
        metadata = {
            "conversation_id": f"conv_{secrets.token_hex(8)}",
            "agent_output_audio_format": self.server.output_format,
            "user_input_audio_format": "pcm_16000",
        }
        await self.send(
            {
                "type": "conversation_initiation_metadata",
                "conversation_initiation_metadata_event": metadata,
            }
        )

    async def _on_pong(self, event: Event) -> None:
        if event["event_id"] not in self.state.pings:
            await self._refuse(f"pong for unknown ping {event['event_id']}")
            return
        self.state.pongs.append(event["event_id"])

    async def _on_user_activity(self, event: Event) -> None:
        pass

    async def _on_contextual_update(self, event: Event) -> None:
        self.state.contextual_updates.append(event["text"])

    async def _on_user_message(self, event: Event) -> None:
        text = event.get("text") or ""
        self.state.user_messages.append(text)
        await self._interrupt()
        self._start(self._answer(text))

    async def _on_client_tool_result(self, event: Event) -> None:
        self.state.tool_results.append(event)
        future = self.pending_tools.pop(event["tool_call_id"], None)
        if future is None:
            await self._refuse(f"no tool call {event['tool_call_id']!r} is waiting")
        elif not future.done():
            future.set_result(event)

    async def _on_user_audio_chunk(self, event: Event) -> None:
        pcm = base64.b64decode(event["user_audio_chunk"])
        self.state.audio_ms_received += len(pcm) / BYTES_PER_MS
        # EnergyVad works in 24 kHz frames.
        for boundary in self.vad.feed(_resample(pcm, RATE, 24_000)):
            if boundary.kind == "start":
                await self._interrupt()
            else:
                self._start(self._answer(self.script.next_transcript(0.0), spoken=True))

    # ---- replies

    def _start(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _heard(self) -> bool:
        speaking = self.speaking
        if speaking is None:
            return False
        return (time.monotonic() - speaking.started) * 1000 < speaking.total_ms

    async def _interrupt(self) -> None:
        """The user talks over a reply still being heard: cut it, correct its text."""
        speaking, heard = self.speaking, self._heard()
        self.speaking = None
        if speaking is None or not heard:
            return
        if speaking.task is not None:
            speaking.task.cancel()
        self.state.interruptions.append(speaking.event_id)
        await self.send(
            {"type": "interruption", "interruption_event": {"event_id": speaking.event_id}}
        )
        heard_ms = (time.monotonic() - speaking.started) * 1000
        for _ in range(IN_FLIGHT_CHUNKS):  # already on their way: the client drops them
            await self._send_audio(speaking.event_id, synthesize_speech(100))
        words = speaking.text.split()
        said = " ".join(words[: int(len(words) * heard_ms / speaking.total_ms)])
        self.state.corrections.append((speaking.text, said))
        correction = {
            "original_agent_response": speaking.text,
            "corrected_agent_response": said,
            "event_id": speaking.event_id,
        }
        await self.send(
            {"type": "agent_response_correction", "agent_response_correction_event": correction}
        )

    async def _answer(self, text: str, *, spoken: bool = False) -> None:
        if spoken:
            event = {"user_transcript": text, "event_id": self._next_id()}
            await self.send({"type": "user_transcript", "user_transcription_event": event})
        outputs: list[tuple[str, str]] = []
        for name, arguments in self.script.calls_for(text):
            if self.server.agent_tools is not None and name not in self.server.agent_tools:
                continue
            outputs.append((name, await self._call(name, arguments)))
        reply = self.script.reply_after_tools(outputs) if outputs else self.script.reply_text(text)
        await self._reply(reply)

    async def _call(self, name: str, arguments: Mapping[str, Any]) -> str:
        call_id = f"toolu_{secrets.token_hex(8)}"
        future: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self.pending_tools[call_id] = future
        call = {
            "tool_name": name,
            "tool_call_id": call_id,
            "parameters": dict(arguments),
            "event_id": self._next_id(),
        }
        self.state.tool_calls.append(call)
        await self.send({"type": "client_tool_call", "client_tool_call": call})
        result = await future
        return str(result["result"])

    async def _reply(self, text: str) -> None:
        event_id = self._next_id()
        total_ms = max(100.0, len(text) * self.script.audio_ms_per_char)
        self.state.replies.append(text)
        speaking = _Speaking(event_id, text, time.monotonic(), total_ms, asyncio.current_task())
        self.speaking = speaking
        response = {"agent_response": text, "event_id": event_id}
        await self.send({"type": "agent_response", "agent_response_event": response})
        delta_ms = max(10, self.script.delta_ms)
        pcm = synthesize_speech(total_ms)
        chunk = int(delta_ms * 24) * 2  # synthesize_speech is 24 kHz
        for start in range(0, len(pcm), chunk):
            await self._send_audio(event_id, pcm[start : start + chunk])
            pace = self.script.pace
            await asyncio.sleep(delta_ms / 1000 / pace if pace > 0 else 0)

    async def _send_audio(self, event_id: int, pcm24: bytes) -> None:
        audio = base64.b64encode(_resample(pcm24, 24_000, RATE)).decode()
        await self.send(
            {"type": "audio", "audio_event": {"audio_base_64": audio, "event_id": event_id}}
        )
