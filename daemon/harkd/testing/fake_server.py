"""A fake OpenAI Realtime (GA) server: a real websocket server on loopback.

Used by the tests, the benchmarks and ``harkd demo`` in place of the cloud. It speaks
the GA protocol (see PROTOCOL.md) wherever the daemon depends on it:

* auth by ``Authorization: Bearer`` (standard keys or ephemeral ``ek_`` keys minted by
  the HTTP endpoint); a bad key gets an ``error`` event and close code 3000;
* ``session.created`` first, ``session.update`` merged into the effective config and
  answered by ``session.updated``; with ``strict`` every client event is validated
  against the ``openai`` package's models (unknown or beta-shaped keys are rejected);
* input audio buffer with manual commits (``input_audio_buffer_commit_empty`` under
  100 ms) and an energy-based server VAD (speech_started / speech_stopped / auto
  commit / auto response / server-side cancel on barge-in);
* scripted responses: function calls by regex rules (several in parallel if asked),
  otherwise an assistant message with synthesized PCM16 audio faster than real time
  (or paced) interleaved with transcript deltas, or text only;
* ``response.cancel``, ``conversation.item.truncate`` checked against the audio
  actually sent, ``conversation.item.delete``, a maximum session length (close 1001),
  injectable drops and errors.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import copy
import itertools
import json
import logging
import math
import re
import secrets
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .secrets_http import HttpReply, HttpRequest, SecretsHttpServer
from .validation import ClientEventInvalid, validate_client_event

logger = logging.getLogger(__name__)

__all__ = [
    "FakeRealtimeServer",
    "FakeScript",
    "FakeSession",
    "ToolRule",
    "main",
    "synthesize_speech",
]

Event = dict[str, Any]

SAMPLE_RATE = 24_000
BYTES_PER_MS = SAMPLE_RATE * 2 // 1000  # PCM16 mono: 48 bytes per ms
MIN_COMMIT_MS = 100.0
REALTIME_PATH = "/v1/realtime"
SECRETS_PATH = "/v1/realtime/client_secrets"
DEFAULT_MODEL = "gpt-realtime"
DEFAULT_VOICE = "marin"
CLOSE_INVALID_KEY = 3000
CLOSE_GOING_AWAY = 1001

_SERVER_VAD_DEFAULTS: dict[str, Any] = {
    "type": "server_vad",
    "threshold": 0.5,
    "prefix_padding_ms": 300,
    "silence_duration_ms": 500,
    "idle_timeout_ms": None,
    "create_response": True,
    "interrupt_response": True,
}
_SEMANTIC_VAD_DEFAULTS: dict[str, Any] = {
    "type": "semantic_vad",
    "eagerness": "auto",
    "create_response": True,
    "interrupt_response": True,
}
# Semantic VAD is modelled as energy VAD with an eagerness-dependent end of turn.
_EAGERNESS_SILENCE_MS = {"low": 1000, "medium": 600, "auto": 600, "high": 300}
# Keys whose value replaces the current one wholesale on session.update.
_REPLACED_KEYS = frozenset({"tools", "turn_detection", "transcription", "format", "tool_choice"})


# --------------------------------------------------------------------------- script


def _default_reply(user_text: str) -> str:
    return f"You said: {user_text}" if user_text else "Hello! How can I help?"


@dataclass
class ToolRule:
    """A scripted function call: when ``pattern`` matches the user's latest text.

    Either a single call (``name`` + ``arguments``) or several parallel calls
    (``calls=[(name, arguments), ...]``). ``arguments`` may be a callable taking the
    regex match. Several matching rules also produce parallel calls. The model only
    calls tools the session (or the response) declares, like the real one.
    """

    pattern: str
    name: str | None = None
    arguments: Mapping[str, Any] | Callable[[re.Match[str]], Mapping[str, Any]] = field(
        default_factory=dict
    )
    calls: Sequence[tuple[str, Mapping[str, Any]]] = ()
    flags: int = re.IGNORECASE

    def __post_init__(self) -> None:
        if (self.name is None) == (not self.calls):
            raise ValueError("ToolRule needs exactly one of name= or calls=")

    def match(self, text: str) -> list[tuple[str, Mapping[str, Any]]]:
        """The calls this rule makes for ``text`` (empty when it does not match)."""
        found = re.search(self.pattern, text, self.flags)
        if found is None:
            return []
        if self.calls:
            return list(self.calls)
        arguments = self.arguments(found) if callable(self.arguments) else self.arguments
        assert self.name is not None
        return [(self.name, arguments)]


@dataclass
class FakeScript:
    """What the fake "model" hears and says.

    ``user_transcripts`` is a queue shared by all connections: each committed audio turn
    takes the next one (default ``"(speech 1.2 s)"``). ``reply`` gives the assistant's
    text (a string or ``user_text -> str``); after function outputs the reply is
    ``tool_reply(outputs)`` (default ``"get_time returned {...}"``). Audio lasts
    ``audio_ms_per_char`` per character, in ``delta_ms`` chunks, sent as fast as possible
    (``pace=0``) or ``pace`` times faster than real time. ``late_transcripts`` delivers
    input transcriptions after the next response is done (as the real service may).
    ``reply_for_instructions``, when set, answers a ``response.create`` that carries its own
    ``instructions`` (e.g. "say: the timer is done") instead of ``reply``.
    """

    user_transcripts: list[str] = field(default_factory=list)
    tool_rules: list[ToolRule] = field(default_factory=list)
    reply: str | Callable[[str], str] = _default_reply
    tool_reply: Callable[[list[tuple[str, str]]], str] | None = None
    audio_ms_per_char: float = 60.0
    delta_ms: int = 100
    pace: float = 0.0
    late_transcripts: bool = False
    reply_for_instructions: Callable[[str], str] | None = None
    speak: Callable[[str], bytes] | None = None
    """The answer's audio for its text (PCM16 24 kHz, e.g. espeak-ng); None: vowel-like
    synthesized sound of ``audio_ms_per_char`` per character."""

    def next_transcript(self, audio_ms: float) -> str:
        """Pop the next scripted user transcript (or describe the audio)."""
        if self.user_transcripts:
            return self.user_transcripts.pop(0)
        return f"(speech {audio_ms / 1000:.1f} s)"

    def reply_text(self, user_text: str) -> str:
        """The assistant's answer to ``user_text``."""
        return self.reply(user_text) if callable(self.reply) else self.reply

    def reply_after_tools(self, outputs: list[tuple[str, str]]) -> str:
        """The assistant's answer once function outputs ``[(name, output)]`` are in."""
        if self.tool_reply is not None:
            return self.tool_reply(outputs)
        return "; ".join(f"{name} returned {output}" for name, output in outputs)

    def calls_for(self, text: str) -> list[tuple[str, Mapping[str, Any]]]:
        """All calls of all rules matching ``text``, in rule order."""
        return [call for rule in self.tool_rules for call in rule.match(text)]


# --------------------------------------------------------------------------- audio


