"""`RealtimeClient`: the public facade over the session core, an adapter and audio.

A Python port of TanStack AI's RealtimeClient (same state, same verbs) that also
reconnects, rolls sessions over before the provider's limit, commits manual turns,
gates the microphone while the assistant talks, and runs tools with validation and
timeouts. All of its work happens in `run()`, one coroutine a supervisor can own;
`connect()` starts it for library users who have no supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from harkd import events as ev
from harkd.adapters.base import (
    AuthenticationFailed,
    ConnectionFailed,
    ConnectionLost,
    RealtimeAdapter,
    RealtimeConnection,
)
from harkd.audio.base import PROVIDER_RATE, VAD_RATE, AudioInput, AudioOutput, MeterReading
from harkd.audio.meter import LevelMeter
from harkd.audio.resample import StreamResampler
from harkd.audio.vad import Endpointer, TurnAudio, TurnClosed, TurnDropped, TurnOpened, VadEvent
from harkd.config import VadConfig
from harkd.messages import (
    AudioVisualization,
    ClientEvent,
    MessageFinalized,
    RealtimeError,
    RealtimeMessage,
    RealtimeMode,
    RealtimeState,
    RealtimeStatus,
)
from harkd.session import (
    CancelTools,
    Effect,
    Emit,
    PlayAudio,
    RunTools,
    Send,
    Session,
    StopPlayback,
)
from harkd.tokens import TokenSource
from harkd.tools import Tool, ToolCall, ToolRunner

log = logging.getLogger(__name__)

VadMode = Literal["server", "semantic", "manual"]
StateCallback = Callable[[RealtimeState], None]
EventCallback = Callable[[ClientEvent], None]

AUTH_RETRY_S = 300.0
"""A refused credential is retried this seldom: a human has to fix it first."""

STABLE_AFTER_S = 30.0
"""A connection that lived this long resets the backoff (quick failures do not)."""

VAD_FRAME_MS = 20


@dataclass(frozen=True)
class ReconnectPolicy:
    """Jittered exponential backoff between connection attempts."""

    initial_delay_s: float = 1.0
    max_delay_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt number `attempt` (0-based), with jitter."""
        ceiling = min(self.max_delay_s, self.initial_delay_s * 2**attempt)
        return float(ceiling * random.uniform(0.5, 1.0))


