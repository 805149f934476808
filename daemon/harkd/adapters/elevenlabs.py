"""ElevenLabs Agents (the conversational websocket): the wire mapping and the transport.

An ElevenLabs agent is configured on ElevenLabs' side (LLM, voice, tools, turn
taking); harkd opens a conversation with it, overrides its prompt (and voice), streams
16 kHz microphone audio and plays the agent's audio. The server decides every turn,
so the adapter turns its events into the neutral vocabulary the session expects:

* an agent reply (its `agent_response` text and `audio` chunks) becomes one response
  with one message item; it ends when the agent calls a client tool, when the user's
  next turn arrives, or when no audio came for `RESPONSE_IDLE_S` (the protocol has no
  end-of-reply event by default; `agent_response_complete` ends it at once where the
  agent sends it);
* `interruption` is a barge-in: audio chunks whose `event_id` is not above the
  interruption's are dropped, and the reply ends cancelled, with the text the server
  corrects it to (`agent_response_correction`, awaited for `CORRECTION_WAIT_S`);
* a text message is `user_message` when a response is asked for it, and
  `contextual_update` when not (replayed context after a reconnect).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import secrets
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

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
from harkd.adapters.openai import AUDIO_LANE_FRAMES, CLOSE_TIMEOUT_S, SETUP_TIMEOUT_S, DropLog
from harkd.adapters.registry import ELEVENLABS_AGENT_VOICE
from harkd.messages import RealtimeToken

log = logging.getLogger(__name__)

AUDIO_FORMAT = "pcm_16000"
"""The only format harkd speaks with an agent, both ways (the agents' default)."""
RESPONSE_IDLE_S = 1.0
"""A reply with no new audio for this long is over (ElevenLabs streams its audio
faster than real time, so a pause this long is the end, not a hesitation)."""
CORRECTION_WAIT_S = 0.2
"""After an interruption, how long the cut reply waits for the server's corrected
text before it ends with the text it had (the server sends both back to back)."""
SIGNED_URL_TIMEOUT_S = 10.0

TRAITS = ProviderTraits(
    input_format=AudioFormat(16_000),
    output_format=AudioFormat(16_000),
    server_turns=True,
    manual_turns=False,  # the agent's turn model decides; there is no commit
    answers_by_itself=True,
    can_truncate=False,  # an interruption cuts the reply server-side (and corrects its text)
    resume="replay",  # a new conversation gets recent messages as contextual updates
)
"""What an ElevenLabs agent can do, as `ElevenLabsAdapter.traits`."""


# --- encoding ---------------------------------------------------------------------


def initiation_message(settings: ev.SessionSettings) -> dict[str, Any]:
    """`conversation_initiation_client_data` overriding the prompt (and the voice)."""
    override: dict[str, Any] = {"agent": {"prompt": {"prompt": settings.instructions}}}
    if settings.voice != ELEVENLABS_AGENT_VOICE:
        override["tts"] = {"voice_id": settings.voice}
    return {"type": "conversation_initiation_client_data", "conversation_config_override": override}


def audio_message(pcm: bytes) -> str:
    """A `user_audio_chunk` (the one client message without a type), written directly."""
    return f'{{"user_audio_chunk":"{base64.b64encode(pcm).decode("ascii")}"}}'


def tool_result_message(result: ev.ToolResult) -> dict[str, Any]:
    """`client_tool_result`: harkd's `{"error": ...}` outputs are sent as errors."""
    text, is_error = result.output, False
    with contextlib.suppress(ValueError):
        data = json.loads(result.output)
        if isinstance(data, dict) and set(data) == {"error"}:
            text, is_error = str(data["error"]), True
    return {
        "type": "client_tool_result",
        "tool_call_id": result.call_id,
        "result": text,
        "is_error": is_error,
    }


def context_text(message: ev.CreateMessage) -> str:
    """A message as context the agent reads without answering."""
    said = {"user": "The user said", "assistant": "You said"}.get(message.role)
    return f"{said}: {message.text}" if said else str(message.text)


# --- decoding ---------------------------------------------------------------------


class _Body:
    """Typed access to one server event's body: a wrong type is a `ProtocolError`."""

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

    def text(self, key: str) -> str:
        value = self._data.get(key)
        if not isinstance(value, str):
            raise self._bad(key, "a string")
        return value

    def integer(self, key: str) -> int:
        value = self._data.get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, "an integer")
        return value

    def obj(self, key: str) -> _Body:
        return _Body(f"{self._kind}.{key}", self._data.get(key))

    def mapping(self, key: str) -> Mapping[str, Any]:
        value = self._data.get(key)
        if not isinstance(value, Mapping):
            raise self._bad(key, "an object")
        return value


