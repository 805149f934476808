"""Gemini Live (BidiGenerateContent over WebSocket): the transport, and what the wire
mapping (`harkd.adapters.gemini_wire`, free of I/O) means for a conversation.

A connection sends `setup` and waits for `setupComplete`. Microphone audio goes out
as `realtimeInput.audio` (16 kHz PCM16); answers come back as 24 kHz PCM16 in
`serverContent.modelTurn.parts[].inlineData`, with input and output transcriptions
alongside. Gemini speaks in turns, not items, so the decoder keeps a little state to
give each model turn a response id and one assistant item, and each user turn an item
built from its transcription.

What differs from OpenAI, and how harkd copes:

* **Sessions are resumed, not replayed.** Setup always asks for `sessionResumption`;
  every `sessionResumptionUpdate` that is `resumable` becomes a `ResumeHandle`, and a
  `goAway` becomes `GoingAway`: the connection supervisor lets the answer in progress
  finish (within the time left), then opens a new connection whose setup carries the
  newest handle, so the model keeps the whole conversation and nothing is replayed; a
  drop is resumed the same way. A handle is the session as of when the server gave it:
  audio sent after it (an utterance in progress at the move) is lost, since Gemini's
  transparent resumption, which says how much was consumed, is Vertex-only.
  `contextWindowCompression` (a sliding window) is always on, so a long conversation is
  trimmed by the server instead of ending at its context limit.
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
import contextlib
import json
import logging
import re
from collections import deque
from collections.abc import Callable
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
    ProviderTraits,
    serve_until_lost,
)
from harkd.adapters.gemini_wire import (
    INPUT_RATE,
    OUTPUT_RATE,
    Decoder,
    audio_message,
    content_turn,
    context_update,
    function_response,
    parse,
    setup_message,
)
from harkd.adapters.openai import AUDIO_LANE_FRAMES, DropLog
from harkd.adapters.registry import GEMINI_MODEL, GEMINI_URL
from harkd.messages import RealtimeToken

log = logging.getLogger(__name__)

SETUP_TIMEOUT_S = 15.0
CLOSE_TIMEOUT_S = 2.0
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


@dataclass
class _Content:
    """A `clientContent` message still in the control lane: text turns queued together
    become one message, and a `RequestResponse` right behind them completes it."""

    turns: list[dict[str, Any]] = field(default_factory=list)
    turn_complete: bool = False

    def message(self) -> str:
        content = {"turns": self.turns, "turnComplete": self.turn_complete}
        return json.dumps({"clientContent": content})


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
            async with asyncio.timeout(SETUP_TIMEOUT_S):
                await connection.setup(message)
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
        await serve_until_lost(self._read(on_event), self._write())

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
