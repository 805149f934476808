"""The realtime session as a state machine free of I/O.

Decoded server events and user intents go in; state changes, commands for the
provider and actions for the audio and tool edges come out. The client executes the
actions and feeds back what only the edges know (how much audio was really played,
what the tools returned, when the speaker went quiet).

This is where harkd differs from the reference client: transcripts accumulate per
item and are matched by item id, manual turns are committed (never under 100 ms),
barge-in truncates at what was heard and drops late audio, and the calls of one
response are answered together, followed by exactly one request for a response.

It knows no provider: commands and events are the neutral ones of `harkd.events`, and
what differs between providers comes in as their `ProviderTraits`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeAlias, TypeVar

from harkd import events as ev
from harkd.adapters.base import AudioFormat, ProviderTraits
from harkd.audio.base import PROVIDER_RATE
from harkd.messages import (
    AudioPart,
    ClientEvent,
    ImagePart,
    MessageFinalized,
    PartialTranscript,
    RealtimeError,
    RealtimeMessage,
    RealtimeMode,
    TextPart,
    ToolCallFinished,
    ToolCallPart,
    ToolResultPart,
    UsageReported,
    is_data_url,
    is_url,
)
from harkd.tools import ToolCall, ToolOutcome

log = logging.getLogger(__name__)

DEFAULT_TRAITS = ProviderTraits(
    input_format=AudioFormat(PROVIDER_RATE),
    output_format=AudioFormat(PROVIDER_RATE),
    server_turns=True,
    manual_turns=True,
    answers_by_itself=False,
    can_truncate=True,
    resume="replay",
)
"""What a session assumes when not told its provider's traits: those of the OpenAI
adapter, the provider harkd started with."""

MESSAGE_WINDOW = 200
"""Messages kept in memory; older ones live only in the transcript journal. Enough for
`replay_messages` at its limit (100 spoken messages, with tool calls in between) and
for every message still in flight."""

_OPEN_ITEMS = 8
"""Per-item scratch (partial transcripts, speech timing) is kept for this many items:
more are never open at once, and an item the server never finishes is forgotten."""


# --- actions for the client --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send a command to the provider."""

    command: ev.Command


@dataclass(frozen=True, slots=True)
class PlayAudio:
    """Queue response audio (PCM16 in the provider's output format) for the speaker."""

    item_id: str
    pcm: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class StopPlayback:
    """Silence the speaker now, then report `Session.playback_stopped(played)`."""


@dataclass(frozen=True, slots=True)
class RunTools:
    """Run these calls, then report `Session.tool_outputs(response_id, outcomes)`."""

    response_id: str
    calls: tuple[ToolCall, ...]


@dataclass(frozen=True, slots=True)
class CancelTools:
    """A barge-in: cancel the running calls of tools that ask for it."""


@dataclass(frozen=True, slots=True)
class Emit:
    """Tell subscribers (MQTT, journal) about something that happened once."""

    event: ClientEvent


Effect: TypeAlias = Send | PlayAudio | StopPlayback | RunTools | CancelTools | Emit


@dataclass
class _Response:
    id: str
    item_ids: list[str] = field(default_factory=list)
    calls: dict[str, ToolCall] = field(default_factory=dict)
    has_output: bool = False
    cancelled: bool = False
    done: bool = False


_V = TypeVar("_V")


def _remember(table: dict[str, _V], key: str, value: _V) -> None:
    """`table[key] = value`, dropping the oldest key beyond `_OPEN_ITEMS`."""
    table[key] = value
    if len(table) > _OPEN_ITEMS:
        del table[next(iter(table))]


def local_item_id() -> str:
    """An id for items harkd creates (the provider allows at most 32 characters)."""
    return f"item_hk{uuid.uuid4().hex[:24]}"


