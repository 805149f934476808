"""Manual turns end to end: the local VAD decides (issue 4, "Done means").

Real espeak speech mixed with silence and noise comes from a paced WAV microphone;
the fake realtime server runs with `turn_detection: null` over real websockets and
records exactly what the daemon sent. A user would notice: each sentence is answered
once, nothing they say between turns leaves the device, a clicking or humming room
opens no turn, push-to-talk works, and talking over the assistant interrupts it.
"""

from __future__ import annotations

import base64
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from e2e import (
    LoggedAdapter,
    LoggedInput,
    Running,
    Timeline,
    assert_all_valid,
    fake_client,
    sent_types,
    until,
)
from harkd.adapters.openai import openai_realtime
from harkd.audio.wav import WavInput, WavOutput
from harkd.client import RealtimeClient
from harkd.config import VadConfig
from harkd.messages import MessageFinalized, RealtimeMode
from harkd.testing import FakeRealtimeServer, FakeScript
from speech_fixtures import click, len_ms, mix, noise, silence, speech_pcm, write_wav

pytestmark = pytest.mark.timeout(90)

KEY = "sk-test-manual-0123456789"
BYTES_PER_MS = 48  # PCM16 mono at 24 kHz
FIRST, SECOND = "turn on the kitchen lights", "what time is it"
PREROLL_MS, END_SILENCE_MS = 300, 400
VAD = VadConfig(end_silence_ms=END_SILENCE_MS, preroll_ms=PREROLL_MS, min_level=0.01)
ROOM_NOISE = 0.003  # pink noise RMS: a quiet room, under VAD.min_level


def make_client(
    server: FakeRealtimeServer, timeline: Timeline | None = None, **options: Any
) -> RealtimeClient:
    if timeline is not None:  # note what the client sends on `timeline`
        options["adapter"] = LoggedAdapter(openai_realtime(url=server.url), timeline)
    return fake_client(server, KEY, **{"vad_mode": "manual", "vad": VAD, **options})


def room(pcm: bytes, level: float = ROOM_NOISE) -> bytes:
    """`pcm` heard in a room with a quiet fan."""
    return mix(pcm, noise(len_ms(pcm), level, kind="pink", seed=7))


def mic(
    tmp_path: Path, pcm: bytes, name: str = "mic.wav", timeline: Timeline | None = None
) -> WavInput:
    """A paced microphone playing `pcm`; with `timeline`, it notes each 20 ms period."""
    path = tmp_path / name
    write_wav(path, pcm, 16000)
    return WavInput(path) if timeline is None else LoggedInput(path, timeline)


def periods(ms: float) -> int:
    """The microphone's 20 ms periods in `ms`."""
    return int(ms) // 20


async def server_has_all(server: FakeRealtimeServer, timeline: Timeline) -> None:
    """Wait until the server received every append the client sent so far."""
    sent = timeline.tally("append")
    await until(
        lambda: sent_types(server).count("input_audio_buffer.append") >= sent,
        what=f"the server to receive {sent} appends",
    )


@dataclass
class Turn:
    """One manual turn as the server saw it: clear, appends, commit, response.create."""

    appended_ms: float = 0.0
    chunks: int = 0
    events: list[str] = field(default_factory=list)


TURN_SHAPE = re.compile(r"(Ca+MR)+")
"""clear, appends, commit, response.create; nothing else in between or around."""
_LETTERS = {
    "input_audio_buffer.clear": "C",
    "input_audio_buffer.append": "a",
    "input_audio_buffer.commit": "M",
    "response.create": "R",
}


def turn_shape(server: FakeRealtimeServer) -> str:
    """The audio/turn events the server received, one letter each."""
    return "".join(_LETTERS[t] for t in sent_types(server) if t in _LETTERS)


def turns(server: FakeRealtimeServer) -> list[Turn]:
    """Appended audio per turn (a turn starts at a clear)."""
    found: list[Turn] = []
    for _, event in server.received:
        kind = event["type"]
        if kind == "input_audio_buffer.clear":
            found.append(Turn())
        if kind not in _LETTERS:
            continue
        assert found, f"{kind} before any turn opened"
        turn = found[-1]
        turn.events.append(kind)
        if kind == "input_audio_buffer.append":
            turn.appended_ms += len(base64.b64decode(event["audio"])) / BYTES_PER_MS
            turn.chunks += 1
    return found


def assert_turn_carries(turn: Turn, text: str) -> None:
    """A VAD turn carries the whole sentence and its closing silence, and no more than
    the preroll before it and webrtcvad's hangover (~100-150 ms) after it."""
    speech_ms = len_ms(speech_pcm(text))
    least = speech_ms + END_SILENCE_MS - 40
    most = PREROLL_MS + speech_ms + END_SILENCE_MS + 220
    assert least <= turn.appended_ms <= most, (text, turn.appended_ms, least, most)


def finals(client: RealtimeClient) -> list[MessageFinalized]:
    found: list[MessageFinalized] = []
    client.on_event(lambda e: found.append(e) if isinstance(e, MessageFinalized) else None)
    return found