class RealtimeClient:
    """A realtime voice conversation: connection, audio, turns, tools and state."""

    def __init__(
        self,
        *,
        get_token: TokenSource,
        adapter: RealtimeAdapter,
        tools: Sequence[Tool] = (),
        vad_mode: VadMode = "server",
        instructions: str = "",
        voice: str = "marin",
        transcription_model: str | None = None,
        audio_input: AudioInput | None = None,
        audio_output: AudioOutput | None = None,
        on_message: Callable[[RealtimeMessage], None] | None = None,
        on_error: Callable[[RealtimeError], None] | None = None,
        on_status_change: Callable[[RealtimeStatus], None] | None = None,
        on_mode_change: Callable[[RealtimeMode], None] | None = None,
        barge_in: bool = False,
        echo_tail_ms: int = 300,
        vad: VadConfig | None = None,
        reconnect: ReconnectPolicy | None = None,
        rollover_s: float = 3300.0,
        replay_messages: int = 12,
        volume: int = 100,
    ) -> None:
        self._get_token = get_token
        self._adapter = adapter
        self._runner = ToolRunner(tools)
        self._settings = ev.SessionSettings(
            instructions=instructions,
            voice=voice,
            vad_mode=vad_mode,
            transcription_model=transcription_model,
            tools=tuple(self._runner.schemas()),
            interrupt_response=barge_in,
        )
        self._input = audio_input
        self._output = audio_output
        self._on_message = on_message
        self._on_error = on_error
        self._on_status_change = on_status_change
        self._on_mode_change = on_mode_change
        self._barge_in = barge_in
        self._echo_tail_s = echo_tail_ms / 1000
        self._reconnect = reconnect or ReconnectPolicy()
        self._rollover_s = rollover_s
        self._replay_messages = replay_messages

        self._session = Session(
            vad_mode,
            voice_interrupts=barge_in,
            transcribes=transcription_model is not None,
            has_audio_output=audio_output is not None,
        )
        self._endpointer = (
            Endpointer(vad or VadConfig(), VAD_FRAME_MS) if vad_mode == "manual" else None
        )
        self._conn: RealtimeConnection | None = None
        self._conn_status = RealtimeStatus.IDLE
        self._conn_error: RealtimeError | None = None
        self._device_errors: dict[str, RealtimeError] = {}
        self._mic_muted = False
        self._volume = volume
        self._quiet_since = 0.0
        self._input_meter: LevelMeter | None = None
        self._vad_pending = b""
        self._payload_pending = b""

        self._state_callbacks: list[StateCallback] = []
        self._event_callbacks: list[EventCallback] = []
        self._last_state = self.state
        self._want_connected = asyncio.Event()
        self._wanted_changed = asyncio.Event()
        self._attempted: asyncio.Event = asyncio.Event()
        self._tasks: asyncio.TaskGroup | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._owns_run_task = False
        self._rollover_pending = False
        self._live_voice = voice
        self._settled = asyncio.Event()
        self._settled.set()

    # --- state (the reference's properties) -----------------------------------------

    @property
    def status(self) -> RealtimeStatus:
        """Connection status; `error` while an audio device is down."""
        return RealtimeStatus.ERROR if self._device_errors else self._conn_status

    @property
    def mode(self) -> RealtimeMode:
        """idle / listening / thinking / speaking."""
        return self._session.mode

    @property
    def messages(self) -> tuple[RealtimeMessage, ...]:
        """The recent conversation, in order: the newest messages (at most
        `harkd.session.MESSAGE_WINDOW`); the transcript journal keeps the whole history."""
        return self._session.messages

    @property
    def error(self) -> RealtimeError | None:
        """The current problem, if any: audio device, connection, then provider."""
        devices = list(self._device_errors.values())
        return devices[0] if devices else self._conn_error or self._session.error

    @property
    def pending_user_transcript(self) -> str | None:
        """What the user is saying, as transcribed so far."""
        return self._session.pending_user_transcript

    @property
    def pending_assistant_transcript(self) -> str | None:
        """What the assistant is saying, accumulated so far."""
        return self._session.pending_assistant_transcript

    @property
    def mic_muted(self) -> bool:
        """True while no microphone audio leaves the device."""
        return self._mic_muted

    @property
    def volume(self) -> int:
        """Output volume, 0..100."""
        return self._volume

    @property
    def audio(self) -> AudioVisualization | None:
        """Input and output levels and spectra; None when not connected."""
        if self._conn_status is not RealtimeStatus.CONNECTED:
            return None
        mic = self._input_meter.reading() if self._input_meter else MeterReading()
        speaker = self._output.meter() if self._output else MeterReading()
        return AudioVisualization(
            input_level=mic.level,
            output_level=speaker.level,
            input_frequency_data=mic.frequency,
            output_frequency_data=speaker.frequency,
            input_time_domain_data=mic.time_domain,
            output_time_domain_data=speaker.time_domain,
            input_sample_rate=mic.sample_rate,
            output_sample_rate=speaker.sample_rate,
        )

    @property
    def state(self) -> RealtimeState:
        """A snapshot of all of the above."""
        return RealtimeState(
            status=self.status,
            mode=self.mode,
            messages=self.messages,
            error=self.error,
            pending_user_transcript=self.pending_user_transcript,
            pending_assistant_transcript=self.pending_assistant_transcript,
            mic_muted=self._mic_muted,
            volume=self._volume,
        )

    def on_state_change(self, callback: StateCallback) -> Callable[[], None]:
        """Call `callback(state)` after every change; returns the unsubscribe function."""
        self._state_callbacks.append(callback)
        return lambda: _discard(self._state_callbacks, callback)

    def on_event(self, callback: EventCallback) -> Callable[[], None]:
        """Call `callback(event)` for finalized messages, partials, tool calls, usage."""
        self._event_callbacks.append(callback)
        return lambda: _discard(self._event_callbacks, callback)

    # --- verbs ----------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the session; raises `RealtimeError` if the first attempt fails.

        Later drops are reconnected automatically until `disconnect()`.
        """
        if self._run_task is None:
            self._run_task = asyncio.create_task(self.run(autoconnect=False), name="harkd-client")
            self._owns_run_task = True
            await asyncio.sleep(0)
        self._attempted.clear()
        self._set_wanted(True)
        await self._attempted.wait()
        if self._conn_status is not RealtimeStatus.CONNECTED:
            error = self.error or RealtimeError("connect_failed", "could not connect")
            self._set_wanted(False)
            raise error

    async def disconnect(self) -> None:
        """Close the session (audio devices stay open for the next connect)."""
        self._set_wanted(False)
        await self._settled.wait()

    def destroy(self) -> None:
        """Release everything: tasks, subscriptions; the client cannot be reused."""
        self._set_wanted(False)
        self._state_callbacks.clear()
        self._event_callbacks.clear()
        if self._run_task is not None and self._owns_run_task:
            self._run_task.cancel()

    def start_listening(self) -> None:
        """Open a turn now (push-to-talk in manual mode; interrupts the assistant)."""
        if self._endpointer is not None and self._input is not None:
            for event in self._endpointer.open_now():
                self._vad_event(event)
        else:
            self._apply(self._session.start_listening())

    def stop_listening(self) -> None:
        """Close the turn: commit it and ask for the answer (manual mode)."""
        if self._endpointer is not None and self._endpointer.is_open:
            for event in self._endpointer.close_now():
                self._vad_event(event)
        else:
            self._apply(self._session.stop_listening())

    def interrupt(self) -> None:
        """Stop the assistant now: silence, truncate at what was heard, cancel."""
        self._apply(self._session.interrupt())

    def send_text(self, text: str) -> None:
        """Send a typed message; the assistant answers it."""
        self._apply(self._session.send_text(text))

    def send_image(self, data: str, mime_type: str) -> None:
        """Send an image (base64 data or a URL); the assistant answers it."""
        self._apply(self._session.send_image(data, mime_type))

    def say(self, text: str) -> None:
        """Make the assistant tell the user something (used by plugins)."""
        self._apply(self._session.say(text))

    def set_mic_mute(self, muted: bool) -> None:
        """Mute: no microphone audio leaves the device (an open turn is closed)."""
        self._mic_muted = muted
        if muted and self._endpointer is not None:
            self._endpointer.reset()
            self._apply(self._session.stop_listening())
        self._changed()

    def set_volume(self, volume: int) -> None:
        """Output volume 0..100, applied at once."""
        self._volume = max(0, min(100, volume))
        if self._output is not None:
            self._output.set_volume(self._volume)
        self._changed()

    def update_settings(
        self,
        *,
        instructions: str | None = None,
        voice: str | None = None,
        tools: Sequence[Tool] | None = None,
    ) -> None:
        """Change instructions, voice or tools; applied to the open session now
        (the voice only takes effect on the next session, a provider rule)."""
        if tools is not None:
            self._runner.replace_tools(tools)
        self._settings = replace(
            self._settings,
            instructions=self._settings.instructions if instructions is None else instructions,
            voice=self._settings.voice if voice is None else voice,
            tools=tuple(self._runner.schemas()),
        )
        if self._conn is not None:
            self._conn.update_session(replace(self._settings, voice=self._live_voice))

    # --- the work -------------------------------------------------------------------

    async def run(self, *, autoconnect: bool = True) -> None:
        """Do everything until cancelled: audio, connection, reconnects, tools."""
        self._run_task = self._run_task or asyncio.current_task()
        if autoconnect:
            self._set_wanted(True)
        try:
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                if self._output is not None:
                    self._output.set_volume(self._volume)
                    self._output.on_drained(self._on_drained)
                    self._output.on_abandoned(self._on_abandoned)
                    await self._output.start(self)
                if self._input is not None:
                    await self._input.start(self)
                    tasks.create_task(self._capture(self._input), name="capture")
                tasks.create_task(self._connection_loop(), name="session")
        finally:
            self._tasks = None
            await self._stop_audio()

    async def _stop_audio(self) -> None:
        for device in (self._input, self._output):
            if device is not None:
                try:
                    await device.stop()
                except Exception:
                    log.exception("stopping %s failed", device.name)

    def _set_wanted(self, wanted: bool) -> None:
        if wanted:
            self._want_connected.set()
        else:
            self._want_connected.clear()
        self._wanted_changed.set()

    async def _connection_loop(self) -> None:
        attempt = 0
        while True:
            if not self._want_connected.is_set():
                self._set_status(RealtimeStatus.IDLE)
                await self._want_connected.wait()
                attempt = 0
            self._set_status(
                RealtimeStatus.CONNECTING if attempt == 0 else RealtimeStatus.RECONNECTING
            )
            conn = await self._open(attempt)
            if conn is None:
                attempt += 1
                continue
            opened = time.monotonic()
            code = await self._serve(conn)
            if time.monotonic() - opened >= STABLE_AFTER_S:
                attempt = 0
            if not self._want_connected.is_set():
                continue
            self._set_status(RealtimeStatus.RECONNECTING)
            if self._rollover_pending or code == 1001:
                # Session limit or our own rollover: a fresh session at once.
                self._rollover_pending = False
                continue
            await self._pause(self._reconnect.delay(attempt))
            attempt += 1

    async def _open(self, attempt: int) -> RealtimeConnection | None:
        """One connection attempt; on failure, waits out the backoff and returns None."""
        try:
            token = await self._get_token()
            return await self._adapter.connect(token, self._settings)
        except AuthenticationFailed as exc:
            error = RealtimeError("invalid_api_key", str(exc))
        except RealtimeError as exc:
            error = exc
        except (ConnectionFailed, OSError) as exc:
            error = RealtimeError("connect_failed", str(exc))
        except Exception as exc:
            # A bug (ours, a token source's or an adapter's) must not take the
            # microphone and speaker down with it: it is one more failed attempt.
            log.exception("connecting failed unexpectedly")
            error = RealtimeError("connect_failed", f"{type(exc).__name__}: {exc}")
        if error.code == "invalid_api_key":
            self._fail(error)
            await self._pause(max(AUTH_RETRY_S, self._reconnect.max_delay_s))
        else:
            self._conn_error = error
            self._set_status(RealtimeStatus.RECONNECTING)
            self._attempted.set()
            await self._pause(self._reconnect.delay(attempt))
        return None

    async def _serve(self, conn: RealtimeConnection) -> int | None:
        """Run one connection until it ends; returns its close code.

        Whatever ends it (a close, a ping timeout, a protocol error, a bug in an event
        handler) is a lost connection: logged once, and the caller reconnects. Audio
        devices are not touched.
        """
        self._conn = conn
        self._conn_error = None
        self._live_voice = self._settings.voice
        self._apply(self._session.connected())
        self._apply(self._session.replay(self._replay_messages))
        self._set_status(RealtimeStatus.CONNECTED)
        self._attempted.set()
        code: int | None = None
        serving = asyncio.create_task(conn.serve(self._on_server_event), name="ws")
        watcher = asyncio.create_task(self._watch(conn), name="ws-watch")
        try:
            await serving  # always ends by raising
        except ConnectionLost as lost:
            code = lost.code
            if self._want_connected.is_set() and not self._rollover_pending:
                log.warning("realtime connection lost: %s", lost)
        except AuthenticationFailed as exc:
            self._conn_error = RealtimeError("invalid_api_key", str(exc))
        except ConnectionFailed as exc:
            log.warning("realtime connection failed: %s", exc)
        except Exception:
            log.exception("realtime connection broken by a bug; reconnecting")
        finally:
            for task in (serving, watcher):
                task.cancel()
            await asyncio.gather(serving, watcher, return_exceptions=True)
            self._conn = None
            self._apply(self._session.disconnected())
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)
            self._changed()
        return code

    async def _watch(self, conn: RealtimeConnection) -> None:
        """Close the connection on disconnect() or for a proactive rollover."""
        deadline = time.monotonic() + self._rollover_s
        while self._want_connected.is_set():
            now = time.monotonic()
            if now >= deadline:
                if self.mode in (RealtimeMode.LISTENING, RealtimeMode.IDLE):
                    log.info("rolling the session over before the provider's limit")
                    self._rollover_pending = True
                    break
                deadline = now + 1.0  # mid-turn: look again shortly
            await self._wait_for_wish(deadline - now)
        await conn.close()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake early when connect/disconnect is asked for."""
        wanted = self._want_connected.is_set()
        deadline = time.monotonic() + seconds
        while self._want_connected.is_set() == wanted and time.monotonic() < deadline:
            await self._wait_for_wish(deadline - time.monotonic())

    async def _wait_for_wish(self, timeout_s: float) -> None:
        # Callers re-check the wish after this returns; clearing first and
        # checking after keeps a connect()/disconnect() from being missed.
        self._wanted_changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wanted_changed.wait(), max(0.0, timeout_s))

    def _fail(self, error: RealtimeError) -> None:
        log.error("realtime: %s", error.message)
        self._conn_error = error
        self._set_status(RealtimeStatus.ERROR)
        self._attempted.set()

    # --- events and effects ---------------------------------------------------------

    def _on_server_event(self, event: ev.ServerEvent) -> None:
        self._apply(self._session.handle(event))

    def _apply(self, effects: Iterable[Effect]) -> None:
        for effect in effects:
            match effect:
                case Send(command=command):
                    if self._conn is not None:
                        self._conn.send(command)
                case PlayAudio(item_id=item_id, pcm=pcm):
                    if self._output is not None:
                        self._output.play(item_id, pcm)
                case StopPlayback():
                    played = self._output.stop_playback() if self._output is not None else {}
                    self._quiet_since = time.monotonic()
                    self._apply(self._session.playback_stopped(played))
                case RunTools(response_id=response_id, calls=calls):
                    self._start_tools(response_id, calls)
                case CancelTools():
                    self._runner.cancel_interruptible()
                case Emit(event=event):
                    self._emit(event)
        self._changed()

    def _start_tools(self, response_id: str, calls: tuple[ToolCall, ...]) -> None:
        if self._tasks is None:
            log.warning("tool calls of %s dropped: client not running", response_id)
            return
        self._tasks.create_task(self._run_tools(response_id, calls), name=f"tools-{response_id}")

    async def _run_tools(self, response_id: str, calls: tuple[ToolCall, ...]) -> None:
        outcomes = await self._runner.run_all(calls)
        self._apply(self._session.tool_outputs(response_id, outcomes))

    def _emit(self, event: ClientEvent) -> None:
        if isinstance(event, MessageFinalized) and self._on_message is not None:
            _safely(self._on_message, event.message)
        for callback in list(self._event_callbacks):
            _safely(callback, event)

    def _changed(self) -> None:
        # Runs after every server event: cheap because the session hands out the same
        # messages tuple until a message changes, so a snapshot copies no history.
        state = self.state
        previous, self._last_state = self._last_state, state
        if state == previous:
            return
        if state.status != previous.status and self._on_status_change is not None:
            _safely(self._on_status_change, state.status)
        if state.mode != previous.mode and self._on_mode_change is not None:
            _safely(self._on_mode_change, state.mode)
        if state.error is not None and state.error is not previous.error and self._on_error:
            _safely(self._on_error, state.error)
        for callback in list(self._state_callbacks):
            _safely(callback, state)

    def _set_status(self, status: RealtimeStatus) -> None:
        self._conn_status = status
        if status in (RealtimeStatus.IDLE, RealtimeStatus.ERROR):
            self._settled.set()
        else:
            self._settled.clear()
        self._changed()

    # --- audio ----------------------------------------------------------------------

    def device_failed(self, device: str, message: str) -> None:
        """DeviceListener: an audio device failed; the edge keeps retrying."""
        self._report(device, RealtimeError("audio_device", f"{device}: {message}"))

    def device_recovered(self, device: str) -> None:
        """DeviceListener: the device works again."""
        self.report_recovered(device)

    def report_failure(self, part: str, message: str) -> None:
        """A part of the daemon failed and is being restarted: show it as the error."""
        self._report(part, RealtimeError("part_failed", f"{part}: {message}"))

    def report_recovered(self, part: str) -> None:
        """The part (or device) named in an earlier failure works again."""
        if self._device_errors.pop(part, None) is not None:
            self._changed()

    def _report(self, part: str, error: RealtimeError) -> None:
        log.warning("%s", error.message)
        self._device_errors[part] = error
        self._changed()

    async def stop_audio(self) -> None:
        """Stop capture and playback (first step of an orderly shutdown)."""
        await self._stop_audio()

    def _on_drained(self) -> None:
        self._quiet_since = time.monotonic()
        self._apply(self._session.playback_drained())

    def _on_abandoned(self, played: dict[str, int]) -> None:
        # The speaker could not play the answer in time (its device was away): what
        # was heard is what the model keeps, and the message still ends, interrupted.
        self._quiet_since = time.monotonic()
        self._apply(self._session.playback_stopped(played))

    def _mic_gated(self) -> bool:
        """Half duplex: while the assistant talks (and a tail after) the mic is shut."""
        if self._barge_in:
            return False
        if self._session.speaking:
            return True
        return time.monotonic() - self._quiet_since < self._echo_tail_s

    async def _capture(self, source: AudioInput) -> None:
        rate = source.sample_rate
        self._input_meter = LevelMeter(rate)
        to_provider = StreamResampler(rate, PROVIDER_RATE)
        to_vad = StreamResampler(rate, VAD_RATE)
        resample = not to_provider.passthrough  # 24 kHz microphones skip the call
        was_shut = False
        async for frame in source.frames():
            self._input_meter.feed(frame.pcm, frame.captured_at)
            shut = self._mic_muted or self._mic_gated()
            if shut:
                if not was_shut and self._endpointer is not None and not self._endpointer.is_open:
                    # What the VAD heard before the assistant spoke is no preroll for
                    # what the user says after it.
                    self._endpointer.reset()
                was_shut = True
                continue
            was_shut = False
            pcm = to_provider.process(frame.pcm) if resample else frame.pcm
            if self._endpointer is None:
                if pcm:
                    await self._send_audio(pcm)
            else:
                await self._feed_vad(self._endpointer, to_vad.process(frame.pcm), pcm)

    async def _send_audio(self, pcm: bytes) -> None:
        # Streaming audio is awaited straight onto the socket (see `send_audio`).
        if self._session.append_audio(pcm) and self._conn is not None:
            await self._conn.send_audio(pcm)

    def _queue_audio(self, pcm: bytes) -> None:
        # From synchronous paths (a turn opened by push-to-talk): behind the queue.
        if self._session.append_audio(pcm) and self._conn is not None:
            self._conn.send(ev.AppendAudio(pcm))

    async def _feed_vad(self, endpointer: Endpointer, pcm16k: bytes, payload: bytes) -> None:
        # webrtcvad needs whole frames; the payload rides along with the frame it ends in.
        self._vad_pending += pcm16k
        self._payload_pending += payload
        frame_bytes = VAD_RATE * VAD_FRAME_MS // 1000 * 2
        while len(self._vad_pending) >= frame_bytes:
            chunk, self._vad_pending = (
                self._vad_pending[:frame_bytes],
                self._vad_pending[frame_bytes:],
            )
            payload, self._payload_pending = self._payload_pending, b""
            for event in endpointer.process(chunk, payload):
                if isinstance(event, TurnAudio):
                    await self._send_audio(event.payload)
                else:
                    self._vad_event(event)

    def _vad_event(self, event: VadEvent) -> None:
        match event:
            case TurnOpened(preroll=preroll):
                self._apply(self._session.start_listening())
                for chunk in preroll:
                    self._queue_audio(chunk)
            case TurnAudio(payload=payload):
                self._queue_audio(payload)
            case TurnClosed():
                self._apply(self._session.stop_listening())
            case TurnDropped():
                self._apply(self._session.drop_turn())


def _discard(callbacks: list[Callable[..., None]], callback: Callable[..., None]) -> None:
    with contextlib.suppress(ValueError):
        callbacks.remove(callback)


def _safely(callback: Callable[..., None], *args: object) -> None:
    """A subscriber's bug must not break the conversation."""
    try:
        callback(*args)
    except Exception:
        log.exception("state subscriber %r failed", callback)