class Session:
    """Conversation state and turn-taking rules for one realtime conversation.

    It lives across reconnects: messages survive, per-connection bookkeeping does not.
    Its memory does not grow with the conversation: it keeps the newest `max_messages`
    messages, and forgets each item's and each response's bookkeeping once they are
    final.
    """

    def __init__(
        self,
        vad_mode: ev.VadMode = "server",
        *,
        traits: ProviderTraits = DEFAULT_TRAITS,
        voice_interrupts: bool = True,
        transcribes: bool = True,
        has_audio_output: bool = True,
        max_messages: int = MESSAGE_WINDOW,
    ) -> None:
        """`ValueError` when the provider cannot take turns the way `vad_mode` asks."""
        if not (traits.manual_turns if vad_mode == "manual" else traits.server_turns):
            raise ValueError(f"the provider cannot take vad_mode {vad_mode!r} turns")
        self.vad_mode = vad_mode
        self.traits = traits
        self._in_bytes_per_ms = traits.input_format.bytes_per_ms
        self._out_bytes_per_ms = traits.output_format.bytes_per_ms
        self.voice_interrupts = voice_interrupts
        self.transcribes = transcribes
        self.has_audio_output = has_audio_output
        self.max_messages = max_messages

        # The window, by item id in conversation order, and its tuple form, built
        # again only after a message changed (state is read after every event).
        self._messages: dict[str, RealtimeMessage] = {}
        self._snapshot: tuple[RealtimeMessage, ...] | None = ()
        self._final: set[str] = set()
        self.error: RealtimeError | None = None
        self.pending_user_transcript: str | None = None
        self.pending_assistant_transcript: str | None = None

        self._connected = False
        self._playing = False
        self._user_speaking = False
        self._turn_open = False
        self._turn_ms = 0.0
        self._awaiting_response = False
        self._response_requested = False
        self._want_response = False
        self._tools_running = 0
        self._response: _Response | None = None
        self._responses: dict[str, _Response] = {}
        self._received_ms: dict[str, float] = {}
        self._carried: dict[str, float] = {}
        """Complete items of an earlier connection still playing: ms received of each."""
        self._partials: dict[str, str] = {}
        self._final_text: dict[str, str] = {}
        self._speech_start_ms: dict[str, int] = {}
        self._speech_ms: dict[str, int] = {}
        self._turn_since_tools = False

    # --- state -------------------------------------------------------------------

    @property
    def messages(self) -> tuple[RealtimeMessage, ...]:
        """The newest `max_messages` messages of the conversation, in order."""
        if self._snapshot is None:
            self._snapshot = tuple(self._messages.values())
        return self._snapshot

    @property
    def speaking(self) -> bool:
        """Mode is speaking: the answer plays, or is still arriving while the speaker ran
        dry. Asked for every microphone frame (half duplex), so it is kept cheap."""
        if self._playing:
            return self._connected
        response = self._response
        return (
            response is not None
            and response.has_output
            and not response.cancelled
            and self._connected
        )

    @property
    def playing(self) -> bool:
        """An answer of this conversation is in the speaker (not any other sound)."""
        return self._playing

    @property
    def mode(self) -> RealtimeMode:
        """What the conversation is doing, derived from the turn flags."""
        if not self._connected:
            return RealtimeMode.IDLE
        if self.speaking:
            return RealtimeMode.SPEAKING
        response = self._response
        if response is not None and not response.cancelled:
            return RealtimeMode.THINKING
        if self._awaiting_response or self._response_requested or self._tools_running:
            return RealtimeMode.THINKING
        if self._user_speaking or self._turn_open:
            return RealtimeMode.LISTENING
        return RealtimeMode.IDLE if self.vad_mode == "manual" else RealtimeMode.LISTENING

    # --- connection ----------------------------------------------------------------

    def connected(self) -> list[Effect]:
        """A new provider session is ready; forget what belonged to the old one."""
        self._connected = True
        # An answer of the old connection may still be playing: it ends when it has
        # been heard (or is cut), not never. Its items are gone from the new session.
        self._carried.update(
            (item_id, ms)
            for item_id, ms in self._received_ms.items()
            if self._item_complete(item_id)
        )
        self._response = None
        self._responses.clear()
        self._received_ms.clear()
        self._speech_start_ms.clear()
        self._speech_ms.clear()
        self._response_requested = self._want_response = self._awaiting_response = False
        self._user_speaking = self._turn_open = False
        return []

    def disconnected(self) -> list[Effect]:
        """The connection is gone: an unfinished answer ends interrupted."""
        self._connected = False
        effects: list[Effect] = []
        if self._response is not None:
            effects += self._finish_response(self._response, interrupted=True)
            self._response = None
        self._user_speaking = self._turn_open = False
        self._awaiting_response = self._response_requested = self._want_response = False
        return effects

    def replay(self, last: int) -> list[Effect]:
        """Recreate the last messages' text as items of a fresh session (context)."""
        effects: list[Effect] = []
        spoken = (
            [m for m in self._messages.values() if m.id in self._final and m.text][-last:]
            if last
            else []
        )
        for message in spoken:
            item = ev.CreateMessage(item_id=local_item_id(), role=message.role, text=message.text)
            effects.append(Send(item))
        return effects

    # --- user intents --------------------------------------------------------------

    def append_audio(self, pcm: bytes) -> bool:
        """Whether microphone audio (in the provider's input format) may go to it now.

        Audio is the data plane, 50 chunks a second: the caller sends it itself rather
        than through an effect, and the session only counts it into the open turn.
        """
        if not self._connected or (self.vad_mode == "manual" and not self._turn_open):
            return False
        self._turn_ms += len(pcm) / self._in_bytes_per_ms
        return True

    def start_listening(self) -> list[Effect]:
        """Open a turn: interrupt the assistant if it talks, then stream fresh audio."""
        if not self._connected:
            return []
        effects = self._barge_in(server_cancels=False)
        if self.vad_mode == "manual":
            self._turn_open = True
            self._turn_ms = 0.0
            self._turn_since_tools = True
            effects.append(Send(ev.StartTurn()))
        return effects

    def stop_listening(self) -> list[Effect]:
        """Close a manual turn: end it and have it answered, or drop a too short one."""
        if not self._turn_open:
            return []
        self._turn_open = False
        if self._turn_ms < ev.MIN_COMMIT_MS:
            log.info("turn of %.0f ms dropped (under %d ms)", self._turn_ms, ev.MIN_COMMIT_MS)
            return [Send(ev.DiscardTurn())]
        self._awaiting_response = True
        if self.traits.answers_by_itself:
            return [Send(ev.EndTurn())]
        return [Send(ev.EndTurn()), *self._request_response()]

    def drop_turn(self) -> list[Effect]:
        """Forget an open manual turn without committing it (too little speech)."""
        if not self._turn_open:
            return []
        self._turn_open = False
        return [Send(ev.DiscardTurn())]

    def discard_input(self) -> list[Effect]:
        """Forget what the server holds of the user's turn (woken, nobody spoke)."""
        if not self._connected:
            return []
        self._user_speaking = False
        return [Send(ev.DiscardTurn())]

    def interrupt(self) -> list[Effect]:
        """Stop the assistant now (local decision: the server will not cancel)."""
        return self._barge_in(server_cancels=False)

    def send_text(self, text: str) -> list[Effect]:
        """A typed user message, answered by the assistant."""
        message = RealtimeMessage(id=local_item_id(), role="user", parts=(TextPart(text),))
        return self._send_message(message, ev.CreateMessage(message.id, "user", text=text))

    def send_image(self, data: str, mime_type: str) -> list[Effect]:
        """An image (base64 or URL) for the assistant to look at and answer."""
        url = data if is_url(data) or is_data_url(data) else f"data:{mime_type};base64,{data}"
        message = RealtimeMessage(
            id=local_item_id(), role="user", parts=(ImagePart(data, mime_type),)
        )
        return self._send_message(message, ev.CreateMessage(message.id, "user", image_url=url))

    def say(self, text: str) -> list[Effect]:
        """Have the assistant tell the user something (timers, plugins); never interrupts."""
        if not self._connected:
            return []
        instruction = f"Tell the user now, briefly and naturally: {text}"
        return [
            Send(ev.CreateMessage(local_item_id(), "system", text=instruction)),
            *self._request_response(),
        ]

    def announce(self, text: str) -> list[Effect]:
        """Have the assistant read `text` out as it is (an announcement); never
        interrupts (the caller waits until the assistant is quiet)."""
        if not self._connected:
            return []
        instruction = (
            "Read this announcement to the user exactly as written, word for word, "
            f"adding nothing before or after it: {text}"
        )
        if self._response is not None or self._response_requested:
            self._want_response = True  # the announcement's turn comes after this answer
            return [Send(ev.CreateMessage(local_item_id(), "system", text=instruction))]
        self._response_requested = True
        return [
            Send(ev.CreateMessage(local_item_id(), "system", text=instruction)),
            Send(ev.RequestResponse(instructions=instruction)),
        ]

    def _send_message(self, message: RealtimeMessage, command: ev.CreateMessage) -> list[Effect]:
        if not self._connected:
            return []
        effects = self._barge_in(server_cancels=False)
        self._turn_since_tools = True
        self._add(message)
        effects += self._finalize(message.id)
        effects.append(Send(command))
        self._awaiting_response = True
        return effects + self._request_response()

    # --- edge feedback -------------------------------------------------------------

    def playback_stopped(self, played: dict[str, int]) -> list[Effect]:
        """The speaker was silenced; `played` is ms heard per item at that instant."""
        self._playing = False
        effects: list[Effect] = []
        for item_id, played_ms in played.items():
            carried = self._carried.get(item_id)
            if carried is not None:
                # An earlier connection's item: nothing left there to cut.
                if played_ms < carried:
                    self._mark_interrupted(item_id, int(played_ms))
                effects += self._finalize(item_id)
                del self._carried[item_id]
                continue
            received = self._received_ms.get(item_id)
            if received is None:
                continue
            heard = int(min(played_ms, received))
            if heard < int(received):
                # Cut the server's copy at what the user heard, where it can be cut;
                # at 0 there is nothing of it in the user's ears anyway.
                if heard > 0 and self.traits.can_truncate:
                    effects.append(Send(ev.TruncateItem(item_id, heard)))
                self._mark_interrupted(item_id, heard)
        return effects + self._finish_interrupted()

    def playback_drained(self) -> list[Effect]:
        """Everything queued has been heard."""
        if not self._playing:
            return []
        self._playing = False
        effects: list[Effect] = []
        for item_id in list(self._carried):
            effects += self._finalize(item_id)
        self._carried.clear()
        for item_id in list(self._received_ms):
            if self._item_complete(item_id):
                effects += self._finalize(item_id)
        return effects

    def tool_outputs(self, response_id: str, outcomes: list[ToolOutcome]) -> list[Effect]:
        """All calls of one response are done: send every output, then one response."""
        self._tools_running = max(0, self._tools_running - 1)
        effects: list[Effect] = []
        for outcome in outcomes:
            call = outcome.call
            text = outcome.output_text()
            effects.append(Send(ev.ToolResult(call.call_id, call.name, text)))
            effects += self._record_tool_result(call, text)
            effects.append(
                Emit(
                    ToolCallFinished(
                        call_id=call.call_id,
                        name=call.name,
                        arguments=call.arguments,
                        output=outcome.output,
                        error=outcome.error,
                        duration_ms=outcome.duration_ms,
                    )
                )
            )
        if not self._connected:
            return effects
        if self._turn_since_tools:
            # The user spoke since: their new turn gets the answer, with the outputs
            # already in context.
            log.info("tool outputs of %s sent without a new response (user spoke)", response_id)
            return effects
        self._awaiting_response = True
        return effects + self._request_response()

    # --- server events -------------------------------------------------------------

    def handle(self, event: ev.ServerEvent) -> list[Effect]:
        """Apply one decoded server event."""
        handler = _HANDLERS.get(type(event))
        return [] if handler is None else handler(self, event)

    def _on_AudioDropped(self, event: ev.AudioDropped) -> list[Effect]:
        # The turn holds what really reached the provider: a commit is decided on that.
        if self._turn_open:
            self._turn_ms = max(0.0, self._turn_ms - event.pcm_bytes / self._in_bytes_per_ms)
        return []

    def _on_SpeechStarted(self, event: ev.SpeechStarted) -> list[Effect]:
        self._user_speaking = True
        self._turn_since_tools = True
        _remember(self._speech_start_ms, event.item_id, event.audio_start_ms)
        if not self.voice_interrupts:
            return []
        # A server that decides turns cancels its own answer when the user speaks.
        return self._barge_in(server_cancels=True)

    def _on_SpeechStopped(self, event: ev.SpeechStopped) -> list[Effect]:
        self._user_speaking = False
        start = self._speech_start_ms.pop(event.item_id, None)
        if start is not None:
            _remember(self._speech_ms, event.item_id, max(0, event.audio_end_ms - start))
        self._awaiting_response = True
        return []

    def _on_InputCommitted(self, event: ev.InputCommitted) -> list[Effect]:
        self._user_speaking = False
        if event.item_id not in self._messages:
            self._add(self._user_audio_message(event.item_id))
        return []

    def _on_ItemAdded(self, event: ev.ItemAdded) -> list[Effect]:
        if event.item_id in self._messages:
            return []  # our own item echoed back, or already known from the commit
        if event.kind == "message" and event.role == "user" and event.has_audio:
            self._add(self._user_audio_message(event.item_id))
            if not self.transcribes:
                return self._finalize(event.item_id)
        return []

    def _user_audio_message(self, item_id: str) -> RealtimeMessage:
        duration = self._speech_ms.pop(item_id, None)
        if duration is None and self.vad_mode == "manual":
            duration = int(self._turn_ms)
        return RealtimeMessage(
            id=item_id, role="user", parts=(AudioPart("", duration),), duration_ms=duration
        )

    def _on_UserTranscriptDelta(self, event: ev.UserTranscriptDelta) -> list[Effect]:
        text = self._partials.get(event.item_id, "") + event.delta
        _remember(self._partials, event.item_id, text)
        self.pending_user_transcript = text
        return [Emit(PartialTranscript("user", event.item_id, text))]

    def _on_UserTranscriptDone(self, event: ev.UserTranscriptDone) -> list[Effect]:
        return self._user_transcript_final(event.item_id, event.transcript.strip())

    def _on_UserTranscriptFailed(self, event: ev.UserTranscriptFailed) -> list[Effect]:
        log.warning("transcription of %s failed: %s", event.item_id, event.message)
        return self._user_transcript_final(event.item_id, self._partials.get(event.item_id, ""))

    def _user_transcript_final(self, item_id: str, transcript: str) -> list[Effect]:
        self._partials.pop(item_id, None)
        self.pending_user_transcript = None
        if item_id not in self._messages:
            # Transcript before the item: remember the message now, in order.
            self._add(self._user_audio_message(item_id))
        message = self._message(item_id)
        parts = tuple(
            replace(p, transcript=transcript) if isinstance(p, AudioPart) else p
            for p in message.parts
        )
        self._put(replace(message, parts=parts))
        return self._finalize(item_id)

    def _on_ResponseCreated(self, event: ev.ResponseCreated) -> list[Effect]:
        self._response_requested = False
        self._awaiting_response = False
        self._forget_finished()
        response = _Response(event.response_id)
        self._response = response
        self._responses[event.response_id] = response
        return []

    def _on_OutputItemAdded(self, event: ev.OutputItemAdded) -> list[Effect]:
        response = self._responses.get(event.response_id)
        if response is None or response.cancelled:
            return []
        response.item_ids.append(event.item_id)
        if event.kind == "message":
            self._add(RealtimeMessage(id=event.item_id, role="assistant"))
        elif event.kind == "function_call":
            part = ToolCallPart(id=event.call_id or "", name=event.name or "", arguments="")
            self._add(RealtimeMessage(id=event.item_id, role="assistant", parts=(part,)))
        return []

    def _on_AudioDelta(self, event: ev.AudioDelta) -> list[Effect]:
        if self._dropped(event.response_id):
            return []
        self._track_output(event.response_id, event.item_id)
        self._received_ms[event.item_id] = (
            self._received_ms.get(event.item_id, 0.0) + len(event.pcm) / self._out_bytes_per_ms
        )
        if not self.has_audio_output:
            return []
        self._playing = True
        return [PlayAudio(event.item_id, event.pcm)]

    def _on_AssistantTranscriptDelta(self, event: ev.AssistantTranscriptDelta) -> list[Effect]:
        if self._dropped(event.response_id):
            return []
        self._track_output(event.response_id, event.item_id)
        text = self._partials.get(event.item_id, "") + event.delta
        _remember(self._partials, event.item_id, text)
        self.pending_assistant_transcript = text
        return [Emit(PartialTranscript("assistant", event.item_id, text))]

    def _on_AssistantTranscriptDone(self, event: ev.AssistantTranscriptDone) -> list[Effect]:
        if not self._dropped(event.response_id) and event.item_id not in self._final:
            _remember(self._final_text, event.item_id, event.text)
        return []

    def _on_FunctionCallDone(self, event: ev.FunctionCallDone) -> list[Effect]:
        response = self._responses.get(event.response_id)
        if response is None or response.cancelled:
            return []
        self._note_call(response, event)
        return []

    def _note_call(self, response: _Response, event: ev.FunctionCallDone) -> None:
        # A call may come on its own and again with its response's end: note it once.
        if event.call_id in response.calls:
            return
        response.calls[event.call_id] = ToolCall(event.call_id, event.name, event.arguments)
        if event.item_id not in self._messages:
            self._add(RealtimeMessage(id=event.item_id, role="assistant"))
            response.item_ids.append(event.item_id)
        part = ToolCallPart(id=event.call_id, name=event.name, arguments=event.arguments)
        self._put(replace(self._message(event.item_id), parts=(part,)))

    def _on_ResponseDone(self, event: ev.ResponseDone) -> list[Effect]:
        response = self._responses.get(event.response_id) or _Response(event.response_id)
        self._responses[event.response_id] = response
        response.done = True
        if self._response is response:
            self._response = None
        effects: list[Effect] = []
        if event.usage is not None:
            effects.append(Emit(UsageReported(event.response_id, event.status, event.usage)))
        cancelled = event.status != "completed" or response.cancelled
        if event.status == "failed":
            code = event.error_code or "response_failed"
            self.error = RealtimeError(code, f"response {event.response_id} failed")
        elif event.status == "completed":
            self.error = None
        for call in event.function_calls:
            if not response.cancelled:
                self._note_call(response, call)
        effects += self._finish_response(response, interrupted=cancelled)
        if response.calls and not cancelled:
            self._tools_running += 1
            self._turn_since_tools = False
            effects.append(RunTools(response.id, tuple(response.calls.values())))
        if self._want_response:
            self._want_response = False
            effects += self._request_response()
        return effects

    def _on_ServerError(self, event: ev.ServerError) -> list[Effect]:
        if event.kind == "harmless":
            # We raced the server (e.g. cancelled an answer that had just ended).
            log.debug("ignored server error %s", event.code)
            return []
        if event.kind == "busy":
            # Our request raced a response the server started: ask again after it.
            self._response_requested = False
            self._want_response = True
            return []
        if event.kind == "empty_turn":
            self._awaiting_response = False
        log.warning("server error %s: %s", event.code, event.message)
        self.error = RealtimeError(event.code, event.message)
        return []

    # --- helpers -------------------------------------------------------------------

    def _barge_in(self, *, server_cancels: bool) -> list[Effect]:
        response = self._response
        if not self._playing and response is None:
            return []
        log.info("barge-in (%s)", "server cancels" if server_cancels else "local")
        effects: list[Effect] = [CancelTools()]
        if response is not None and not response.cancelled:
            response.cancelled = True
            if not server_cancels:
                effects.append(Send(ev.CancelResponse()))
        if self._playing:
            # The client answers with playback_stopped(played), which truncates.
            return [StopPlayback(), *effects]
        return effects + self._finish_interrupted()

    def _finish_interrupted(self) -> list[Effect]:
        # Items of a cancelled response end interrupted; items of finished responses
        # that were still playing end now (marked if they were cut short).
        effects: list[Effect] = []
        for response in self._responses.values():
            if response is self._response and not response.cancelled:
                continue
            for item_id in response.item_ids:
                effects += self._finalize(item_id, interrupted=response.cancelled)
        return effects

    def _finish_response(self, response: _Response, *, interrupted: bool) -> list[Effect]:
        effects: list[Effect] = []
        for item_id in response.item_ids:
            if interrupted:
                effects += self._finalize(item_id, interrupted=True)
            elif not (self._playing and item_id in self._received_ms):
                effects += self._finalize(item_id)
        return effects

    def _item_complete(self, item_id: str) -> bool:
        return any(
            item_id in r.item_ids and r is not self._response for r in self._responses.values()
        )

    def _forget_finished(self) -> None:
        # A response that is done and whose items are all final is never referred to
        # again: forgetting it keeps barge-in and drain scans as short as one turn.
        finished = [
            response_id
            for response_id, response in self._responses.items()
            if response.done
            and all(i in self._final or i not in self._messages for i in response.item_ids)
        ]
        for response_id in finished:
            del self._responses[response_id]

    def _mark_interrupted(self, item_id: str, heard_ms: int) -> None:
        if item_id in self._messages and item_id not in self._final:
            message = self._message(item_id)
            self._put(replace(message, interrupted=True, duration_ms=heard_ms))

    def _request_response(self) -> list[Effect]:
        if self._response is not None or self._response_requested:
            self._want_response = True
            return []
        self._response_requested = True
        return [Send(ev.RequestResponse())]

    def _dropped(self, response_id: str) -> bool:
        response = self._responses.get(response_id)
        return response is not None and response.cancelled

    def _track_output(self, response_id: str, item_id: str) -> None:
        response = self._responses.get(response_id)
        if response is not None:
            response.has_output = True
            if item_id not in response.item_ids:
                response.item_ids.append(item_id)
        if item_id not in self._messages:
            self._add(RealtimeMessage(id=item_id, role="assistant"))

    def _record_tool_result(self, call: ToolCall, text: str) -> list[Effect]:
        # Newest first: the call is one of the last messages.
        for message in reversed(self._messages.values()):
            for part in message.parts:
                if isinstance(part, ToolCallPart) and part.id == call.call_id:
                    parts = (replace(part, output=text), ToolResultPart(call.call_id, text))
                    self._put(replace(message, parts=parts))
                    return self._finalize(message.id)
        return []

    def _finalize(self, item_id: str, *, interrupted: bool = False) -> list[Effect]:
        if item_id not in self._messages or item_id in self._final:
            return []
        message = self._message(item_id)
        if message.role == "assistant" and not any(
            isinstance(p, ToolCallPart) for p in message.parts
        ):
            message = self._assistant_final(message, interrupted)
        elif any(isinstance(p, ToolCallPart) and p.output is None for p in message.parts):
            if not interrupted:
                return []  # a call is final once its output is known
            message = replace(message, interrupted=True)
        self._put(message)
        self._final.add(item_id)
        # Nothing is added to a final item: its audio count (truncation is decided
        # before) and any scratch go.
        self._received_ms.pop(item_id, None)
        self._partials.pop(item_id, None)
        self._final_text.pop(item_id, None)
        return [Emit(MessageFinalized(message))]

    def _assistant_final(self, message: RealtimeMessage, interrupted: bool) -> RealtimeMessage:
        item_id = message.id
        partial = self._partials.pop(item_id, "")
        text = self._final_text.pop(item_id, partial)
        self.pending_assistant_transcript = None
        received = self._received_ms.get(item_id, self._carried.get(item_id))
        part: AudioPart | TextPart = TextPart(text)
        duration = None
        if received is not None:
            cut = message.interrupted and message.duration_ms is not None
            duration = message.duration_ms if cut else int(received)
            part = AudioPart(text, duration)
        return replace(
            message,
            parts=(part,),
            interrupted=message.interrupted or interrupted,
            duration_ms=duration,
        )

    def _add(self, message: RealtimeMessage) -> None:
        self._messages[message.id] = message
        self._snapshot = None
        while len(self._messages) > self.max_messages:
            # The oldest leaves memory (the journal has it once final). One still open
            # after this many newer messages never gets finished by the server.
            oldest = next(iter(self._messages))
            del self._messages[oldest]
            self._final.discard(oldest)
            self._received_ms.pop(oldest, None)
            self._partials.pop(oldest, None)
            self._final_text.pop(oldest, None)

    def _put(self, message: RealtimeMessage) -> None:
        self._messages[message.id] = message
        self._snapshot = None

    def _message(self, item_id: str) -> RealtimeMessage:
        return self._messages[item_id]


# One table from event type to handler; events not listed change nothing.
_HANDLERS: dict[type, Callable[[Session, Any], list[Effect]]] = {
    ev.AudioDropped: Session._on_AudioDropped,
    ev.SpeechStarted: Session._on_SpeechStarted,
    ev.SpeechStopped: Session._on_SpeechStopped,
    ev.InputCommitted: Session._on_InputCommitted,
    ev.ItemAdded: Session._on_ItemAdded,
    ev.UserTranscriptDelta: Session._on_UserTranscriptDelta,
    ev.UserTranscriptDone: Session._on_UserTranscriptDone,
    ev.UserTranscriptFailed: Session._on_UserTranscriptFailed,
    ev.ResponseCreated: Session._on_ResponseCreated,
    ev.OutputItemAdded: Session._on_OutputItemAdded,
    ev.AudioDelta: Session._on_AudioDelta,
    ev.AssistantTranscriptDelta: Session._on_AssistantTranscriptDelta,
    ev.AssistantTranscriptDone: Session._on_AssistantTranscriptDone,
    ev.FunctionCallDone: Session._on_FunctionCallDone,
    ev.ResponseDone: Session._on_ResponseDone,
    ev.ServerError: Session._on_ServerError,
}