async def test_two_utterances_make_two_turns_and_nothing_between(tmp_path: Path) -> None:
    # Answers are short so that the second sentence comes after the answer and its
    # echo tail (the microphone is gated while the assistant talks).
    script = FakeScript(user_transcripts=[FIRST, SECOND], reply="Done.")
    pcm = room(
        silence(600) + speech_pcm(FIRST) + silence(1600) + speech_pcm(SECOND) + silence(1200)
    )
    timeline = Timeline()
    async with FakeRealtimeServer(script=script, api_keys={KEY}) as server:
        client = make_client(
            server,
            timeline,
            audio_input=mic(tmp_path, pcm, timeline=timeline),
            audio_output=WavOutput(tmp_path / "o.wav"),
        )
        done = finals(client)
        async with Running(client):
            await until(
                lambda: sum(m.message.role == "assistant" for m in done) == 2,
                what="two answers",
            )
            # The whole recording was heard (each period is handled before the next),
            # so a turn opened anywhere in it would be on the timeline by now ...
            await until(lambda: timeline.tally("frame") >= periods(len_ms(pcm)), what="the end")
            assert timeline.tally("command") == 6, timeline.kinds()  # (clear, commit, create) x 2
            # ... and whatever was sent has reached the server.
            await server_has_all(server, timeline)
            session = server.sessions[0]
            assert session.config["audio"]["input"]["turn_detection"] is None
            [update] = [e for _, e in server.received if e["type"] == "session.update"]
            assert update["session"]["audio"]["input"]["turn_detection"] is None

            shape = turn_shape(server)
            assert TURN_SHAPE.fullmatch(shape), shape
            assert shape.count("M") == 2 and shape.count("R") == 2
            assert session.commits == 2 and session.commit_errors == 0
            assert session.response_creates == 2
            first, second = turns(server)
            assert_turn_carries(first, FIRST)
            assert_turn_carries(second, SECOND)
            # Nothing else left the device: not the silence, not the noise between.
            assert session.audio_ms_received == pytest.approx(
                first.appended_ms + second.appended_ms
            )
            assert [(m.role, m.text) for m in client.messages] == [
                ("user", FIRST),
                ("assistant", "Done."),
                ("user", SECOND),
                ("assistant", "Done."),
            ]
            assert client.mode is RealtimeMode.IDLE
            assert_all_valid(server)


async def test_clicks_and_steady_noise_open_no_turn(tmp_path: Path) -> None:
    """Taps on the table every 250 ms in a fan's hum (under min_level): no turn, no
    audio sent; a sentence afterwards is a turn of its own length only."""
    taps = b"".join(click(10, level=0.5, seed=i) + silence(240) for i in range(12))
    noisy = mix(taps, noise(len_ms(taps), 0.008, kind="pink", seed=3))
    pcm = silence(300) + noisy + room(speech_pcm(FIRST) + silence(900))
    vad = VadConfig(end_silence_ms=END_SILENCE_MS, preroll_ms=PREROLL_MS, min_level=0.02)
    async with FakeRealtimeServer(
        script=FakeScript(user_transcripts=[FIRST], reply="Done."), api_keys={KEY}
    ) as server:
        timeline = Timeline()
        client = make_client(
            server,
            timeline,
            audio_input=mic(tmp_path, pcm, timeline=timeline),
            vad=vad,
            audio_output=WavOutput(tmp_path / "o.wav"),
        )
        async with Running(client):
            # Through the clicks and the hum (counted in periods the microphone
            # delivered, each handled before the next): not a byte of audio, no turn.
            await until(
                lambda: timeline.tally("frame") >= periods(300 + len_ms(noisy)),
                what="the clicks and the hum",
            )
            assert timeline.tally("append") == timeline.tally("command") == 0, timeline.kinds()
            assert turn_shape(server) == ""
            assert client.mode is RealtimeMode.IDLE
            # The same microphone then hears the sentence: the VAD was listening.
            await until(lambda: server.sessions[0].response_creates == 1, what="the answer")
            assert turn_shape(server) == "C" + "a" * turns(server)[0].chunks + "MR"
            [turn] = turns(server)
            # The preroll reaches back into the last clicks; nothing before it was sent.
            assert_turn_carries(turn, FIRST)
            assert_all_valid(server)


