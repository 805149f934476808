"""The conversation at work: the session core's effects carried out.

The session (session.py) decides; this carries its decisions out on the serving
connection, the speaker, the tool runner and the subscribers, and feeds the session
what comes back: server events, playback that drained or was cut, tool outcomes. It is
what the connection supervisor reports to (a `ConnectionOwner`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from harkd import events as ev
from harkd.adapters.base import ProviderTraits, RealtimeConnection
from harkd.audio.base import AudioOutput, DeviceListener
from harkd.messages import RealtimeError, RealtimeMode, RealtimeStatus
from harkd.notify import Subscribers
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
from harkd.tools import Tool, ToolCall, ToolRunner

log = logging.getLogger(__name__)


class Conversation:
    """Carries out the session's effects; owns nothing but the wiring."""

    def __init__(
        self,
        settings: ev.SessionSettings,
        traits: ProviderTraits,
        tools: Sequence[Tool],
        output: AudioOutput | None,
        subscribers: Subscribers,
        *,
        connection: Callable[[], RealtimeConnection | None],
        changed: Callable[[], None],
        speaker_quiet: Callable[[], None],
        replay_messages: int,
        answer_heard: Callable[[], None] = lambda: None,
        heard: Callable[[ev.ServerEvent], None] = lambda event: None,
        opened: Callable[[], None] = lambda: None,
    ) -> None:
        """`answer_heard`: an answer played to its end; `heard`: every server event,
        after the session took it; `opened`: a session is ready (after its setup)."""
        if output is not None and output.source_rate != traits.output_format.rate:
            raise ValueError(
                f"the speaker {output.name} takes {output.source_rate} Hz audio; "
                f"the provider speaks at {traits.output_format.rate} Hz"
            )
        self._runner = ToolRunner(tools)
        self.settings = replace(settings, tools=tuple(self._runner.schemas()))
        """What the next session is configured with."""
        self._live_voice = settings.voice
        self.session = Session(
            settings.vad_mode,
            traits=traits,
            voice_interrupts=settings.interrupt_response,
            transcribes=settings.transcription_model is not None,
            has_audio_output=output is not None,
        )
        self._output = output
        self._subscribers = subscribers
        self._connection = connection
        self._changed = changed
        self._speaker_quiet = speaker_quiet
        self._answer_heard = answer_heard
        self._heard = heard
        self._opened = opened
        self._replay_messages = replay_messages
        self.tasks: asyncio.TaskGroup | None = None
        """Where tool calls run (the client's task group while it runs)."""

    def apply(self, effects: Iterable[Effect]) -> None:
        """Carry out the session's effects, then tell subscribers what changed."""
        for effect in effects:
            match effect:
                case Send(command=command):
                    if (conn := self._connection()) is not None:
                        conn.send(command)
                case PlayAudio(item_id=item_id, pcm=pcm):
                    if self._output is not None:
                        self._output.play(item_id, pcm)
                case StopPlayback():
                    played = self._output.stop_playback() if self._output is not None else {}
                    self._speaker_quiet()
                    self.apply(self.session.playback_stopped(played))
                case RunTools(response_id=response_id, calls=calls):
                    self._start_tools(response_id, calls)
                case CancelTools():
                    self._runner.cancel_interruptible()
                case Emit(event=event):
                    self._subscribers.emit(event)
        self._changed()

    def _start_tools(self, response_id: str, calls: tuple[ToolCall, ...]) -> None:
        if self.tasks is None:
            log.warning("tool calls of %s dropped: client not running", response_id)
            return
        self.tasks.create_task(self._run_tools(response_id, calls), name=f"tools-{response_id}")

    async def _run_tools(self, response_id: str, calls: tuple[ToolCall, ...]) -> None:
        outcomes = await self._runner.run_all(calls)
        self.apply(self.session.tool_outputs(response_id, outcomes))

    def new_session_settings(self) -> ev.SessionSettings:
        """The settings a new session opens with; its voice is kept (a provider rule)."""
        self._live_voice = self.settings.voice
        return self.settings

    def update_settings(
        self, instructions: str | None, voice: str | None, tools: Sequence[Tool] | None
    ) -> None:
        """Change instructions, voice or tools; the open session gets them now (with
        the voice it started with)."""
        if tools is not None:
            self._runner.replace_tools(tools)
        self.settings = replace(
            self.settings,
            instructions=self.settings.instructions if instructions is None else instructions,
            voice=self.settings.voice if voice is None else voice,
            tools=tuple(self._runner.schemas()),
        )
        if (conn := self._connection()) is not None:
            conn.update_session(replace(self.settings, voice=self._live_voice))

    # --- the speaker ------------------------------------------------------------------

    async def start_speaker(self, listener: DeviceListener) -> None:
        """Open the speaker and hear when what it was given ends."""
        if self._output is not None:
            self._output.on_drained(self.drained)
            self._output.on_abandoned(self.abandoned)
            await self._output.start(listener)

    def drained(self) -> None:
        """Everything queued for the speaker has been heard."""
        if not self.session.playing:
            return  # a sound of the device's own (the wake chime): no answer ended
        self._speaker_quiet()
        self.apply(self.session.playback_drained())
        self._answer_heard()

    def abandoned(self, played: dict[str, int]) -> None:
        """The speaker could not play the answer in time (its device was away): what
        was heard is what the model keeps, and the message still ends, interrupted."""
        self._speaker_quiet()
        self.apply(self.session.playback_stopped(played))

    # --- ConnectionOwner --------------------------------------------------------------

    def connection_opened(self, conn: RealtimeConnection, resumed: bool) -> None:
        """A provider session: start the conversation's part of it, replaying recent
        context unless the provider resumed the earlier session itself."""
        self.apply(self.session.connected())
        if not resumed:
            self.apply(self.session.replay(self._replay_messages))
        self._opened()

    def connection_event(self, event: ev.ServerEvent) -> None:
        """One server event for the session core."""
        self.apply(self.session.handle(event))
        self._heard(event)

    def connection_closed(self) -> None:
        """The connection is gone: an unfinished answer ends interrupted."""
        self.apply(self.session.disconnected())

    def connection_status(self, status: RealtimeStatus, error: RealtimeError | None) -> None:
        """Status changed: subscribers hear of it."""
        self._changed()

    def between_turns(self) -> bool:
        """A rollover now would cut nobody off."""
        return self.session.mode in (RealtimeMode.LISTENING, RealtimeMode.IDLE)
