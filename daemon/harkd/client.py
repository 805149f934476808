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
from collections.abc import Callable, Sequence

from harkd import events as ev
from harkd.adapters.base import RealtimeAdapter
from harkd.audio import stop_devices
from harkd.audio.base import AudioInput, AudioOutput, MeterReading
from harkd.audio.meter import visualization
from harkd.audio.pipeline import Stage
from harkd.backoff import Backoff
from harkd.capture import Capture
from harkd.config import VadConfig
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
)
from harkd.notify import EventCallback, Problems, StateCallback, Subscribers
from harkd.tokens import TokenSource
from harkd.tools import Tool

__all__ = ["RealtimeClient"]


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
        conditioning: Sequence[Stage] = (),
    ) -> None:
        """`conditioning`: capture stages that clean the microphone's audio before
        anything else sees it (`harkd.audio.echo.processing_stages`)."""
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
            conditioning=conditioning,
        )
        self._run_task: asyncio.Task[None] | None = None
        self._owns_run_task = False

    # --- state (the reference's properties) -----------------------------------------

    @property
    def status(self) -> RealtimeStatus:
        """Connection status; `error` while an audio device is down."""
        return RealtimeStatus.ERROR if self.problems.first else self._connection.status

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
        """Open a turn now (push-to-talk in manual mode; interrupts the assistant)."""
        if not self._capture.open_turn():
            self._apply(self._session.start_listening())

    def stop_listening(self) -> None:
        """Close the turn: commit it and ask for the answer (manual mode)."""
        if not self._capture.close_turn():
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
        if autoconnect:
            self._connection.want(True)
        try:
            async with asyncio.TaskGroup() as tasks:
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
        self._subscribers.changed(self.state)