async def test_push_to_talk_commits_and_asks_for_an_answer(tmp_path: Path) -> None:
    script = FakeScript(user_transcripts=[FIRST], reply="Done.")
    pcm = room(silence(500) + speech_pcm(FIRST) + silence(3000))
    timeline = Timeline()
    async with FakeRealtimeServer(script=script, api_keys={KEY}) as server:
        client = make_client(
            server,
            timeline,
            audio_input=mic(tmp_path, pcm, timeline=timeline),
            audio_output=WavOutput(tmp_path / "o.wav"),
        )
        done = finals(client)
        async with Running(client):
            assert client.mode is RealtimeMode.IDLE
            pressed = len(timeline)
            client.start_listening()
            assert client.mode is RealtimeMode.LISTENING
            # Held through the sentence and well past the VAD's end silence (counted in
            # periods the microphone delivered): a push-to-talk turn ends only on release.
            hold = periods(500 + len_ms(speech_pcm(FIRST)) + 900)
            await until(lambda: timeline.tally("frame", pressed) >= hold, what="the hold")
            assert "EndTurn" not in [e.detail for e in timeline if e.kind == "command"]
            client.stop_listening()
            held_ms = timeline.tally("frame", pressed) * 20
            await until(lambda: any(m.message.role == "assistant" for m in done), what="the answer")
            shape = turn_shape(server)
            assert TURN_SHAPE.fullmatch(shape) and shape.count("M") == 1, shape
            [turn] = turns(server)
            # What was held down, plus up to the preroll from before the press.
            assert held_ms - 40 <= turn.appended_ms <= held_ms + PREROLL_MS + 40, (
                turn.appended_ms,
                held_ms,
            )
            assert server.sessions[0].commits == 1
            assert [(m.role, m.text) for m in client.messages] == [
                ("user", FIRST),
                ("assistant", "Done."),
            ]
            assert_all_valid(server)


class RecordingOutput(WavOutput):
    """A WAV speaker that remembers what each `stop_playback` reported and when."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.stops: list[tuple[float, dict[str, int]]] = []

    def stop_playback(self) -> dict[str, int]:
        played = super().stop_playback()
        self.stops.append((time.monotonic(), played))
        return played


LONG_ANSWER = (
    "Sure. I am turning on the kitchen lights now, and while I am at it let me tell you "
    "all about the weather for the rest of the week."
)


async def test_speaking_over_the_assistant_interrupts_it(tmp_path: Path) -> None:
    """barge_in true (echo-cancelled input): the local VAD hears the user over the
    answer, which stops at once, is truncated where it was heard and cancelled while
    the server still streams it; the user's words become the next turn."""
    script = FakeScript(
        user_transcripts=[FIRST, "stop"],
        reply=lambda text: "OK." if text == "stop" else LONG_ANSWER,
        audio_ms_per_char=50,
        pace=1.0,  # real time: the answer is still streaming when the user cuts in
    )
    pcm = room(
        silence(600) + speech_pcm(FIRST) + silence(1300) + speech_pcm("stop") + silence(1500)
    )
    spoke: list[float] = []
    async with FakeRealtimeServer(script=script, api_keys={KEY}) as server:
        output = RecordingOutput(tmp_path / "o.wav")
        client = make_client(
            server,
            audio_input=mic(tmp_path, pcm),
            audio_output=output,
            barge_in=True,
            on_mode_change=lambda m: (
                spoke.append(time.monotonic()) if m is RealtimeMode.SPEAKING else None
            ),
        )
        async with Running(client):
            await until(lambda: len(spoke) >= 1, what="the answer playing")
            session = server.sessions[0]
            await until(lambda: len(session.truncations) == 1, what="truncate")
            await until(lambda: session.response_creates == 2, what="second turn")
            [(stopped_at, played)] = output.stops
            [truncation] = session.truncations
            answer = next(m for m in client.messages if m.role == "assistant")
            assert truncation["item_id"] == answer.id
            heard = played[answer.id]
            wall_ms = (stopped_at - spoke[0]) * 1000
            print(
                f"\nlocal-VAD barge-in: truncated at {truncation['audio_end_ms']} ms, "
                f"speaker reported {heard} ms, wall clock {wall_ms:.0f} ms"
            )
            assert truncation["audio_end_ms"] == heard
            # Never more than could have been heard since it started (one period of
            # slack); less only if the loop stalled, as a device would underrun.
            assert heard <= wall_ms + 25, (heard, wall_ms)
            # Cut in about 1 s into the answer (1.3 s of silence less the end of the
            # first turn, plus the opening of the second), long before its end.
            assert 0 < heard < len(LONG_ANSWER) * 50 / 2
            assert heard <= truncation["sent_ms"] < len(LONG_ANSWER) * 50

            # The answer was still streaming: the client cancelled it; no error back.
            assert session.cancels == 1 and session.server_cancels == 0
            await until(lambda: len(session.responses) >= 1, what="response.done")
            assert session.responses[0]["status"] == "cancelled"

            types = sent_types(server)
            # turn 1, then the barge-in (truncate + cancel), then turn 2.
            shape = turn_shape(server)
            assert TURN_SHAPE.fullmatch(shape) and shape.count("M") == 2, shape
            creates = [i for i, t in enumerate(types) if t == "response.create"]
            clears = [i for i, t in enumerate(types) if t == "input_audio_buffer.clear"]
            truncate_at = types.index("conversation.item.truncate")
            cancel_at = types.index("response.cancel")
            assert creates[0] < truncate_at < clears[1]
            assert creates[0] < cancel_at < clears[1]
            second = turns(server)[1]
            assert_turn_carries(second, "stop")

            await until(
                lambda: (
                    [m.role for m in client.messages] == ["user", "assistant", "user"]
                    or len(client.messages) >= 4
                ),
                what="the second user turn",
            )
            answer = next(m for m in client.messages if m.id == answer.id)
            assert answer.interrupted and answer.duration_ms == heard
            assert client.messages[2].role == "user"
            assert_all_valid(server)