def synthesize_speech(
    duration_ms: float, *, amplitude: float = 0.3, start_sample: int = 0
) -> bytes:
    """A vowel-like PCM16 24 kHz mono signal: harmonics of ~140 Hz, syllable rhythm.

    Peak ``amplitude`` of full scale; never silent (a VAD or level meter sees it all).
    ``start_sample`` keeps the waveform continuous across chunks.
    """
    count = round(duration_ms * SAMPLE_RATE / 1000)
    t = (np.arange(count, dtype=np.float64) + start_sample) / SAMPLE_RATE
    f0 = 140.0 + 15.0 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE + 2 * np.pi * 140.0 * start_sample / SAMPLE_RATE
    wave = sum(w * np.sin(k * phase) for k, w in ((1, 1.0), (2, 0.6), (3, 0.45), (5, 0.25)))
    envelope = 0.75 + 0.25 * np.sin(2 * np.pi * 4.0 * t)  # ~4 syllables a second
    signal_ = np.asarray(wave, dtype=np.float64) * envelope / 1.6
    pcm = np.clip(signal_ * amplitude * 32767, -32768, 32767).astype("<i2")
    return pcm.tobytes()


def _pcm_ms(data: bytes, format_type: str) -> float:
    if format_type in ("audio/pcmu", "audio/pcma"):
        return len(data) / 8.0
    return len(data) / BYTES_PER_MS


@dataclass
class VadEvent:
    """A speech boundary found by :class:`EnergyVad` (``ms`` since session audio start)."""

    kind: Literal["start", "stop"]
    ms: int


