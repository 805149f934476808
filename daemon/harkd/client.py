"""`RealtimeClient`: the public facade (the seed's API and state) over three parts.

- `ConnectionSupervisor` (connection.py): connect, backoff, rollover, reconnect;
- `Session` (session.py): the I/O-free conversation core, whose effects are carried
  out here (send, play, stop, run tools, tell subscribers);
- `Capture` (capture.py): the microphone through the capture pipeline.

A Python port of TanStack AI's RealtimeClient (same state, same verbs). All of its work
happens in `run()`, one coroutine a supervisor can own; `connect()` starts it for
library users who have no supervisor.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Literal

from harkd import events as ev
from harkd.adapters.base import RealtimeAdapter
from harkd.arbitration import Arbiter
from harkd.audio import stop_devices
from harkd.audio.base import AudioInput, AudioOutput, MeterReading
from harkd.audio.meter import visualization
from harkd.audio.pipeline import Stage, WakeStage
from harkd.audio.wakeword import WakeDetection
from harkd.backoff import Backoff
from harkd.capture import Capture
from harkd.config import VadConfig, WakeConfig
from harkd.connection import ConnectionSupervisor
from harkd.conversation import Conversation
from harkd.events import VadMode
from harkd.messages import (
    AudioVisualization,
    RealtimeError,
    RealtimeMessage,
    RealtimeMode,
    RealtimeState,
    RealtimeStatus,
    WakeHeard,
)
from harkd.notify import EventCallback, Problems, StateCallback, Subscribers
from harkd.tokens import TokenSource
from harkd.tools import Tool
from harkd.wake import CHIME, load_sound

__all__ = ["RealtimeClient"]

log = logging.getLogger(__name__)

CHIME_ITEM = "harkd-wake-chime"
"""The speaker's name for the chime: no answer of the conversation."""

SPEAKER_LATENCY_MS = 200
"""How late the microphone may hear the chime after it was queued (the speaker's
buffer and the room): the chime must not open a turn by itself."""

IDLE_CHECK_S = 1.0
"""How often an on-demand session checks whether it has been idle long enough."""

