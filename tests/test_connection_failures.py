"""One failure model for a connection: whatever ends or breaks it while it serves is a
lost connection, logged once and reconnected, with microphone and speaker untouched.

These run on the distribution's Python (3.11.2 in CI), where an exception raised in an
`except*` block used to come out wrapped in an ExceptionGroup and restart the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from websockets.protocol import State

from e2e import Running, fake_client, sent_types, until
from harkd import events as ev
from harkd import session as session_module
from harkd.adapters import openai as openai_adapter
from harkd.adapters.base import ProtocolError
from harkd.adapters.openai import OpenAIConnection, openai_realtime, parse
from harkd.audio.base import DeviceListener
from harkd.audio.wav import NullOutput, WavInput
from harkd.client import RealtimeClient
from harkd.messages import RealtimeStatus
from harkd.session import Send, Session
from harkd.testing import FakeRealtimeServer, FakeScript

KEY = "sk-test-failures"

# --- the decoder: garbage in, an event or a ProtocolError out ----------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
FIELD_NAMES = [
    "item_id", "response_id", "delta", "item", "response", "error", "audio_start_ms",
    "audio_end_ms", "transcript", "text", "call_id", "name", "arguments", "session",
    "previous_item_id", "id", "type", "content", "output", "status", "usage", "message",
]  # fmt: skip
known_events = st.fixed_dictionaries(
    {"type": st.sampled_from(sorted(openai_adapter._DECODERS))},
    optional={name: json_values for name in FIELD_NAMES if name != "type"},
)


def decodes_or_refuses(frame: str | bytes) -> None:
    try:
        event = parse(frame)
    except ProtocolError:
        return
    assert type(event).__name__ in ev.__dict__


@given(st.text() | st.binary())
def test_any_frame_decodes_or_is_a_protocol_error(frame: str | bytes) -> None:
    decodes_or_refuses(frame)


@given(json_values)
def test_any_json_decodes_or_is_a_protocol_error(value: Any) -> None:
    decodes_or_refuses(json.dumps(value))


@settings(max_examples=400)
@given(known_events)
@example({"type": "response.output_audio.delta", "delta": "\x80"})  # not even ASCII
def test_known_events_with_random_fields_decode_or_are_protocol_errors(
    event: dict[str, Any],
) -> None:
    decodes_or_refuses(json.dumps(event))


# --- the session: any sequence of well-typed events and intents ---------------------

ids = st.sampled_from(["a", "b", "c", ""])
texts = st.text(max_size=5)
ms = st.integers(min_value=-5, max_value=5000)
server_events = st.one_of(
    st.builds(ev.SessionReady, ids),
    st.builds(ev.SessionUpdated),
    st.builds(ev.SpeechStarted, ids, ms),
    st.builds(ev.SpeechStopped, ids, ms),
    st.builds(ev.InputCommitted, ids, st.none() | ids),
    st.builds(ev.InputCleared),
    st.builds(
        ev.ItemAdded,
        ids,
        st.sampled_from(["message", "function_call", "function_call_output", "other"]),
        st.sampled_from([None, "user", "assistant", "system"]),
        st.none() | ids,
        st.none() | texts,
        st.booleans(),
    ),
    st.builds(ev.UserTranscriptDelta, ids, texts),
    st.builds(ev.UserTranscriptDone, ids, texts),
    st.builds(ev.UserTranscriptFailed, ids, texts),
    st.builds(ev.ResponseCreated, ids),
    st.builds(
        ev.OutputItemAdded,
        ids,
        ids,
        st.sampled_from(["message", "function_call", "other"]),
        st.none() | ids,
        st.none() | texts,
    ),
    st.builds(ev.AudioDelta, ids, ids, st.binary(max_size=96)),
    st.builds(ev.AudioDone, ids, ids),
    st.builds(ev.AssistantTranscriptDelta, ids, ids, texts, st.booleans()),
    st.builds(ev.AssistantTranscriptDone, ids, ids, texts, st.booleans()),
    st.builds(ev.FunctionCallDone, ids, ids, ids, texts, st.sampled_from(["{}", "[", "1"])),
    st.builds(
        ev.ResponseDone,
        ids,
        st.sampled_from(["completed", "cancelled", "failed", "incomplete"]),
        st.none(),
        st.none() | texts,
    ),
    st.builds(ev.ItemTruncated, ids, ms),
    st.builds(
        ev.ServerError,
        texts,
        texts,
        st.sampled_from(["harmless", "auth", "busy", "empty_turn", "expired", "other"]),
    ),
    st.builds(ev.AudioDropped, st.integers(min_value=0, max_value=10_000)),
    st.builds(ev.GoingAway, st.none() | ms),
    st.builds(ev.ResumeHandle, texts),
    st.builds(ev.Unknown, texts),
)
INTENTS: dict[str, Callable[[Session], object]] = {
    "start_listening": Session.start_listening,
    "stop_listening": Session.stop_listening,
    "drop_turn": Session.drop_turn,
    "interrupt": Session.interrupt,
    "send_text": lambda s: s.send_text("hi"),
    "say": lambda s: s.say("a timer is done"),
    "append_audio": lambda s: s.append_audio(bytes(960)),
    "playback_stopped": lambda s: s.playback_stopped({"a": 120, "b": 0}),
    "playback_drained": Session.playback_drained,
    "disconnected": Session.disconnected,
    "connected": Session.connected,
}
steps = st.lists(server_events | st.sampled_from(sorted(INTENTS)), max_size=40)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["server", "semantic", "manual"]), steps)
def test_no_sequence_of_events_breaks_the_session(vad_mode: Any, sequence: list[Any]) -> None:
    session = Session(vad_mode)
    session.connected()
    for step in sequence:
        if isinstance(step, str):
            INTENTS[step](session)
        else:
            session.handle(step)
        assert session.mode is not None  # the state stays readable after every step
    session.replay(12)


# --- real websockets: a broken connection is a lost connection ---------------------


class Counts:
    """Counts how often an audio device is started and stopped (mixed in first)."""

    starts = 0
    stops = 0

    async def start(self, listener: DeviceListener) -> None:
        self.starts += 1
        await super().start(listener)  # type: ignore[misc]

    async def stop(self) -> None:
        self.stops += 1
        await super().stop()  # type: ignore[misc]


class CountingInput(Counts, WavInput):
    """The WAV microphone, counted."""


class CountingOutput(Counts, NullOutput):
    """The null speaker, counted."""


@pytest.fixture
async def server() -> AsyncIterator[FakeRealtimeServer]:
    async with FakeRealtimeServer(script=FakeScript(delta_ms=50), api_keys={KEY}) as fake:
        yield fake


@pytest.fixture
def quiet_wav(tmp_path: Path) -> Path:
    path = tmp_path / "room.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(24_000)
        wav.writeframes(bytes(24_000 * 2))
    return path


def audio_client(
    server: FakeRealtimeServer, wav: Path, **adapter_options: float
) -> tuple[RealtimeClient, CountingInput, CountingOutput]:
    mic = CountingInput(wav, loop=True)
    speaker = CountingOutput()
    client = fake_client(
        server,
        KEY,
        adapter=openai_realtime(url=server.url, **adapter_options),
        audio_input=mic,
        audio_output=speaker,
    )
    return client, mic, speaker


async def assert_reconnected_with_audio_untouched(
    server: FakeRealtimeServer,
    running: Running,
    mic: CountingInput,
    speaker: CountingOutput,
) -> None:
    # Generous: a ping timeout adds the adapter's close timeout on a loaded machine.
    await until(lambda: len(server.sessions) >= 2, timeout_s=20, what="a second session")
    await until(lambda: running.client.status is RealtimeStatus.CONNECTED, what="connected")
    # The microphone never stopped: its audio reaches the new session.
    await until(
        lambda: "input_audio_buffer.append" in sent_types(server, 1), what="audio on session 2"
    )
    assert running.task is not None and not running.task.done()
    assert (mic.starts, mic.stops, speaker.starts, speaker.stops) == (1, 0, 1, 0)


def lost_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "realtime connection" in r.getMessage()]


GARBAGE: dict[str, str | bytes] = {
    "binary frame": b"\x00\x01\x02",
    "not JSON": "{this is not json",
    "JSON array": "[1, 2, 3]",
    "JSON string": '"hello"',
    "missing fields": '{"type": "response.output_audio.delta", "delta": "AAAA"}',
    "mistyped field": '{"type": "response.created", "response": [1]}',
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
async def test_garbage_from_the_server_is_a_lost_connection(
    kind: str,
    server: FakeRealtimeServer,
    quiet_wav: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client, mic, speaker = audio_client(server, quiet_wav)
    running = Running(client)
    async with running:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            await server.send_raw(GARBAGE[kind], index=0)
            await assert_reconnected_with_audio_untouched(server, running, mic, speaker)
        records = lost_records(caplog)
        assert len(records) == 1, [r.getMessage() for r in records]
        assert "protocol error" in records[0].getMessage()
        assert records[0].exc_info is None  # the server's fault: no traceback


async def test_a_close_is_a_lost_connection(
    server: FakeRealtimeServer, quiet_wav: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client, mic, speaker = audio_client(server, quiet_wav)
    running = Running(client)
    async with running:
        with caplog.at_level(logging.WARNING):
            await server.close_all(1011, "internal error")
            await assert_reconnected_with_audio_untouched(server, running, mic, speaker)
        assert len(lost_records(caplog)) == 1


async def test_a_ping_timeout_is_a_lost_connection(
    server: FakeRealtimeServer, quiet_wav: Path
) -> None:
    client, mic, speaker = audio_client(server, quiet_wav, ping_interval_s=0.2, ping_timeout_s=0.3)
    running = Running(client)
    async with running:
        server.stall(0)
        await assert_reconnected_with_audio_untouched(server, running, mic, speaker)


async def test_a_bug_in_an_event_handler_is_logged_with_its_traceback_and_reconnected(
    server: FakeRealtimeServer,
    quiet_wav: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = {"times": 1}
    real = session_module._HANDLERS[ev.ResponseCreated]

    def buggy(session: Session, event: ev.ResponseCreated) -> list[Any]:
        if broken["times"]:
            broken["times"] -= 1
            raise RuntimeError("a bug in a handler")
        return real(session, event)

    monkeypatch.setitem(session_module._HANDLERS, ev.ResponseCreated, buggy)
    client, mic, speaker = audio_client(server, quiet_wav)
    running = Running(client)
    async with running:
        with caplog.at_level(logging.WARNING):
            client.send_text("hello")
            await assert_reconnected_with_audio_untouched(server, running, mic, speaker)
        records = lost_records(caplog)
        assert len(records) == 1
        assert records[0].exc_info is not None  # a bug: the traceback is in the log
        client.send_text("hello again")
        await until(
            lambda: any(m.role == "assistant" and m.text for m in client.messages),
            what="an answer after the reconnect",
        )


# --- audio the connection could not take -------------------------------------------


class StuckSocket:
    """A websocket whose peer stopped reading: the first send never completes."""

    state = State.OPEN

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.release = asyncio.Event()

    async def send(self, message: str) -> None:
        await self.release.wait()
        self.sent.append(message)

    async def recv(self) -> str:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def close(self) -> None:
        self.release.set()


async def test_audio_the_connection_drops_is_counted_logged_once_and_not_committed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(openai_adapter, "AUDIO_LANE_FRAMES", 3)
    socket = StuckSocket()
    conn = OpenAIConnection(socket)  # type: ignore[arg-type]
    session = Session("manual")
    session.connected()
    sent: list[ev.Command] = []

    def on_event(event: ev.ServerEvent) -> None:
        for effect in session.handle(event):
            if isinstance(effect, Send):
                sent.append(effect.command)

    serving = asyncio.create_task(conn.serve(on_event))
    session.start_listening()
    frame = bytes(960)  # 20 ms at 24 kHz
    with caplog.at_level(logging.WARNING):
        for _ in range(10):  # 200 ms counted by the session ...
            await asyncio.sleep(0)
            assert session.append_audio(frame)
            conn.send(ev.AppendAudio(frame))  # queued, as behind a control event
        await asyncio.sleep(0)  # ... the drops are reported once the sends returned
    drops = [r for r in caplog.records if "cannot keep up" in r.getMessage()]
    assert len(drops) == 1  # throttled: one line for the burst
    # What really left: one frame in flight and three queued (80 ms), under the
    # 100 ms minimum: the turn is dropped, not committed empty.
    effects = session.stop_listening()
    commands = [e.command for e in effects if isinstance(e, Send)]
    assert not any(isinstance(c, ev.EndTurn) for c in commands)
    assert any(isinstance(c, ev.DiscardTurn) for c in commands)
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)


# --- a speaker whose device is away ----------------------------------------------


class AwaySpeaker:
    """An output whose device is lost: it keeps what it is given and plays nothing,
    until the test gives up on it as the ALSA output does after its hold time."""

    sample_rate = source_rate = 24_000
    name = "away"
    is_playing = False

    def __init__(self) -> None:
        self.held: dict[str, int] = {}
        self._abandoned: list[Callable[[dict[str, int]], None]] = []

    async def start(self, listener: DeviceListener) -> None:
        pass

    async def stop(self) -> None:
        self.held.clear()

    def play(self, item_id: str, pcm: bytes) -> None:
        self.held[item_id] = self.held.get(item_id, 0) + len(pcm)

    def stop_playback(self) -> dict[str, int]:
        self.held.clear()
        return {}

    def played_ms(self, item_id: str) -> int:
        return 0

    def set_volume(self, volume: int) -> None:
        pass

    def on_drained(self, callback: Callable[[], None]) -> None:
        pass

    def on_abandoned(self, callback: Callable[[dict[str, int]], None]) -> None:
        self._abandoned.append(callback)

    def give_up(self) -> None:
        played = dict.fromkeys(self.held, 0)
        self.held.clear()
        for callback in self._abandoned:
            callback(played)

    def meter(self) -> Any:
        from harkd.audio.base import MeterReading

        return MeterReading()


async def test_an_answer_the_speaker_cannot_play_is_still_finalized_and_published(
    server: FakeRealtimeServer,
) -> None:
    speaker = AwaySpeaker()
    published: list[Any] = []
    client = fake_client(server, KEY, audio_output=speaker, on_message=published.append)
    async with Running(client):
        client.send_text("what time is it")
        await until(lambda: bool(speaker.held), what="answer audio held for the device")

        def given_up_and_published() -> bool:
            speaker.give_up()  # as the ALSA output does each time its hold time ends
            return any(m.role == "assistant" for m in published)

        await until(given_up_and_published, what="the answer published")
    [answer] = [m for m in published if m.role == "assistant"]
    assert answer.interrupted and answer.duration_ms == 0
    assert answer.text  # the transcript is kept even though nothing was heard