def parse(message: str | bytes) -> tuple[str, _Body]:
    """One websocket message as (event type, event): the API sends only JSON objects."""
    if isinstance(message, bytes):
        raise ProtocolError(f"server sent a binary frame ({len(message)} bytes)")
    try:
        data = json.loads(message)
    except ValueError as exc:
        raise ProtocolError(f"server sent a frame that is not JSON: {exc}") from None
    if not isinstance(data, Mapping):
        raise ProtocolError(f"server sent a JSON {type(data).__name__}, not an event object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("server event without a type")
    return kind, _Body(kind, data)


_IGNORED = frozenset(
    {
        "vad_score",
        "agent_chat_response_part",
        "agent_tool_request",
        "agent_tool_response",
        "agent_response_metadata",
        "asr_initiation_metadata",
        "mcp_tool_call",
        "mcp_connection_status",
        "guardrail_triggered",
        "internal_turn_probability",
        "internal_tentative_agent_response",
        "conversation_initiation_metadata",
    }
)


# --- transport --------------------------------------------------------------------


def conversation_url(url: str, agent_id: str) -> str:
    """The websocket endpoint with `?agent_id=` added (public agents)."""
    joiner = "&" if urlsplit(url).query else "?"
    return f"{url}{joiner}{urlencode({'agent_id': agent_id})}"


def signed_url_endpoint(url: str, agent_id: str) -> str:
    """`wss://host/v1/convai/conversation` -> `https://host/v1/convai/conversation/
    get-signed-url?agent_id=...`: where private agents' signed URLs are fetched."""
    parts = urlsplit(url)
    scheme = {"wss": "https", "ws": "http"}.get(parts.scheme, parts.scheme)
    path = f"{parts.path.rstrip('/')}/get-signed-url"
    return urlunsplit((scheme, parts.netloc, path, urlencode({"agent_id": agent_id}), ""))


class ElevenLabsAdapter:
    """Opens conversations with one ElevenLabs agent.

    With an API key (`token.value`) it fetches a signed URL first (private agents);
    without one it connects to the public agent directly.
    """

    name = "elevenlabs"
    traits = TRAITS

    def __init__(
        self,
        agent_id: str,
        url: str = "wss://api.elevenlabs.io/v1/convai/conversation",
        *,
        ping_interval_s: float = 20.0,
        ping_timeout_s: float = 20.0,
    ) -> None:
        self.agent_id = agent_id
        self.url = url
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s

    async def connect(
        self, token: RealtimeToken, settings: ev.SessionSettings, resume_handle: str | None = None
    ) -> ElevenLabsConnection:
        """Start a conversation and wait for its metadata (16 kHz PCM both ways).

        Conversations cannot be resumed (`traits.resume` is "replay"): `resume_handle`
        never comes from this adapter and is ignored.
        """
        url = await self._url(token.value)
        try:
            ws = await websockets.connect(
                url,
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
                raise AuthenticationFailed(
                    f"agent {self.agent_id} refused the conversation (HTTP {status}): "
                    "a private agent needs realtime.api_key"
                ) from None
            raise ConnectionFailed(f"handshake refused (HTTP {status})") from None
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            raise ConnectionFailed(f"cannot connect: {exc}") from None
        connection = ElevenLabsConnection(ws, settings)
        try:
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                await connection.setup()
        except BaseException:
            await connection.close()
            raise
        return connection

    async def _url(self, api_key: str) -> str:
        if not api_key:
            return conversation_url(self.url, self.agent_id)
        return await asyncio.to_thread(self._signed_url, api_key)

    def _signed_url(self, api_key: str) -> str:
        endpoint = signed_url_endpoint(self.url, self.agent_id)
        request = urllib.request.Request(endpoint, headers={"xi-api-key": api_key})
        try:
            with urllib.request.urlopen(request, timeout=SIGNED_URL_TIMEOUT_S) as response:
                data = json.load(response)
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise AuthenticationFailed(
                    f"fetching a signed URL failed (HTTP {exc.code}): the API key was refused"
                ) from None
            raise ConnectionFailed(
                f"fetching a signed URL for agent {self.agent_id} failed (HTTP {exc.code})"
            ) from None
        except (OSError, ValueError) as exc:
            raise ConnectionFailed(f"fetching a signed URL failed: {exc}") from None
        signed = data.get("signed_url") if isinstance(data, dict) else None
        if not isinstance(signed, str) or not signed.startswith(("ws://", "wss://")):
            raise ConnectionFailed("fetching a signed URL failed: no signed_url in the answer")
        return signed


@dataclass
class _Reply:
    """One agent reply as a neutral response: its message item (once it speaks or
    writes), its text, and whether audio came."""

    response_id: str
    item_id: str | None = None
    text: str = ""
    has_audio: bool = False


class ElevenLabsConnection:
    """One open conversation with an agent."""

    def __init__(self, ws: ClientConnection, settings: ev.SessionSettings) -> None:
        self._ws = ws
        self._settings = settings
        self._tools = {tool.name for tool in settings.tools}
        self._control: deque[str] = deque()
        self._audio: deque[tuple[str, int]] = deque()
        self._wakeup = asyncio.Event()
        self._early: list[tuple[str, _Body]] = []
        self._on_event: Callable[[ev.ServerEvent], None] | None = None
        self._ids = itertools.count(1)
        self._tag = secrets.token_hex(4)
        self._reply: _Reply | None = None
        self._cut: _Reply | None = None
        """A reply interrupted while it waits for its corrected text."""
        self._interrupt_id = 0
        self._suppressed = False
        """harkd cancelled the current reply: its audio is dropped until the next turn."""
        self._user_item = self._new_id("el_user")
        self._tentative = ""
        self._sent_ms = 0.0
        self._held: list[ev.CreateMessage] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._dropped_bytes = 0
        self._drop_log = DropLog()
        self.conversation_id = ""

    def _new_id(self, prefix: str) -> str:
        # Unique across connections too: the session outlives them.
        return f"{prefix}_{self._tag}{next(self._ids)}"

    # --- setup --------------------------------------------------------------------

    async def setup(self) -> None:
        """Send the initiation data; wait for `conversation_initiation_metadata`."""
        try:
            await self._ws.send(json.dumps(initiation_message(self._settings)))
            while True:
                kind, body = parse(await self._receive())
                if kind == "conversation_initiation_metadata":
                    self._accept(body.obj("conversation_initiation_metadata_event"))
                    return
                if kind == "error":
                    raise ConnectionFailed(f"conversation refused: {_error_text(body)}")
                self._early.append((kind, body))
        except ConnectionClosed as exc:
            raise _as_failure(_lost(exc)) from None
        except ConnectionLost as exc:
            raise _as_failure(exc) from None

    def _accept(self, metadata: _Body) -> None:
        self.conversation_id = metadata.text("conversation_id")
        formats = {
            "agent_output_audio_format": metadata.text("agent_output_audio_format"),
            "user_input_audio_format": metadata.text("user_input_audio_format"),
        }
        wrong = {key: value for key, value in formats.items() if value != AUDIO_FORMAT}
        if wrong:
            found = ", ".join(f"{key} {value}" for key, value in wrong.items())
            raise ConnectionFailed(
                f"the agent's audio is {found}: harkd needs {AUDIO_FORMAT} both ways "
                "(set it in the agent's voice and advanced settings)"
            )
        self._early.insert(0, ("", metadata))  # delivered as SessionReady by serve()

    async def _receive(self) -> str | bytes:
        try:
            return await self._ws.recv()
        except ConnectionClosed as exc:
            raise _lost(exc) from None

    # --- commands -----------------------------------------------------------------

    def send(self, command: ev.Command) -> None:
        """Queue a command; audio goes to the bounded audio lane, the rest overtakes it."""
        match command:
            case ev.AppendAudio(pcm=pcm):
                if len(self._audio) >= AUDIO_LANE_FRAMES:
                    self._drop_oldest_audio()
                self._audio.append((audio_message(pcm), len(pcm)))
                self._sent_ms += len(pcm) / TRAITS.input_format.bytes_per_ms
            case ev.CreateMessage():
                self._hold(command)
            case ev.RequestResponse():
                self._flush_held(answer=True)
            case ev.CancelResponse():
                self._cancel_reply()
            case ev.ToolResult():
                self._queue(tool_result_message(command))
            case _:
                # Turns, discards and truncation never come: the traits rule them out.
                log.debug("%s has no ElevenLabs equivalent", type(command).__name__)
        self._wakeup.set()

    def _queue(self, message: dict[str, Any]) -> None:
        self._control.append(json.dumps(message))
        self._wakeup.set()

    def _hold(self, message: ev.CreateMessage) -> None:
        # A message followed by a request for an answer is the user's turn
        # (`user_message`); one without is context (`contextual_update`). Both come
        # in one pass of the loop, so the choice is made at its end.
        if message.text is None:
            log.warning("an image cannot be sent to an ElevenLabs agent; it was dropped")
            return
        self._held.append(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_held)

    def _flush_held(self, answer: bool = False) -> None:
        self._flush_scheduled = False
        held, self._held = self._held, []
        turn = held.pop() if answer and held and held[-1].role != "assistant" else None
        for message in held:
            self._queue({"type": "contextual_update", "text": context_text(message)})
        if turn is not None:
            self._suppressed = False  # the answer to this message is wanted
            self._queue({"type": "user_message", "text": turn.text})

    def _cancel_reply(self) -> None:
        # The agent cannot be told to stop: its reply is dropped here, and the session
        # hears that the response ended (after this command, like a server would).
        reply = self._reply
        if reply is None:
            return
        self._suppressed = True
        self._reply = None
        self._stop_timer()
        asyncio.get_running_loop().call_soon(self._end, reply, "cancelled", None)

    def _drop_oldest_audio(self) -> None:
        _, pcm_bytes = self._audio.popleft()
        self._dropped_bytes += pcm_bytes
        self._drop_log.dropped(pcm_bytes / TRAITS.input_format.bytes_per_ms)
        if self._dropped_bytes == pcm_bytes:  # the first drop since the last report
            asyncio.get_running_loop().call_soon(self._report_drops)

    def _report_drops(self) -> None:
        dropped, self._dropped_bytes = self._dropped_bytes, 0
        if dropped:
            self._emit(ev.AudioDropped(dropped))

    async def send_audio(self, pcm: bytes) -> None:
        """Send a chunk now when nothing is queued ahead of it, else queue it."""
        if self._control or self._audio or self._ws.state is not State.OPEN:
            self.send(ev.AppendAudio(pcm))
            return
        self._sent_ms += len(pcm) / TRAITS.input_format.bytes_per_ms
        with contextlib.suppress(ConnectionClosed):  # the reader reports the close
            await self._ws.send(audio_message(pcm))

    def update_session(self, settings: ev.SessionSettings) -> None:
        """Tools are the agent's own; a new prompt or voice needs a new conversation."""
        self._tools = {tool.name for tool in settings.tools}
        if settings.instructions != self._settings.instructions:
            log.info("new instructions take effect with the next ElevenLabs conversation")
        self._settings = settings

    # --- events -------------------------------------------------------------------

    async def serve(self, on_event: Callable[[ev.ServerEvent], None]) -> None:
        """Deliver events until the connection ends (always by raising)."""
        self._on_event = on_event
        try:
            for kind, body in self._early:
                if kind:
                    self._handle(kind, body)
                else:
                    on_event(ev.SessionReady(self.conversation_id))
            self._early.clear()
            await serve_until_lost(self._read(), self._write())
        finally:
            self._stop_timer()
            self._on_event = None

    def _emit(self, event: ev.ServerEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    async def _read(self) -> None:
        while True:
            kind, body = parse(await self._receive())
            self._handle(kind, body)

    def _handle(self, kind: str, body: _Body) -> None:
        if kind == "ping":
            # Answered before anything else is queued: the server measures latency.
            self._control.appendleft(
                json.dumps({"type": "pong", "event_id": body.obj("ping_event").integer("event_id")})
            )
            self._wakeup.set()
            self._emit(ev.Ignored(kind))
            return
        if kind == "audio":
            self._audio_event(body.obj("audio_event"))
            return
        if kind == "interruption":
            self._interruption(body.obj("interruption_event").integer("event_id"))
            return
        if kind == "agent_response_correction":
            self._correction(body.obj("agent_response_correction_event"))
            return
        self._settle_cut()
        handler = _HANDLERS.get(kind)
        if handler is not None:
            handler(self, body)
        elif kind in _IGNORED:
            self._emit(ev.Ignored(kind))
        else:
            log.debug("unknown server event %s", kind)
            self._emit(ev.Unknown(kind))

    def _open(self) -> _Reply:
        """The reply in progress, started (with its message item) if need be."""
        reply = self._reply
        if reply is None:
            reply = self._reply = _Reply(self._new_id("el_resp"))
            self._emit(ev.ResponseCreated(reply.response_id))
        if reply.item_id is None:
            reply.item_id = self._new_id("el_item")
            self._emit(ev.OutputItemAdded(reply.response_id, reply.item_id, "message"))
        return reply

    def _audio_event(self, body: _Body) -> None:
        event_id = body.integer("event_id")
        if event_id <= self._interrupt_id or self._suppressed:
            self._emit(ev.Ignored("audio"))  # the rest of a reply that was cut
            return
        self._settle_cut()
        try:
            pcm = base64.b64decode(body.text("audio_base_64"), validate=True)
        except ValueError as exc:  # binascii.Error, or text that is not even ASCII
            raise ProtocolError(f"malformed audio event: {exc}") from None
        reply = self._open()
        reply.has_audio = True
        assert reply.item_id is not None
        self._emit(ev.AudioDelta(reply.response_id, reply.item_id, pcm))
        self._restart_timer()

    def _agent_response(self, body: _Body) -> None:
        text = body.obj("agent_response_event").text("agent_response").strip()
        if self._suppressed or not text:
            return
        reply = self._open()
        delta = f" {text}" if reply.text else text
        reply.text += delta
        assert reply.item_id is not None
        self._emit(ev.AssistantTranscriptDelta(reply.response_id, reply.item_id, delta))
        self._restart_timer()

    def _tentative_transcript(self, body: _Body) -> None:
        text = body.obj("tentative_user_transcription_event").text("user_transcript")
        if text.startswith(self._tentative) and len(text) > len(self._tentative):
            delta, self._tentative = text[len(self._tentative) :], text
            self._emit(ev.UserTranscriptDelta(self._user_item, delta))

    def _user_transcript(self, body: _Body) -> None:
        text = body.obj("user_transcription_event").text("user_transcript").strip()
        self._finish_reply()
        self._suppressed = False
        item, self._user_item = self._user_item, self._new_id("el_user")
        self._tentative = ""
        self._emit(ev.SpeechStopped(item, int(self._sent_ms)))
        self._emit(ev.InputCommitted(item, None))
        self._emit(ev.UserTranscriptDone(item, text))

    def _tool_call(self, body: _Body) -> None:
        call = body.obj("client_tool_call")
        name, call_id = call.text("tool_name"), call.text("tool_call_id")
        arguments = json.dumps(dict(call.mapping("parameters")))
        if name not in self._tools:
            log.warning(
                "the agent called tool %r, which harkd does not know (harkd's tools: %s); "
                "a tool must exist both in the agent's configuration and in harkd",
                name,
                ", ".join(sorted(self._tools)) or "none",
            )
        reply = self._reply or _Reply(self._new_id("el_resp"))
        if self._reply is None:
            self._emit(ev.ResponseCreated(reply.response_id))
        self._reply = None
        call_item = self._new_id("el_call")
        self._emit(ev.OutputItemAdded(reply.response_id, call_item, "function_call", call_id, name))
        done = ev.FunctionCallDone(reply.response_id, call_item, call_id, name, arguments)
        self._emit(done)
        self._end(reply, "completed", None, (done,))

    def _response_complete(self, body: _Body) -> None:
        self._finish_reply()

    def _error(self, body: _Body) -> None:
        self._emit(ev.ServerError(code="error", message=_error_text(body)))

    # --- interruptions ------------------------------------------------------------

    def _interruption(self, event_id: int) -> None:
        self._interrupt_id = max(self._interrupt_id, event_id)
        self._settle_cut()
        reply, self._reply = self._reply, None
        self._stop_timer()
        if reply is None:
            self._emit(ev.Ignored("interruption"))
            return
        if reply.text:
            self._cut = reply  # its text is corrected to what was said, in a moment
            self._timer = asyncio.get_running_loop().call_later(CORRECTION_WAIT_S, self._settle_cut)
            return
        self._end_cut(reply, None)

    def _correction(self, body: _Body) -> None:
        corrected = body.text("corrected_agent_response").strip()
        cut, self._cut = self._cut, None
        if cut is None:
            log.debug("a correction for no interrupted reply: ignored")
            self._emit(ev.Ignored("agent_response_correction"))
            return
        self._stop_timer()
        self._end_cut(cut, corrected)

    def _settle_cut(self) -> None:
        """The interrupted reply ends with the text it had: no correction came (in
        time, or before the conversation moved on)."""
        cut, self._cut = self._cut, None
        if cut is not None:
            self._stop_timer()
            self._end_cut(cut, None)

    def _end_cut(self, reply: _Reply, corrected: str | None) -> None:
        self._end(reply, "cancelled", corrected, barge_in=True)

    # --- ending replies -----------------------------------------------------------

    def _finish_reply(self) -> None:
        self._settle_cut()
        reply, self._reply = self._reply, None
        self._stop_timer()
        if reply is not None:
            self._end(reply, "completed", None)

    def _end(
        self,
        reply: _Reply,
        status: str,
        text: str | None,
        calls: tuple[ev.FunctionCallDone, ...] = (),
        *,
        barge_in: bool = False,
    ) -> None:
        if reply.item_id is not None:
            if reply.has_audio:
                self._emit(ev.AudioDone(reply.response_id, reply.item_id))
            final = reply.text if text is None else text
            self._emit(ev.AssistantTranscriptDone(reply.response_id, reply.item_id, final))
        if barge_in:
            # The server's barge-in: the user speaks, the reply stops playing at once
            # (after its final text is known: the message is finished then).
            self._emit(ev.SpeechStarted(self._user_item, int(self._sent_ms)))
        self._emit(ev.ResponseDone(reply.response_id, status, function_calls=calls))

    def _restart_timer(self) -> None:
        self._stop_timer()
        self._timer = asyncio.get_running_loop().call_later(RESPONSE_IDLE_S, self._finish_reply)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # --- writing ------------------------------------------------------------------

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
        self._stop_timer()
        await self._ws.close()


_HANDLERS: dict[str, Callable[[ElevenLabsConnection, _Body], None]] = {
    "agent_response": ElevenLabsConnection._agent_response,
    "tentative_user_transcript": ElevenLabsConnection._tentative_transcript,
    "user_transcript": ElevenLabsConnection._user_transcript,
    "client_tool_call": ElevenLabsConnection._tool_call,
    "agent_response_complete": ElevenLabsConnection._response_complete,
    "error": ElevenLabsConnection._error,
}


def _error_text(body: _Body) -> str:
    data = body.mapping("error_event")
    parts = [str(data.get(key)) for key in ("error_type", "message") if data.get(key)]
    return ": ".join(parts) or f"code {data.get('code')}"


def _lost(exc: ConnectionClosed) -> ConnectionFailed | ConnectionLost:
    close = exc.rcvd
    code = close.code if close else None
    reason = close.reason if close else "connection dropped"
    if code == 1008 and any(word in reason.lower() for word in ("auth", "signature", "api key")):
        return AuthenticationFailed(reason)
    return ConnectionLost(code, reason or "connection dropped")


def _as_failure(exc: ConnectionFailed | ConnectionLost) -> ConnectionFailed:
    """A close during setup is a failed attempt, not a lost session."""
    return exc if isinstance(exc, ConnectionFailed) else ConnectionFailed(str(exc))