class EnergyVad:
    """Energy VAD over PCM16 (at `rate` Hz) in 10 ms frames: I/O free, fed incrementally.

    Speech starts after ``start_ms`` of consecutive frames above ``rms_threshold`` (full
    scale 1.0); it stops after ``silence_ms`` of frames below. ``audio_start_ms`` is the
    onset of the run; ``audio_end_ms`` includes the silence, as the real service reports.
    """

    FRAME_MS = 10

    def __init__(
        self,
        rms_threshold: float,
        *,
        start_ms: int = 60,
        silence_ms: int = 500,
        rate: int = SAMPLE_RATE,
    ) -> None:
        self.rms_threshold = rms_threshold
        self.bytes_per_ms = rate * 2 // 1000
        self.start_ms = start_ms
        self.silence_ms = silence_ms
        self.in_speech = False
        self.position_ms = 0
        self._run_ms = 0
        self._run_start_ms = 0
        self._pending = b""

    def reset(self) -> None:
        """Forget any speech in progress (the buffer was cleared or committed)."""
        self.in_speech = False
        self._run_ms = 0

    def feed(self, pcm: bytes) -> list[VadEvent]:
        """Consume PCM16 bytes; return the boundaries they complete."""
        frame_bytes = self.FRAME_MS * self.bytes_per_ms
        data = self._pending + pcm
        usable = len(data) - len(data) % frame_bytes
        self._pending = data[usable:]
        events: list[VadEvent] = []
        if usable == 0:
            return events
        frames = np.frombuffer(data[:usable], dtype="<i2").astype(np.float64) / 32768.0
        rms = np.sqrt(np.mean(frames.reshape(-1, frame_bytes // 2) ** 2, axis=1))
        for level in rms:
            event = self._step(bool(level >= self.rms_threshold))
            if event is not None:
                events.append(event)
        return events

    def _step(self, loud: bool) -> VadEvent | None:
        self.position_ms += self.FRAME_MS
        if loud != self.in_speech:
            if self._run_ms == 0:
                self._run_start_ms = self.position_ms - self.FRAME_MS
            self._run_ms += self.FRAME_MS
        else:
            self._run_ms = 0
        if not self.in_speech and self._run_ms >= self.start_ms:
            self.in_speech, self._run_ms = True, 0
            return VadEvent("start", self._run_start_ms)
        if self.in_speech and self._run_ms >= self.silence_ms:
            self.in_speech, self._run_ms = False, 0
            return VadEvent("stop", self.position_ms)
        return None


# --------------------------------------------------------------------------- state


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


@dataclass
class FakeSession:
    """What one connection did, for assertions. ``index`` is its position in
    :attr:`FakeRealtimeServer.sessions` (and the first element of ``received``)."""

    index: int
    model: str
    authorized: bool
    config: dict[str, Any] = field(default_factory=dict)
    items: list[Event] = field(default_factory=list)
    commits: int = 0
    auto_commits: int = 0
    commit_errors: int = 0
    response_creates: int = 0
    responses: list[Event] = field(default_factory=list)
    cancels: int = 0
    server_cancels: int = 0
    audio_ms_received: float = 0.0
    audio_ms_sent: float = 0.0
    truncations: list[Event] = field(default_factory=list)
    speech_segments: list[tuple[int, int]] = field(default_factory=list)
    errors_sent: list[Event] = field(default_factory=list)
    connected: bool = True
    close_code: int | None = None

    def item(self, item_id: str) -> Event | None:
        """The conversation item with this id, if present."""
        return next((it for it in self.items if it.get("id") == item_id), None)


@dataclass
class _ItemMeta:
    user_text: str | None = None
    audio_ms_sent: float = 0.0
    audio_item: bool = False


@dataclass
class _Response:
    id: str
    params: Mapping[str, Any]
    in_conversation: bool
    output: list[Event] = field(default_factory=list)
    task: asyncio.Task[None] | None = None


@dataclass
class _Secret:
    expires_at: float
    session: dict[str, Any]


class _ProtocolError(Exception):
    """A client mistake answered with an ``error`` event; the session goes on."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


# --------------------------------------------------------------------------- server


class FakeRealtimeServer:
    """A real websocket server speaking the OpenAI Realtime GA protocol on loopback.

    ``api_keys=None`` accepts any key. ``port=0`` picks a free port (see :attr:`url`).
    ``max_session_s`` closes each session with 1001 after that long (the real limit is
    60 minutes). ``strict`` validates every client event against the ``openai`` models.
    ``record=False`` keeps :attr:`received` empty (long-running demos). ``clock`` is the
    wall clock used for ephemeral key expiry (injectable for tests).

    A provider that speaks OpenAI's events with its own differences (xAI Grok, Azure)
    gets its fake by subclassing and overriding the class attributes, the few hooks
    under "provider differences" and ``mint_secret`` (see ``fake_dialects``).
    """

    provider = "openai"
    """The ``realtime.provider`` this fake stands in for."""
    realtime_path = REALTIME_PATH
    secrets_path = SECRETS_PATH
    default_model = DEFAULT_MODEL
    default_voice = DEFAULT_VOICE
    rejects_at_handshake = False
    """A bad key gets HTTP 401 instead of an ``error`` event and close 3000."""

    def __init__(
        self,
        script: FakeScript | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        api_keys: set[str] | frozenset[str] | None = None,
        max_session_s: float | None = None,
        strict: bool = True,
        *,
        http_port: int = 0,
        record: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.script = script if script is not None else FakeScript()
        self.host = host
        self.api_keys = None if api_keys is None else frozenset(api_keys)
        self.max_session_s = max_session_s
        self.strict = strict
        self.record = record
        self.clock = clock
        self.received: list[tuple[int, Event]] = []
        self.sessions: list[FakeSession] = []
        self.errors_sent: list[Event] = []
        self.truncations: list[Event] = []
        self.secrets: dict[str, _Secret] = {}
        self._port = port
        self._http = SecretsHttpServer(self._handle_http, host, http_port)
        self._ws_server: Server | None = None
        self._connections: dict[int, _Connection] = {}
        self._fail_auth = 0
        self._changed = asyncio.Condition()

    # ---- lifecycle

    async def start(self) -> None:
        """Bind the websocket and HTTP endpoints."""
        self._ws_server = await serve(
            self._handle_ws,
            self.host,
            self._port,
            process_request=self._process_request,
            max_size=None,
            compression=None,
            close_timeout=2,
        )
        await self._http.start()
        logger.info("fake realtime server on %s (secrets: %s)", self.url, self.http_url)

    async def stop(self) -> None:
        """Close every session (1001) and both endpoints; wait until all is down."""
        if self._ws_server is not None:
            self._ws_server.close(close_connections=False)
            await self.close_all(CLOSE_GOING_AWAY, "server shutting down")
            await self._ws_server.wait_closed()
            self._ws_server = None
        await self._http.stop()

    async def __aenter__(self) -> FakeRealtimeServer:
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
        """The websocket port actually bound."""
        if self._ws_server is None:
            raise RuntimeError("server not started")
        port: int = next(iter(self._ws_server.sockets)).getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """``ws://HOST:PORT/v1/realtime`` (the daemon adds ``?model=``)."""
        return f"ws://{self.host}:{self.port}{self.realtime_path}"

    @property
    def http_url(self) -> str:
        """Base URL of the HTTP endpoint: POST ``{http_url}{secrets_path}``."""
        return f"http://{self.host}:{self._http.port}"

    @property
    def api_base(self) -> str:
        """``{http_url}/v1``: usable as the ``openai`` SDK's ``base_url``."""
        return f"{self.http_url}/v1"

    def realtime_config(self, api_key: str) -> dict[str, Any]:
        """The `realtime:` section that points harkd at this server with `api_key`."""
        return {"provider": self.provider, "url": self.url, "api_key": api_key}

    # ---- provider differences (hooks a subclass overrides)

    def credential(self, headers: Headers) -> str | None:
        """The key a websocket handshake presents."""
        return _bearer(headers)

    def http_credential(self, headers: Mapping[str, str]) -> str | None:
        """The key a client-secrets request presents (lower-cased header names)."""
        return _bearer_value(headers.get("authorization"))

    def validate_event(self, event: Event) -> None:
        """Raise ``ClientEventInvalid`` for a client event the real service rejects."""
        validate_client_event(event)

    def session_from_wire(self, session: Event) -> Event:
        """A ``session.update``'s session as the GA shape this fake keeps internally."""
        return session

    def session_to_wire(self, config: Event) -> Event:
        """The internal GA session as the provider reports it."""
        return config

    def greeting(self, config: Event) -> Event:
        """The first server event of a connection."""
        return {"type": "session.created", "session": self.session_to_wire(config)}

    @property
    def audio_ms_received(self) -> float:
        """Microphone audio received so far, over all sessions, in milliseconds."""
        return sum(session.audio_ms_received for session in self.sessions)

    # ---- injection

    def fail_auth_next(self, n: int = 1) -> None:
        """Reject the next ``n`` connections as if their key were invalid."""
        self._fail_auth += n

    async def drop_all(self) -> None:
        """Abort every connection's transport (no close handshake) and wait for cleanup."""
        connections = list(self._connections.values())
        for conn in connections:
            conn.ws.transport.abort()
        for conn in connections:
            await conn.closed.wait()

    async def close_all(self, code: int = CLOSE_GOING_AWAY, reason: str = "") -> None:
        """Close every connection cleanly with ``code`` and ``reason``."""
        connections = list(self._connections.values())
        await asyncio.gather(*(conn.ws.close(code, reason) for conn in connections))
        for conn in connections:
            await conn.closed.wait()

    async def send_error(
        self,
        code: str,
        message: str,
        *,
        error_type: str = "server_error",
        index: int | None = None,
    ) -> None:
        """Inject an ``error`` event into one connection (``index``) or all."""
        for conn in self._targets(index):
            await conn.send_error(code, message, error_type=error_type)

    async def send_event(self, event: Mapping[str, Any], index: int | None = None) -> None:
        """Inject a raw server event (an ``event_id`` is added when missing)."""
        for conn in self._targets(index):
            await conn.send(dict(event))

    async def send_raw(self, frame: str | bytes, index: int | None = None) -> None:
        """Inject a frame exactly as given: garbage a broken server or proxy might send
        (not JSON, a JSON array, a binary frame, an event with missing fields)."""
        for conn in self._targets(index):
            await conn.ws.send(frame)

    def stall(self, index: int | None = None) -> None:
        """Stop reading from a connection: the client's pings go unanswered, as behind
        a dead NAT mapping, until its ping timeout fires."""
        for conn in self._targets(index):
            conn.ws.transport.pause_reading()

    def _targets(self, index: int | None) -> list[_Connection]:
        if index is None:
            return list(self._connections.values())
        return [self._connections[index]] if index in self._connections else []

    # ---- waiting helpers for tests

    async def wait_for_client_event(
        self, event_type: str, *, count: int = 1, timeout_s: float = 5.0
    ) -> Event:
        """Wait until ``count`` client events of ``event_type`` were received; return the last."""

        def found() -> list[Event]:
            return [ev for _, ev in self.received if ev.get("type") == event_type]

        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: len(found()) >= count)
        return found()[count - 1]

    async def wait_for_sessions(self, count: int = 1, *, timeout_s: float = 5.0) -> FakeSession:
        """Wait until ``count`` connections have been accepted; return the last one."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: len(self.sessions) >= count)
        return self.sessions[count - 1]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # ---- auth

    def _key_ok(self, key: str | None) -> tuple[bool, dict[str, Any] | None, str]:
        """(accepted, session overrides of an ephemeral key, reason if rejected)."""
        if self._fail_auth > 0:
            self._fail_auth -= 1
            return False, None, "Incorrect API key provided."
        if key is not None and key in self.secrets:
            secret = self.secrets[key]
            if self.clock() >= secret.expires_at:
                return False, None, "Ephemeral key expired."
            return True, secret.session, ""
        if self.api_keys is None or (key is not None and key in self.api_keys):
            return True, None, ""
        return False, None, "Incorrect API key provided."

    # ---- websocket

    async def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path.rstrip("/") != self.realtime_path:
            return ws.respond(404, "Not Found\n")
        if not self.rejects_at_handshake:
            return None
        accepted, _, reason = self._key_ok(self.credential(request.headers))
        if accepted:
            return None
        session = FakeSession(index=len(self.sessions), model="", authorized=False, connected=False)
        self.sessions.append(session)
        await self._notify()
        logger.info("connection %d refused at the handshake: %s", session.index, reason)
        return ws.respond(401, f"{reason}\n")

    async def _handle_ws(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        query = parse_qs(urlsplit(ws.request.path).query)
        model = query.get("model", [self.default_model])[0]
        accepted, overrides, reason = self._key_ok(self.credential(ws.request.headers))
        session = FakeSession(index=len(self.sessions), model=model, authorized=accepted)
        self.sessions.append(session)
        await self._notify()
        if not accepted:
            await self._reject(ws, session, reason)
            return
        conn = _Connection(self, ws, session, overrides)
        self._connections[session.index] = conn
        try:
            await conn.run()
        finally:
            del self._connections[session.index]
            session.connected = False
            session.close_code = ws.close_code
            conn.closed.set()
            await self._notify()

    async def _reject(self, ws: ServerConnection, session: FakeSession, reason: str) -> None:
        error = _error_event("invalid_request_error", "invalid_api_key", reason)
        self.errors_sent.append(error)
        session.errors_sent.append(error)
        try:
            await ws.send(json.dumps(error))
            await ws.close(CLOSE_INVALID_KEY, f"invalid_api_key: {reason}")
        except ConnectionClosed:
            pass
        session.connected = False
        session.close_code = CLOSE_INVALID_KEY
        logger.info("connection %d rejected: %s", session.index, reason)
        await self._notify()

    async def _record(self, index: int, event: Event) -> None:
        if self.record:
            self.received.append((index, event))
            await self._notify()

    # ---- HTTP: ephemeral keys

    async def _handle_http(self, request: HttpRequest) -> HttpReply:
        if request.path.rstrip("/") != self.secrets_path:
            return HttpReply(404, _http_error("Not found", "invalid_request_error", None))
        if request.method != "POST":
            return HttpReply(405, _http_error("Method not allowed", "invalid_request_error", None))
        key = self.http_credential(request.headers)
        if self.api_keys is not None and key not in self.api_keys:
            message = "Incorrect API key provided."
            return HttpReply(401, _http_error(message, "invalid_request_error", "invalid_api_key"))
        try:
            body = json.loads(request.body or b"{}")
            return HttpReply(200, self.mint_secret(body))
        except (ValueError, TypeError, _ProtocolError) as exc:
            param = exc.param if isinstance(exc, _ProtocolError) else None
            error = _http_error(str(exc), "invalid_request_error", "invalid_value")
            error["error"]["param"] = param
            return HttpReply(400, error)

    def mint_secret(self, body: Any) -> dict[str, Any]:
        """A client-secrets request body -> the reply (a provider hook; raises
        ``ValueError``, ``TypeError`` or a protocol error for a request it refuses)."""
        if not isinstance(body, dict):
            raise TypeError("body must be a JSON object")
        seconds = body.get("expires_after", {}).get("seconds", 600)
        if not isinstance(seconds, int) or not 10 <= seconds <= 7200:
            raise _ProtocolError(
                "invalid_value", "expires_after.seconds must be 10..7200", "expires_after.seconds"
            )
        requested = body.get("session") or {"type": "realtime"}
        if requested.get("type") != "realtime":
            raise _ProtocolError("invalid_value", "session.type must be 'realtime'", "session.type")
        if self.strict:
            try:
                self.validate_event({"type": "session.update", "session": requested})
            except ClientEventInvalid as exc:
                raise _ProtocolError(exc.code, exc.message, exc.param) from exc
        expires_at, value = self._new_secret(seconds, requested)
        model = requested.get("model") or self.default_model
        session = _merge_session(self.default_session(model, expires_at), requested)
        return {"value": value, "expires_at": expires_at, "session": session}

    def _new_secret(self, seconds: int, session: dict[str, Any]) -> tuple[int, str]:
        """Remember a new client secret for ``session`` overrides; (expires_at, value)."""
        expires_at = int(self.clock()) + seconds
        value = f"ek_{secrets.token_hex(16)}"
        self.secrets[value] = _Secret(expires_at, copy.deepcopy(session))
        return expires_at, value

    def default_session(self, model: str, expires_at: int) -> Event:
        """A new connection's session (GA shape) before any ``session.update``."""
        return _default_session(model, expires_at, self.default_voice)


# --------------------------------------------------------------------------- connection


class _Connection:
    """One accepted websocket: session config, conversation, input buffer, responses."""

    def __init__(
        self,
        server: FakeRealtimeServer,
        ws: ServerConnection,
        session: FakeSession,
        overrides: dict[str, Any] | None,
    ) -> None:
        self.server = server
        self.ws = ws
        self.state = session
        self.script = server.script
        self.closed = asyncio.Event()
        model = (overrides or {}).get("model") or session.model
        session.model = model
        expires_in = server.max_session_s if server.max_session_s is not None else 3600
        session.config = server.default_session(model, int(server.clock() + expires_in))
        if overrides:
            session.config = _merge_session(session.config, overrides)
        self.meta: dict[str, _ItemMeta] = {}
        self.buffer_ms = 0.0
        self.buffer_item_id: str | None = None
        self.vad: EnergyVad | None = self._make_vad(None)
        self.speech_start_ms = 0
        self.active: _Response | None = None
        self.audio_started = False
        self.late: list[tuple[str, str]] = []
        self._event_ids = itertools.count(1)
        self._event_prefix = f"event_{secrets.token_hex(6)}"

    # ---- plumbing

    async def run(self) -> None:
        """Serve the session until the client goes away or the session expires."""
        expiry: asyncio.Task[None] | None = None
        if self.server.max_session_s is not None:
            expiry = asyncio.create_task(self._expire(self.server.max_session_s), name="expiry")
        try:
            await self.send(self.server.greeting(self.state.config))
            async for message in self.ws:
                await self._on_message(message)
        except ConnectionClosed:
            pass
        finally:
            for task in (expiry, self.active.task if self.active else None):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.wait([task])
            logger.info("connection %d closed (%s)", self.state.index, self.ws.close_code)

    async def _expire(self, after_s: float) -> None:
        await asyncio.sleep(after_s)
        message = f"Your session hit the maximum duration of {after_s:g} seconds."
        try:
            await self.send_error("session_expired", message, error_type="invalid_request_error")
            await self.ws.close(CLOSE_GOING_AWAY, f"max duration reached: {message}")
        except ConnectionClosed:
            pass

    async def send(self, event: Event) -> None:
        """Send one server event (adding ``event_id``)."""
        event.setdefault("event_id", f"{self._event_prefix}{next(self._event_ids):06d}")
        if event["type"] == "error":
            self.server.errors_sent.append(event)
            self.state.errors_sent.append(event)
        await self.ws.send(json.dumps(event))

    async def send_error(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        event_id: str | None = None,
        error_type: str = "invalid_request_error",
    ) -> None:
        """Send an ``error`` event (the session stays open)."""
        logger.debug("connection %d error %s: %s", self.state.index, code, message)
        await self.send(_error_event(error_type, code, message, param, event_id))

    async def _on_message(self, message: str | bytes) -> None:
        try:
            event = json.loads(message)
        except ValueError:
            await self.send_error("invalid_json", "The server could not parse the JSON payload.")
            return
        if not isinstance(event, dict):
            await self.send_error("invalid_json", "Event must be a JSON object.")
            return
        await self.server._record(self.state.index, event)
        event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        try:
            self._validate(event)
            handler = self._handlers().get(event["type"])
            if handler is None:
                raise _ProtocolError("invalid_value", f"Unsupported event type '{event['type']}'.")
            await handler(event)
        except _ProtocolError as exc:
            await self.send_error(exc.code, exc.message, param=exc.param, event_id=event_id)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            # Only reachable without strict validation: a malformed event.
            logger.debug("malformed %s event: %r", event.get("type"), exc)
            await self.send_error("invalid_value", f"Malformed event: {exc!r}", event_id=event_id)

    def _validate(self, event: Event) -> None:
        if not self.server.strict:
            if not isinstance(event.get("type"), str):
                raise _ProtocolError("missing_required_parameter", "Missing 'type'.", "type")
            return
        try:
            self.server.validate_event(event)
        except ClientEventInvalid as exc:
            raise _ProtocolError(exc.code, exc.message, exc.param) from exc

    def _handlers(self) -> dict[str, Callable[[Event], Any]]:
        return {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": self._client_commit,
            "input_audio_buffer.clear": self._clear,
            "conversation.item.create": self._item_create,
            "conversation.item.retrieve": self._item_retrieve,
            "conversation.item.truncate": self._item_truncate,
            "conversation.item.delete": self._item_delete,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
            "output_audio_buffer.clear": self._output_buffer_clear,
        }

    # ---- session

    async def _session_update(self, event: Event) -> None:
        update = self.server.session_from_wire(event["session"])
        if update.get("type") != "realtime":
            raise _ProtocolError(
                "invalid_value", "Only 'realtime' sessions are supported here.", "session.type"
            )
        if "model" in update and update["model"] != self.state.model:
            raise _ProtocolError("invalid_value", "The model cannot be changed.", "session.model")
        modalities = update.get("output_modalities")
        if modalities is not None and len(modalities) != 1:
            raise _ProtocolError(
                "invalid_value",
                "output_modalities must be ['audio'] or ['text'].",
                "session.output_modalities",
            )
        voice = update.get("audio", {}).get("output", {}).get("voice")
        if voice is not None and self.audio_started and voice != self._voice():
            raise _ProtocolError(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.",
                "session.audio.output.voice",
            )
        self.state.config = _merge_session(self.state.config, update)
        self.vad = self._make_vad(self.vad)
        await self.send(
            {"type": "session.updated", "session": self.server.session_to_wire(self.state.config)}
        )

    def _voice(self) -> Any:
        return self.state.config["audio"]["output"].get("voice")

    def _turn_detection(self) -> dict[str, Any] | None:
        value: dict[str, Any] | None = self.state.config["audio"]["input"].get("turn_detection")
        return value

    def _make_vad(self, old: EnergyVad | None) -> EnergyVad | None:
        td = self._turn_detection()
        if td is None:
            return None
        threshold = float(td.get("threshold") or 0.5)
        if td["type"] == "semantic_vad":
            silence_ms = _EAGERNESS_SILENCE_MS.get(td.get("eagerness") or "auto", 600)
        else:
            silence_ms = int(td.get("silence_duration_ms") or 500)
        vad = EnergyVad(0.04 * threshold, silence_ms=silence_ms)
        if old is not None:  # keep the session's audio clock running
            vad.position_ms = old.position_ms
        return vad

    # ---- input audio

    async def _append(self, event: Event) -> None:
        try:
            pcm = base64.b64decode(event["audio"], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _ProtocolError("invalid_value", "Invalid base64 audio.", "audio") from exc
        format_type = self.state.config["audio"]["input"]["format"].get("type", "audio/pcm")
        ms = _pcm_ms(pcm, format_type)
        self.state.audio_ms_received += ms
        self.buffer_ms += ms
        if self.vad is None or format_type != "audio/pcm":
            return
        for vad_event in self.vad.feed(pcm):
            if vad_event.kind == "start":
                await self._speech_started(vad_event.ms)
            else:
                await self._speech_stopped(vad_event.ms)

    async def _speech_started(self, onset_ms: int) -> None:
        td = self._turn_detection() or {}
        # Like the real service, audio_start_ms includes the prefix padding.
        audio_start_ms = max(0, onset_ms - int(td.get("prefix_padding_ms") or 0))
        self.buffer_item_id = _new_id("item")
        await self.send(
            {
                "type": "input_audio_buffer.speech_started",
                "audio_start_ms": audio_start_ms,
                "item_id": self.buffer_item_id,
            }
        )
        if self.active is not None and td.get("interrupt_response", True):
            self.state.server_cancels += 1
            await self._cancel_active("turn_detected")
        self.speech_start_ms = audio_start_ms

    async def _speech_stopped(self, audio_end_ms: int) -> None:
        item_id = self.buffer_item_id or _new_id("item")
        await self.send(
            {
                "type": "input_audio_buffer.speech_stopped",
                "audio_end_ms": audio_end_ms,
                "item_id": item_id,
            }
        )
        self.state.speech_segments.append((self.speech_start_ms, audio_end_ms))
        if self.buffer_ms < MIN_COMMIT_MS:
            return
        await self._commit(item_id)
        self.state.auto_commits += 1
        td = self._turn_detection() or {}
        if td.get("create_response", True) and self.active is None:
            await self._start_response({})

    async def _client_commit(self, event: Event) -> None:
        if self.buffer_ms < MIN_COMMIT_MS:
            self.state.commit_errors += 1
            raise _ProtocolError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"100ms of audio, but buffer only has {self.buffer_ms:.2f}ms of audio.",
            )
        await self._commit(self.buffer_item_id or _new_id("item"))
        self.state.commits += 1

    async def _commit(self, item_id: str) -> None:
        audio_ms = self.buffer_ms
        self.buffer_ms, self.buffer_item_id = 0.0, None
        if self.vad is not None:
            self.vad.reset()
        previous = self._last_item_id()
        await self.send(
            {
                "type": "input_audio_buffer.committed",
                "item_id": item_id,
                "previous_item_id": previous,
            }
        )
        item: Event = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "role": "user",
            "status": "completed",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        transcript = self.script.next_transcript(audio_ms)
        await self._add_item(item, previous, _ItemMeta(user_text=transcript))
        if self.state.config["audio"]["input"].get("transcription") is None:
            return
        if self.script.late_transcripts:
            self.late.append((item_id, transcript))
        else:
            await self._send_transcription(item_id, transcript)

    async def _send_transcription(self, item_id: str, transcript: str) -> None:
        for piece in _split_pieces(transcript, 3):
            await self.send(
                {
                    "type": "conversation.item.input_audio_transcription.delta",
                    "item_id": item_id,
                    "content_index": 0,
                    "delta": piece,
                }
            )
        item = self.state.item(item_id)
        if item is not None:
            item["content"][0]["transcript"] = transcript
        await self.send(
            {
                "type": "conversation.item.input_audio_transcription.completed",
                "item_id": item_id,
                "content_index": 0,
                "transcript": transcript,
                "usage": {"type": "duration", "seconds": round(len(transcript) / 15, 1)},
            }
        )

    async def _flush_late_transcripts(self) -> None:
        pending, self.late = self.late, []
        for item_id, transcript in pending:
            await self._send_transcription(item_id, transcript)

    async def _clear(self, event: Event) -> None:
        self.buffer_ms, self.buffer_item_id = 0.0, None
        if self.vad is not None:
            self.vad.reset()
        await self.send({"type": "input_audio_buffer.cleared"})

    async def _output_buffer_clear(self, event: Event) -> None:
        raise _ProtocolError(
            "invalid_value", "output_audio_buffer.clear is only supported for WebRTC and SIP."
        )

    # ---- conversation

    def _last_item_id(self) -> str | None:
        return self.state.items[-1]["id"] if self.state.items else None

    async def _add_item(
        self, item: Event, previous: str | None, meta: _ItemMeta, *, done: bool = True
    ) -> None:
        index = 0 if previous is None else self._index_of(previous) + 1
        self.state.items.insert(index, item)
        self.meta[item["id"]] = meta
        added = {"type": "conversation.item.added", "previous_item_id": previous, "item": item}
        await self.send(copy.deepcopy(added))
        if done:
            await self.send({**copy.deepcopy(added), "type": "conversation.item.done"})

    def _index_of(self, item_id: str) -> int:
        for index, item in enumerate(self.state.items):
            if item["id"] == item_id:
                return index
        raise _ProtocolError(
            "invalid_value", f"Item with id '{item_id}' not found.", "previous_item_id"
        )

    async def _item_create(self, event: Event) -> None:
        item = copy.deepcopy(event["item"])
        item_id = item.get("id") or _new_id("item")
        if self.state.item(item_id) is not None:
            raise _ProtocolError("invalid_value", f"Item '{item_id}' already exists.", "item.id")
        previous = event.get("previous_item_id") or self._last_item_id()
        if previous == "root":  # insert at the start of the conversation
            previous = None
        if item.get("type") == "function_call_output" and not self._call_exists(item["call_id"]):
            raise _ProtocolError(
                "invalid_value",
                f"Tool call ID '{item['call_id']}' not found in conversation.",
                "item.call_id",
            )
        item.update(id=item_id, object="realtime.item", status="completed")
        meta = _ItemMeta(user_text=_user_text(item) if item.get("role") == "user" else None)
        if item.get("role") == "assistant":
            meta.audio_item = any(p.get("type") == "output_audio" for p in item["content"])
        await self._add_item(item, previous, meta)

    def _call_exists(self, call_id: str) -> bool:
        return any(
            it.get("type") == "function_call" and it.get("call_id") == call_id
            for it in self.state.items
        )

    async def _item_retrieve(self, event: Event) -> None:
        item = self.state.item(event["item_id"])
        if item is None:
            raise _ProtocolError(
                "invalid_value", f"Item with id '{event['item_id']}' not found.", "item_id"
            )
        await self.send({"type": "conversation.item.retrieved", "item": copy.deepcopy(item)})

    async def _item_delete(self, event: Event) -> None:
        item = self.state.item(event["item_id"])
        if item is None:
            raise _ProtocolError(
                "invalid_value", f"Item with id '{event['item_id']}' not found.", "item_id"
            )
        self.state.items.remove(item)
        await self.send({"type": "conversation.item.deleted", "item_id": event["item_id"]})

    async def _item_truncate(self, event: Event) -> None:
        item_id, audio_end_ms = event["item_id"], event["audio_end_ms"]
        item = self.state.item(item_id)
        meta = self.meta.get(item_id)
        if item is None or meta is None:
            raise _ProtocolError("invalid_value", f"Item with id '{item_id}' not found.", "item_id")
        if item.get("role") != "assistant" or not meta.audio_item:
            raise _ProtocolError(
                "invalid_value", "Only assistant messages with audio can be truncated.", "item_id"
            )
        if event["content_index"] != 0:
            raise _ProtocolError("invalid_value", "Invalid content_index.", "content_index")
        sent_ms = round(meta.audio_ms_sent)
        if audio_end_ms <= 0 or audio_end_ms > sent_ms:
            raise _ProtocolError(
                "invalid_value",
                f"Audio content of {sent_ms}ms is already shorter than {audio_end_ms}ms"
                if audio_end_ms > 0
                else "audio_end_ms must be greater than 0.",
                "audio_end_ms",
            )
        meta.audio_ms_sent = float(audio_end_ms)
        for part in item["content"]:
            if part.get("type") == "output_audio":
                part["transcript"] = ""
        record = {"item_id": item_id, "audio_end_ms": audio_end_ms, "sent_ms": sent_ms}
        self.state.truncations.append(record)
        self.server.truncations.append({"index": self.state.index, **record})
        await self.send(
            {
                "type": "conversation.item.truncated",
                "item_id": item_id,
                "content_index": 0,
                "audio_end_ms": audio_end_ms,
            }
        )

    # ---- responses

    async def _response_create(self, event: Event) -> None:
        self.state.response_creates += 1
        if self.active is not None:
            raise _ProtocolError(
                "conversation_already_has_active_response",
                "Conversation already has an active response in progress: "
                f"{self.active.id}. Wait until the response is finished before creating a new one.",
            )
        await self._start_response(event.get("response") or {})

    async def _response_cancel(self, event: Event) -> None:
        if self.active is None:
            raise _ProtocolError(
                "response_cancel_not_active", "Cancellation failed: no active response found."
            )
        self.state.cancels += 1
        await self._cancel_active("client_cancelled")

    async def _start_response(self, params: Mapping[str, Any]) -> None:
        in_conversation = params.get("conversation", "auto") != "none"
        response = _Response(_new_id("resp"), params, in_conversation)
        self.active = response
        await self.send({"type": "response.created", "response": self._response_obj(response)})
        response.task = asyncio.create_task(self._generate(response), name=f"fake-{response.id}")

    def _response_obj(
        self, response: _Response, status: str = "in_progress", reason: str | None = None
    ) -> Event:
        modalities = self._modalities(response)
        details: Event | None = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": reason}
        elif status == "failed":
            error = {"type": "server_error", "code": "server_error", "message": "fake failure"}
            details = {"type": "failed", "error": error}
        return {
            "object": "realtime.response",
            "id": response.id,
            "status": status,
            "status_details": details,
            "output": copy.deepcopy(response.output),
            "conversation_id": "conv_fake" if response.in_conversation else None,
            "output_modalities": modalities,
            "max_output_tokens": self.state.config.get("max_output_tokens", "inf"),
            "audio": {
                "output": {
                    "format": self.state.config["audio"]["output"]["format"],
                    "voice": self._voice(),
                }
            },
            "usage": self._usage(response) if status != "in_progress" else None,
            "metadata": params_metadata(response.params),
        }

    def _modalities(self, response: _Response) -> list[str]:
        value: list[str] = response.params.get("output_modalities") or self.state.config.get(
            "output_modalities", ["audio"]
        )
        return value

    def _usage(self, response: _Response) -> Event:
        text_in = sum(len(json.dumps(item)) for item in self.state.items) // 4
        audio_in = int(self.state.audio_ms_received / 100)
        audio_out = int(sum(self.meta[i["id"]].audio_ms_sent for i in response.output) / 50)
        text_out = sum(len(json.dumps(item)) for item in response.output) // 8
        return {
            "total_tokens": text_in + audio_in + audio_out + text_out,
            "input_tokens": text_in + audio_in,
            "output_tokens": audio_out + text_out,
            "input_token_details": {
                "text_tokens": text_in,
                "audio_tokens": audio_in,
                "image_tokens": 0,
                "cached_tokens": 0,
                "cached_tokens_details": {"text_tokens": 0, "audio_tokens": 0, "image_tokens": 0},
            },
            "output_token_details": {"text_tokens": text_out, "audio_tokens": audio_out},
        }

    async def _cancel_active(self, reason: str) -> None:
        response = self.active
        if response is None:
            return
        self.active = None
        if response.task is not None and not response.task.done():
            response.task.cancel()
            await asyncio.wait([response.task])
        for item in response.output:
            if item.get("status") == "in_progress":
                item["status"] = "incomplete"
        await self._finish(response, "cancelled", reason)

    async def _finish(self, response: _Response, status: str, reason: str | None = None) -> None:
        body = self._response_obj(response, status, reason)
        self.state.responses.append(body)
        done: Event = {"type": "response.done", "response": body}
        await self.send(done)
        await self.send(_rate_limits_event())
        await self._flush_late_transcripts()

    async def _generate(self, response: _Response) -> None:
        """The response task: stream the planned output, then ``response.done``."""
        try:
            calls = self._planned_calls(response)
            if calls:
                for output_index, (name, arguments) in enumerate(calls):
                    await self._stream_call(response, output_index, name, arguments)
            else:
                await self._stream_message(response, self._reply_text(response))
        except ConnectionClosed:
            return
        except Exception:  # a bug in the fake (or a script callable): fail the response
            logger.exception("fake response %s failed", response.id)
            status = "failed"
        else:
            status = "completed"
        if self.active is response:
            self.active = None
            with contextlib.suppress(ConnectionClosed):
                await self._finish(response, status)

    def _planned_calls(self, response: _Response) -> list[tuple[str, Mapping[str, Any]]]:
        last_user = self._last_user_index()
        if last_user is None:
            return []
        if any(it.get("type") == "function_call_output" for it in self.state.items[last_user:]):
            return []
        choice = response.params.get("tool_choice") or self.state.config.get("tool_choice")
        if choice == "none":
            return []
        tools = response.params.get("tools") or self.state.config.get("tools") or []
        declared = {tool.get("name") for tool in tools if tool.get("type") == "function"}
        calls = self.script.calls_for(self.meta[self.state.items[last_user]["id"]].user_text or "")
        for name, _ in calls:
            if name not in declared:
                logger.warning("scripted call %r skipped: tool not declared in the session", name)
        return [(name, args) for name, args in calls if name in declared]

    def _last_user_index(self) -> int | None:
        for index in range(len(self.state.items) - 1, -1, -1):
            if self.state.items[index].get("role") == "user":
                return index
        return None

    def _reply_text(self, response: _Response) -> str:
        instructions = response.params.get("instructions")
        if instructions and self.script.reply_for_instructions is not None:
            return self.script.reply_for_instructions(instructions)
        last_user = self._last_user_index()
        tail = self.state.items[last_user:] if last_user is not None else self.state.items
        outputs = [
            (self._call_name(it["call_id"]), str(it.get("output", "")))
            for it in tail
            if it.get("type") == "function_call_output"
        ]
        if outputs:
            return self.script.reply_after_tools(outputs)
        user_text = ""
        if last_user is not None:
            user_text = self.meta[self.state.items[last_user]["id"]].user_text or ""
        return self.script.reply_text(user_text)

    def _call_name(self, call_id: str) -> str:
        for item in self.state.items:
            if item.get("type") == "function_call" and item.get("call_id") == call_id:
                return str(item.get("name"))
        return "tool"

    async def _open_item(self, response: _Response, item: Event, meta: _ItemMeta) -> int:
        output_index = len(response.output)
        response.output.append(item)
        self.meta[item["id"]] = meta
        base = {"response_id": response.id, "output_index": output_index}
        await self.send({"type": "response.output_item.added", **base, "item": copy.deepcopy(item)})
        if response.in_conversation:
            previous = self._last_item_id()
            self.state.items.append(item)
            await self.send(
                {
                    "type": "conversation.item.added",
                    "previous_item_id": previous,
                    "item": copy.deepcopy(item),
                }
            )
        return output_index

    async def _close_item(self, response: _Response, output_index: int, item: Event) -> None:
        item["status"] = "completed"
        base = {"response_id": response.id, "output_index": output_index}
        await self.send({"type": "response.output_item.done", **base, "item": copy.deepcopy(item)})
        if response.in_conversation:
            previous = self._previous_of(item["id"])
            await self.send(
                {
                    "type": "conversation.item.done",
                    "previous_item_id": previous,
                    "item": copy.deepcopy(item),
                }
            )

    def _previous_of(self, item_id: str) -> str | None:
        index = self._index_of(item_id)
        return self.state.items[index - 1]["id"] if index > 0 else None

    async def _stream_call(
        self, response: _Response, output_index: int, name: str, arguments: Mapping[str, Any]
    ) -> None:
        call_id = f"call_{secrets.token_hex(8)}"
        item: Event = {
            "id": _new_id("item"),
            "object": "realtime.item",
            "type": "function_call",
            "status": "in_progress",
            "name": name,
            "call_id": call_id,
            "arguments": "",
        }
        output_index = await self._open_item(response, item, _ItemMeta())
        text = json.dumps(dict(arguments))
        base = {"response_id": response.id, "item_id": item["id"], "output_index": output_index}
        for piece in _split_pieces(text, 3, by_words=False):
            await self.send(
                {
                    "type": "response.function_call_arguments.delta",
                    **base,
                    "call_id": call_id,
                    "delta": piece,
                }
            )
            await self._pause(0)
        item["arguments"] = text
        await self.send(
            {
                "type": "response.function_call_arguments.done",
                **base,
                "call_id": call_id,
                "name": name,
                "arguments": text,
            }
        )
        await self._close_item(response, output_index, item)

    async def _stream_message(self, response: _Response, text: str) -> None:
        audio = self._modalities(response) == ["audio"]
        part_type = "output_audio" if audio else "output_text"
        item: Event = {
            "id": _new_id("item"),
            "object": "realtime.item",
            "type": "message",
            "role": "assistant",
            "status": "in_progress",
            "content": [],
        }
        meta = _ItemMeta(audio_item=audio)
        output_index = await self._open_item(response, item, meta)
        base = {
            "response_id": response.id,
            "item_id": item["id"],
            "output_index": output_index,
            "content_index": 0,
        }
        # The SDK's (spec's) content part type is "audio"/"text", items use output_*.
        empty_part = {"type": "audio", "transcript": ""} if audio else {"type": "text", "text": ""}
        await self.send({"type": "response.content_part.added", **base, "part": empty_part})
        item["content"].append({"type": part_type, "transcript" if audio else "text": ""})
        if audio:
            self.audio_started = True
            await self._stream_audio(base, text, meta, item)
        else:
            await self._stream_text(base, text, item)
        key = "transcript" if audio else "text"
        done_part = {"type": "audio" if audio else "text", key: text}
        await self.send({"type": "response.content_part.done", **base, "part": done_part})
        await self._close_item(response, output_index, item)

    async def _stream_audio(self, base: Event, text: str, meta: _ItemMeta, item: Event) -> None:
        delta_ms = max(10, self.script.delta_ms)
        spoken = self.script.speak(text) if self.script.speak is not None else None
        total_ms = max(float(delta_ms), len(text) * self.script.audio_ms_per_char)
        if spoken is not None:
            total_ms = len(spoken) / BYTES_PER_MS
        chunks = max(1, math.ceil(total_ms / delta_ms))
        words = _split_pieces(text, chunks)
        sample = 0
        for index in range(chunks):
            chunk_ms = min(float(delta_ms), total_ms - index * delta_ms)
            if index < len(words) and words[index]:
                await self.send(
                    {
                        "type": "response.output_audio_transcript.delta",
                        **base,
                        "delta": words[index],
                    }
                )
                item["content"][0]["transcript"] += words[index]
            if spoken is not None:
                pcm = spoken[2 * sample : 2 * sample + round(chunk_ms * BYTES_PER_MS / 2) * 2]
            else:
                pcm = synthesize_speech(chunk_ms, start_sample=sample)
            sample += len(pcm) // 2
            delta = base64.b64encode(pcm).decode()
            await self.send({"type": "response.output_audio.delta", **base, "delta": delta})
            meta.audio_ms_sent += len(pcm) / BYTES_PER_MS
            self.state.audio_ms_sent += len(pcm) / BYTES_PER_MS
            await self._pause(chunk_ms)
        await self.send({"type": "response.output_audio.done", **base})
        await self.send(
            {"type": "response.output_audio_transcript.done", **base, "transcript": text}
        )

    async def _stream_text(self, base: Event, text: str, item: Event) -> None:
        for piece in _split_pieces(text, max(1, len(text.split()))):
            await self.send({"type": "response.output_text.delta", **base, "delta": piece})
            item["content"][0]["text"] += piece
            await self._pause(len(piece) * self.script.audio_ms_per_char / 4)
        await self.send({"type": "response.output_text.done", **base, "text": text})

    async def _pause(self, media_ms: float) -> None:
        pace = self.script.pace
        await asyncio.sleep(media_ms / 1000 / pace if pace > 0 else 0)


# --------------------------------------------------------------------------- helpers


def params_metadata(params: Mapping[str, Any]) -> Any:
    """The response's metadata as given in ``response.create`` (or None)."""
    return params.get("metadata")


def _bearer_value(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _bearer(headers: Headers) -> str | None:
    return _bearer_value(headers.get("Authorization"))


def _error_event(
    error_type: str,
    code: str,
    message: str,
    param: str | None = None,
    event_id: str | None = None,
) -> Event:
    return {
        "type": "error",
        "event_id": _new_id("event"),
        "error": {
            "type": error_type,
            "code": code,
            "message": message,
            "param": param,
            "event_id": event_id,
        },
    }


def _http_error(message: str, error_type: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "code": code, "param": None}}


def _rate_limits_event() -> Event:
    return {
        "type": "rate_limits.updated",
        "rate_limits": [
            {"name": "requests", "limit": 5000, "remaining": 4999, "reset_seconds": 0.012},
            {"name": "tokens", "limit": 40000, "remaining": 39000, "reset_seconds": 1.5},
        ],
    }


def _default_session(model: str, expires_at: int, voice: str = DEFAULT_VOICE) -> dict[str, Any]:
    """The GA session object the real service reports in ``session.created``."""
    pcm = {"type": "audio/pcm", "rate": SAMPLE_RATE}
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": _new_id("sess"),
        "model": model,
        "output_modalities": ["audio"],
        "instructions": "Your knowledge cutoff is 2023-10. You are a helpful, witty, and "
        "friendly AI. Talk quickly.",
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "prompt": None,
        "truncation": "auto",
        "expires_at": expires_at,
        "include": None,
        "audio": {
            "input": {
                "format": dict(pcm),
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": dict(_SERVER_VAD_DEFAULTS),
            },
            "output": {"format": dict(pcm), "voice": voice, "speed": 1.0},
        },
    }


def _merge_session(current: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Apply a partial ``session.update`` (a deep merge; some keys replace wholesale)."""
    merged = copy.deepcopy(dict(current))
    for key, value in update.items():
        if key in ("type", "object", "id"):
            continue
        if key == "turn_detection" and isinstance(value, Mapping):
            defaults = (
                _SEMANTIC_VAD_DEFAULTS
                if value.get("type") == "semantic_vad"
                else _SERVER_VAD_DEFAULTS
            )
            merged[key] = {**defaults, **{k: v for k, v in value.items() if v is not None}}
        elif (
            isinstance(value, Mapping)
            and isinstance(merged.get(key), Mapping)
            and key not in _REPLACED_KEYS
        ):
            merged[key] = _merge_session(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _user_text(item: Mapping[str, Any]) -> str:
    """The text a user item says: its input_text parts or audio transcripts."""
    parts = []
    for part in item.get("content") or []:
        if part.get("type") == "input_text":
            parts.append(str(part.get("text") or ""))
        elif part.get("type") == "input_audio" and part.get("transcript"):
            parts.append(str(part["transcript"]))
    return " ".join(parts)


def _split_pieces(text: str, count: int, *, by_words: bool = True) -> list[str]:
    """Split ``text`` into ``count`` consecutive pieces (some may be empty); joined = text."""
    if count <= 1 or not text:
        return [text]
    tokens = re.findall(r"\S+\s*|\s+", text) if by_words else list(text)
    pieces: list[str] = []
    for index in range(count):
        start = len(tokens) * index // count
        end = len(tokens) * (index + 1) // count
        pieces.append("".join(tokens[start:end]))
    return pieces


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``harkd fake-server``: serve until SIGINT/SIGTERM; print the URLs."""
    parser = argparse.ArgumentParser(
        prog="harkd fake-server", description="Run the local OpenAI Realtime (GA) fake server."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--http-port", type=int, default=0, help="client_secrets endpoint port")
    parser.add_argument(
        "--api-key",
        action="append",
        dest="api_keys",
        metavar="KEY",
        help="accepted key (repeatable); default: accept any key",
    )
    parser.add_argument("--max-session-s", type=float, default=None)
    parser.add_argument("--pace", type=float, default=1.0, help="0 = as fast as possible")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    server = FakeRealtimeServer(
        FakeScript(pace=args.pace),
        host=args.host,
        port=args.port,
        api_keys=set(args.api_keys) if args.api_keys else None,
        max_session_s=args.max_session_s,
        http_port=args.http_port,
        record=False,
    )
    try:
        asyncio.run(_serve_until_signal(server))
    except OSError as exc:
        print(f"harkd fake-server: {exc}")
        return 1
    return 0


async def _serve_until_signal(server: FakeRealtimeServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        print(f"fake realtime server: {server.url}", flush=True)
        print(f"client secrets: POST {server.http_url}{SECRETS_PATH}", flush=True)
        await stop.wait()