MAX_PENDING = 20
"""Typed messages and announcements kept while a session opens."""


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
        reconnect: Backoff | None = None,
        rollover_s: float = 3300.0,
        replay_messages: int = 12,
        volume: int = 100,
        wake: WakeConfig | None = None,
        wake_detector: WakeStage | None = None,
        connect: Literal["always", "on_demand"] = "always",
        idle_disconnect_s: float = 60.0,
        conditioning: Sequence[Stage] = (),
    ) -> None:
        """`wake` (enabled): audio leaves only after a wake word, heard by
        `wake_detector` (built from `wake` when not given). `connect="on_demand"`:
        no session while idle; one opens when needed and closes after
        `idle_disconnect_s` of nothing. `conditioning`: capture stages that clean the
        microphone's audio before anything else hears it
        (`harkd.audio.echo.processing_stages`)."""
        self._input = audio_input
        self._output = audio_output
        self._volume = volume
        self.problems = Problems(self._changed)
        """Failing devices and parts: their `device_failed`, `report_failure`, ..."""
        self._subscribers = Subscribers(
            RealtimeState(volume=volume),
            on_message=on_message,
            on_error=on_error,
            on_status_change=on_status_change,
            on_mode_change=on_mode_change,
        )
        settings = ev.SessionSettings(
            instructions, voice, vad_mode, transcription_model, interrupt_response=barge_in
        )
        self._conversation = Conversation(
            settings,
            adapter.traits,
            tools,
            audio_output,
            self._subscribers,
            connection=lambda: self._connection.conn,
            changed=self._changed,
            speaker_quiet=lambda: self._capture.speaker_quiet(),
            replay_messages=replay_messages,
            answer_heard=self._answer_heard,
            heard=lambda event: self._capture.server_event(event),
            opened=self._session_opened,
        )
        self._session = session = self._conversation.session
        self._apply = self._conversation.apply
        self._connection = ConnectionSupervisor(
            self._conversation,
            adapter,
            get_token,
            self._conversation.new_session_settings,
            reconnect=reconnect,
            rollover_s=rollover_s,
        )
        self._capture = Capture(
            session,
            self._apply,
            lambda: self._connection.conn,
            provider_rate=adapter.traits.input_format.rate,
            barge_in=barge_in,
            echo_tail_ms=echo_tail_ms,
            vad=(vad or VadConfig()) if vad_mode == "manual" else None,
            wake=self._wake_detector(wake, wake_detector, audio_output),
            conditioning=conditioning,
        )
        self._wake = wake if self._capture.ear is not None else None
        self._capture.on_wake = self._wake_heard
        self._capture.on_dropped = self._wake_dropped
        self._chime = b""
        self._chime_ms = 0.0
        if audio_output is not None:
            # The wake word's sound, also played before announcements that ask for it.
            sound = self._wake.sound if self._wake is not None else CHIME
            self._chime = load_sound(sound, audio_output.source_rate)
            self._chime_ms = len(self._chime) / (audio_output.source_rate * 2 / 1000)
        self._last_wake: WakeHeard | None = None
        self.arbiter: Arbiter | None = None
        """With several devices in a home (`wake.arbitration`): who answers a wake word."""
        self._on_demand = connect == "on_demand"
        self._idle_disconnect_s = idle_disconnect_s
        self._last_activity = time.monotonic()
        self._pending: list[Callable[[], None]] = []
        self._announcements: deque[tuple[str, bool]] = deque(maxlen=MAX_PENDING)
        self._run_task: asyncio.Task[None] | None = None
        self._owns_run_task = False

    @staticmethod
    def _wake_detector(
        wake: WakeConfig | None, detector: WakeStage | None, output: AudioOutput | None
    ) -> WakeStage | None:
        """The microphone's detector; with a speaker that reports what it played,
        checked against it (the assistant saying its own wake word does not wake it)."""
        if wake is None or not wake.enabled:
            return None
        from harkd.audio.ownvoice import OwnVoiceCheck
        from harkd.audio.reference import ReportsPlayed
        from harkd.audio.wakeword import WakeDetector

        heard = detector if detector is not None else WakeDetector(wake)
        if not isinstance(output, ReportsPlayed):
            return heard  # a WAV file or no speaker: nothing in the room to hear
        checked = OwnVoiceCheck.around(heard, wake)
        output.report_played(checked.played)
        return checked

    # --- state (the reference's properties) -----------------------------------------

    @property
    def status(self) -> RealtimeStatus:
        """Connection status; `error` while an audio device is down."""
        return RealtimeStatus.ERROR if self.problems.first else self._connection.status

    @property
    def mode(self) -> RealtimeMode:
        """idle / listening / thinking / speaking (idle, not listening, while a wake
        word is awaited)."""
        mode = self._session.mode
        ear = self._capture.ear
        if mode is RealtimeMode.LISTENING and ear is not None and not ear.listening:
            return RealtimeMode.IDLE
        return mode

    @property
    def messages(self) -> tuple[RealtimeMessage, ...]:
        """The recent conversation, in order: the newest messages (at most
        `harkd.session.MESSAGE_WINDOW`); the transcript journal keeps the whole history."""
        return self._session.messages

    @property
    def error(self) -> RealtimeError | None:
        """The current problem, if any: audio device, connection, then provider."""
        return self.problems.first or self._connection.error or self._session.error

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
        return self._capture.muted

    @property
    def volume(self) -> int:
        """Output volume, 0..100."""
        return self._volume

    @property
    def audio(self) -> AudioVisualization | None:
        """Input and output levels and spectra; None when not connected."""
        if self._connection.status is not RealtimeStatus.CONNECTED:
            return None
        speaker = self._output.meter() if self._output else MeterReading()
        return visualization(self._capture.reading(), speaker)

    @property
    def state(self) -> RealtimeState:
        """A snapshot of all of the above (cheap: messages are one stored tuple)."""
        return RealtimeState(
            status=self.status,
            mode=self.mode,
            messages=self.messages,
            error=self.error,
            pending_user_transcript=self.pending_user_transcript,
            pending_assistant_transcript=self.pending_assistant_transcript,
            mic_muted=self.mic_muted,
            volume=self._volume,
        )

    def on_state_change(self, callback: StateCallback) -> Callable[[], None]:
        """Call `callback(state)` after every change; returns the unsubscribe function."""
        return self._subscribers.add_state(callback)

    def on_event(self, callback: EventCallback) -> Callable[[], None]:
        """Call `callback(event)` for finalized messages, partials, tool calls, usage."""
        return self._subscribers.add_events(callback)

    # --- verbs ----------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the session; raises `RealtimeError` if the first attempt fails.

        Later drops are reconnected automatically until `disconnect()`.
        """
        await asyncio.sleep(0)  # a run() task created just before gets to start first
        if self._run_task is None:
            self._run_task = asyncio.create_task(self.run(autoconnect=False), name="harkd-client")
            self._owns_run_task = True
            await asyncio.sleep(0)
        await self._connection.open_once(lambda: self.error)

    async def disconnect(self) -> None:
        """Close the session (audio devices stay open for the next connect)."""
        self._connection.want(False)
        await self._connection.settled.wait()

    def destroy(self) -> None:
        """Release everything: tasks, subscriptions; the client cannot be reused."""
        self._connection.want(False)
        self._subscribers.clear()
        if self._run_task is not None and self._owns_run_task:
            self._run_task.cancel()

    def start_listening(self) -> None:
        """Open a turn now (push-to-talk in manual mode; interrupts the assistant).
        With a wake word it acts as one (word `command`)."""
        if self._wake is not None:
            self._answer_wake(WakeHeard("command", 1.0, 0.0, time.time(), answered=True))
        elif not self._capture.open_turn():
            self._apply(self._session.start_listening())

    def stop_listening(self) -> None:
        """Close the turn: commit it and ask for the answer (manual mode)."""
        if not self._capture.close_turn():
            self._apply(self._session.stop_listening())

    def interrupt(self) -> None:
        """Stop the assistant now: silence, truncate at what was heard, cancel."""
        self._apply(self._session.interrupt())

    def send_text(self, text: str) -> None:
        """Send a typed message; the assistant answers it (once a session is open)."""
        self._when_open(lambda: self._apply(self._session.send_text(text)))

    def send_image(self, data: str, mime_type: str) -> None:
        """Send an image (base64 data or a URL); the assistant answers it."""
        self._when_open(lambda: self._apply(self._session.send_image(data, mime_type)))

    def say(self, text: str) -> None:
        """Make the assistant tell the user something (used by plugins)."""
        self._when_open(lambda: self._apply(self._session.say(text)))

    def announce(self, text: str, chime: bool = False) -> None:
        """Have the assistant read `text` out as it is, after the answer playing now
        (if any), with the wake chime first if `chime`; `wake.follow_up_s` lets the
        user reply. A session opens for it when none is."""
        self._announcements.append((text, chime))
        self._need_session()
        self._announce_next()

    def set_mic_mute(self, muted: bool) -> None:
        """Mute: no microphone audio leaves the device (an open turn is closed)."""
        if self._capture.mute(muted):
            self._apply(self._session.stop_listening())  # the open local turn ends
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
        self._conversation.update_settings(instructions, voice, tools)

    # --- the work -------------------------------------------------------------------

    async def run(self, *, autoconnect: bool = True) -> None:
        """Do everything until cancelled: audio, connection, reconnects, tools."""
        if self._run_task not in (None, asyncio.current_task()):
            raise RuntimeError("this RealtimeClient is already running")
        self._run_task = asyncio.current_task()
        if autoconnect and not self._on_demand:
            self._connection.want(True)
        try:
            async with asyncio.TaskGroup() as tasks:
                if self._on_demand:
                    tasks.create_task(self._close_when_idle(), name="idle-disconnect")
                self._conversation.tasks = tasks
                if self._output is not None:
                    self._output.set_volume(self._volume)
                    await self._conversation.start_speaker(self.problems)
                if self._input is not None:
                    await self._input.start(self.problems)
                    tasks.create_task(self._capture.run(self._input), name="capture")
                tasks.create_task(self._connection.run(), name="session")
        finally:
            self._conversation.tasks = None
            await self.stop_audio()

    async def stop_audio(self) -> None:
        """Stop capture and playback (first step of an orderly shutdown)."""
        await stop_devices(self._input, self._output)

    def _changed(self) -> None:
        if self._announcements:
            self._announce_next()
        self._subscribers.changed(self.state)

    def _announce_next(self) -> None:
        """Start the next announcement once a session is open and the assistant is
        quiet (announcements never cut an answer short)."""
        if self._connection.conn is None or self._session.mode in (
            RealtimeMode.SPEAKING,
            RealtimeMode.THINKING,
        ):
            return
        text, chime = self._announcements.popleft()
        log.info("announcing: %s", text)
        if chime and self._chime and self._output is not None:
            self._output.play(CHIME_ITEM, self._chime)
        self._apply(self._session.announce(text))

    # --- wake word and on-demand sessions ---------------------------------------------

    def _wake_heard(self, detection: WakeDetection) -> None:
        """The detector heard a wake word (see `Capture.on_wake`)."""
        ts = time.time() - (time.monotonic() - detection.captured_at)
        heard = WakeHeard(detection.word, detection.score, detection.level, ts, answered=True)
        if self._capture.muted:
            return  # muted means deaf: not even the wake word counts
        wake = self._wake
        if wake is None:
            return
        busy = self._session.mode in (RealtimeMode.SPEAKING, RealtimeMode.THINKING)
        if busy and not wake.interrupt:
            log.info("wake word %s while the assistant talks: ignored (wake.interrupt)", heard.word)
            self._emit_wake(heard, answered=False)
            return
        tasks = self._conversation.tasks
        if self.arbiter is None or not wake.arbitration or tasks is None:
            self._answer_wake(heard)
            return
        # Listen now, but keep what is said back until the home decided who answers.
        self._capture.holding = True
        self._capture.listen(wake.timeout_s)
        tasks.create_task(self._arbitrate(self.arbiter, heard), name="wake-arbitration")

    async def _arbitrate(self, arbiter: Arbiter, heard: WakeHeard) -> None:
        try:
            answers = await arbiter.claim(heard.word, heard.score, heard.level, heard.ts)
        except Exception:  # an arbiter's bug must not cost the user the answer
            log.exception("wake word arbitration failed; answering")
            answers = True
        if not answers or self._capture.muted:
            self._capture.forget_held()
            self._emit_wake(heard, answered=False)
            self._changed()
            return
        self._capture.holding = False
        self._answer_wake(heard, listening=True)

    def _answer_wake(self, heard: WakeHeard, *, listening: bool = False) -> None:
        """This device answers: stop the assistant, listen (unless `listening`
        already), chime, open a session."""
        if self._wake is None:
            return
        if self._session.mode in (RealtimeMode.SPEAKING, RealtimeMode.THINKING):
            self.interrupt()
        if listening:
            self._capture.waive_echo_tail()
        else:
            self._capture.listen(self._wake.timeout_s)
        if self._chime and self._output is not None:
            self._output.play(CHIME_ITEM, self._chime)
            self._capture.sound_playing(self._chime_ms, SPEAKER_LATENCY_MS)
        self._emit_wake(heard, answered=True)
        self._need_session()
        self._changed()

    def _emit_wake(self, heard: WakeHeard, *, answered: bool) -> None:
        event = WakeHeard(heard.word, heard.score, heard.level, heard.ts, answered)
        self._last_wake = event if answered else None
        log.info(
            "wake word %s (score %.2f, level %.3f)%s",
            heard.word,
            heard.score,
            heard.level,
            "" if answered else ": not answered",
        )
        self._subscribers.emit(event)

    def _wake_dropped(self) -> None:
        """Woken, but nobody spoke in time: that wake word went unanswered."""
        if self._last_wake is not None:
            self._emit_wake(self._last_wake, answered=False)
        self._changed()

    def _answer_heard(self) -> None:
        """An answer played to its end: a follow-up needs no wake word for a while."""
        wake = self._wake
        ear = self._capture.ear
        if wake is None or ear is None or not wake.follow_up_s or ear.listening:
            return
        if self._capture.muted:
            return
        self._last_wake = None  # a silent follow-up window is no dropped wake word
        self._capture.listen(wake.follow_up_s)
        self._changed()

    def _need_session(self) -> None:
        self._last_activity = time.monotonic()
        if self._on_demand:
            self._connection.want(True)

    def _when_open(self, action: Callable[[], None]) -> None:
        """Do `action` now if a session is open, else as soon as one is."""
        self._need_session()
        if self._connection.conn is not None:
            action()
            return
        if not self._connection.wanted:
            return  # disconnected on purpose: like the reference, nothing to send it on
        if len(self._pending) >= MAX_PENDING:
            log.warning("no session yet: the oldest waiting message is dropped")
            del self._pending[0]
        self._pending.append(action)

    def _session_opened(self) -> None:
        pending, self._pending = self._pending, []
        for action in pending:
            action()

    def _busy(self) -> bool:
        ear = self._capture.ear
        return (
            (ear is not None and ear.listening)
            or self._session.mode in (RealtimeMode.SPEAKING, RealtimeMode.THINKING)
            or bool(self._pending)
            or bool(self._announcements)
        )

    async def _close_when_idle(self) -> None:
        """connect: on_demand: close the session after `idle_disconnect_s` of nothing."""
        while True:
            await asyncio.sleep(IDLE_CHECK_S)
            now = time.monotonic()
            if self._busy():
                self._last_activity = now
            elif self._connection.wanted and now - self._last_activity >= self._idle_disconnect_s:
                log.info("idle for %.0f s: the session is closed", self._idle_disconnect_s)
                self._connection.want(False)
