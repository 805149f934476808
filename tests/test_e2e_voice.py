"""Spoken turns end to end with server VAD: real espeak speech from a paced WAV
microphone, the fake realtime server over real websockets, a paced WAV speaker.

What a user would notice: the assistant hears the sentence and answers it in full,
the microphone is shut while the assistant talks (half duplex) unless barge-in is on,
a muted microphone sends nothing, and an interruption cuts the answer where the
listener stopped hearing it.
"""

from __future__ import annotations

import asyncio
import base64
import time
import wave
from pathlib import Path
from typing import Any

import pytest

from e2e import (
    SENTINEL,
    LoggedInput,
    Running,
    Timeline,
    assert_all_valid,
    fake_client,
    handled_sentinel,
    logged_client,
    sent_types,
    until,
)
from harkd.audio.wav import WavInput, WavOutput
from harkd.client import RealtimeClient
from harkd.messages import MessageFinalized, RealtimeMode
from harkd.testing import FakeRealtimeServer, FakeScript
from speech_fixtures import len_ms, silence, speech_pcm, write_wav

pytestmark = pytest.mark.timeout(30)

KEY = "sk-test-voice-0123456789"
SENTENCE = "turn on the kitchen lights"
ANSWER = "The kitchen lights are on now."  # 30 characters
MS_PER_CHAR = 40.0
LONG_ANSWER = (
    "Sure. I am turning on the kitchen lights now, and while I am at it let me tell you "
    "all about the weather for the rest of the week."
)
BYTES_PER_MS = 48  # PCM16 mono at 24 kHz


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.5 s of silence, the sentence, 2 s of silence, 16 kHz (a quiet room after it)."""
    path = tmp_path_factory.mktemp("voice") / "turn.wav"
    write_wav(path, silence(500) + speech_pcm(SENTENCE) + silence(2000), 16000)
    return path


def make_client(server: FakeRealtimeServer, **options: Any) -> RealtimeClient:
    return fake_client(server, KEY, **options)


def finals(client: RealtimeClient) -> list[MessageFinalized]:
    found: list[MessageFinalized] = []
    client.on_event(lambda e: found.append(e) if isinstance(e, MessageFinalized) else None)
    return found


def wav_ms(path: Path) -> float:
    with wave.open(str(path), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        return wav.getnframes() / 24


def appended_ms(server: FakeRealtimeServer) -> list[float]:
    """Milliseconds of each `input_audio_buffer.append`, decoded as 24 kHz PCM16."""
    return [
        len(base64.b64decode(e["audio"])) / BYTES_PER_MS
        for _, e in server.received
        if e["type"] == "input_audio_buffer.append"
    ]


@pytest.mark.parametrize("barge_in", [False, True], ids=["half_duplex", "barge_in"])
async def test_spoken_turn_is_heard_answered_and_played(
    speech_wav: Path, tmp_path: Path, barge_in: bool
) -> None:
    script = FakeScript(user_transcripts=[SENTENCE], reply=ANSWER, audio_ms_per_char=MS_PER_CHAR)
    timeline = Timeline()
    mic_on = asyncio.Event()
    async with FakeRealtimeServer(script=script, api_keys={KEY}) as server:
        out_path = tmp_path / "answer.wav"
        client = logged_client(
            server,
            KEY,
            timeline,
            # On once connected: the server hears the file from its start, so where it
            # hears the speech does not depend on how long connecting took.
            audio_input=LoggedInput(speech_wav, timeline, on=mic_on),
            audio_output=WavOutput(out_path),
            barge_in=barge_in,
            echo_tail_ms=300,
            on_mode_change=lambda m: timeline.add("mode", m),
        )
        done = finals(client)

        def appends_after_the_answer() -> int:
            modes = [i for i, e in enumerate(timeline) if e.kind == "mode"]
            return timeline.tally("append", modes[3] + 1) if len(modes) >= 4 else 0

        async with Running(client):
            mic_on.set()
            await until(
                lambda: any(m.message.role == "assistant" for m in done),
                what="the assistant's answer, heard to the end",
            )
            # The gate's reopening after the echo tail is observable too.
            await until(lambda: appends_after_the_answer() >= 5, what="the microphone reopening")
            session = server.sessions[0]
            audio_in = session.config["audio"]["input"]
            assert audio_in["format"] == {"type": "audio/pcm", "rate": 24000}
            assert audio_in["turn_detection"]["type"] == "server_vad"
            assert audio_in["turn_detection"]["interrupt_response"] is barge_in

            # The server heard one utterance of about the sentence's length.
            [(start, end)] = session.speech_segments
            speech_ms = len_ms(speech_pcm(SENTENCE))
            # start includes 300 ms prefix padding, end 500 ms of closing silence.
            assert abs((end - start) - (speech_ms + 800)) < 150, (start, end, speech_ms)
            assert session.auto_commits == 1 and session.commits == 0
            assert len(session.responses) == 1
            assert session.responses[0]["status"] == "completed"

            # Appends are 24 kHz: 20 ms capture periods make ~20 ms chunks.
            chunks = appended_ms(server)
            assert len(chunks) > 50
            assert abs(sum(chunks) / len(chunks) - 20) < 1

            user, assistant = client.messages
            assert (user.role, user.text) == ("user", SENTENCE)
            assert (assistant.role, assistant.text) == ("assistant", ANSWER)
            assert not assistant.interrupted
            assert assistant.duration_ms == len(ANSWER) * MS_PER_CHAR
            assert [m.message.id for m in done] == [user.id, assistant.id]

            modes = [i for i, e in enumerate(timeline) if e.kind == "mode"]
            assert [timeline[i].detail for i in modes] == [
                RealtimeMode.LISTENING,
                RealtimeMode.THINKING,
                RealtimeMode.SPEAKING,
                RealtimeMode.LISTENING,
            ]
            speaking, listening = modes[2], modes[3]
            # Playback is paced: speaking lasts as long as the answer. Never shorter, on
            # any machine; longer only by stalls (a generous bound for a loaded one).
            speaking_ms = (timeline[listening].at - timeline[speaking].at) * 1000
            answer_ms = len(ANSWER) * MS_PER_CHAR
            assert answer_ms - 20 <= speaking_ms < answer_ms + 1000, speaking_ms

            # What the microphone delivered while the assistant spoke, and what of it
            # was sent: each period is handled before the next, so this is exact.
            frames = timeline.tally("frame", speaking, listening)
            sent = timeline.tally("append", speaking, listening)
            assert frames > 10, "the microphone ran while the assistant spoke"
            if barge_in:
                assert sent >= frames - 1, (sent, frames)  # audio flows all the time
            else:
                assert sent == 0, f"{sent} appends while the assistant spoke"
                # ... nor during the echo tail (300 ms after the last sound; the margin
                # is for being preempted between noting `quiet` and the mode).
                reopened = timeline[timeline.index_of("append", start=listening)].at
                assert reopened - timeline[listening].at >= 0.3 - 0.1
            assert_all_valid(server)

    # The speaker file holds the whole answer, and only it.
    assert abs(wav_ms(out_path) - len(ANSWER) * MS_PER_CHAR) <= 20


async def test_muted_microphone_sends_nothing(speech_wav: Path, tmp_path: Path) -> None:
    timeline = Timeline()
    async with FakeRealtimeServer(script=FakeScript(reply=ANSWER), api_keys={KEY}) as server:
        client = logged_client(
            server,
            KEY,
            timeline,
            audio_input=LoggedInput(speech_wav, timeline),
            audio_output=WavOutput(tmp_path / "o.wav"),
        )
        client.set_mic_mute(True)
        async with Running(client):
            assert client.mic_muted
            # The whole sentence and its closing silence go by (counted in periods the
            # microphone delivered, each handled before the next).
            periods = (500 + len_ms(speech_pcm(SENTENCE)) + 1200) // 20
            await until(lambda: timeline.tally("frame") >= periods, what="the sentence")
            assert timeline.tally("append") == 0
            assert "input_audio_buffer.append" not in sent_types(server)
            session = server.sessions[0]
            assert session.speech_segments == [] and session.responses == []
            assert [m.role for m in client.messages] == []
            assert client.mode is RealtimeMode.LISTENING
            # Unmuted, the same microphone is heard again (the test is not vacuous).
            client.set_mic_mute(False)
            await until(
                lambda: sent_types(server).count("input_audio_buffer.append") >= 5,
                what="appends after unmuting",
            )
            assert_all_valid(server)


def audio_delta(response_id: str, item_id: str, ms: int) -> dict[str, Any]:
    return {
        "type": "response.output_audio.delta",
        "response_id": response_id,
        "item_id": item_id,
        "output_index": 0,
        "content_index": 0,
        "delta": base64.b64encode(b"\x10\x00" * 24 * ms).decode(),
    }


@pytest.mark.parametrize(
    ("pace", "active"),
    [(0.0, False), (2.0, True)],
    ids=["response_done_before_interrupt", "response_still_streaming"],
)
async def test_interrupt_truncates_at_what_was_heard(
    speech_wav: Path, tmp_path: Path, pace: float, active: bool
) -> None:
    """pace 0: the whole answer arrived before the interrupt (nothing to cancel);
    pace 2: the server still streams it (the client must cancel)."""
    script = FakeScript(
        user_transcripts=[SENTENCE], reply=LONG_ANSWER, audio_ms_per_char=50, pace=pace
    )
    timeline = Timeline()
    async with FakeRealtimeServer(script=script, api_keys={KEY}) as server:
        out_path = tmp_path / "answer.wav"
        output = WavOutput(out_path)
        spoke: list[float] = []
        client = logged_client(
            server,
            KEY,
            timeline,
            audio_input=WavInput(speech_wav),
            audio_output=output,
            on_mode_change=lambda m: (
                spoke.append(time.monotonic()) if m is RealtimeMode.SPEAKING else None
            ),
        )
        done = finals(client)
        async with Running(client):
            await until(lambda: client.mode is RealtimeMode.SPEAKING, what="speaking")
            item_id = client.messages[-1].id
            await until(lambda: output.played_ms(item_id) >= 700, what="700 ms heard")
            # pace 2: 6.25 s of answer take 3.1 s to stream, so it is still streaming.
            assert (server.sessions[0].responses == []) is active
            heard = output.played_ms(item_id)
            client.interrupt()
            # Independent of the ledger: the paced speaker started with `speaking`.
            wall_ms = (time.monotonic() - spoke[0]) * 1000
            assert client.mode is RealtimeMode.LISTENING  # silent at once
            assert not output.is_playing

            session = server.sessions[0]
            await until(lambda: len(session.truncations) == 1, what="truncate")
            await until(lambda: len(session.responses) == 1, what="response.done")
            [truncation] = session.truncations
            audio_end_ms = truncation["audio_end_ms"]
            error_ms = audio_end_ms - heard
            print(
                f"\ntruncate error ({'active' if active else 'done'}): {error_ms} ms "
                f"(heard {heard} ms, truncated at {audio_end_ms} ms of "
                f"{truncation['sent_ms']} ms sent; wall clock {wall_ms:.0f} ms)"
            )
            assert truncation["item_id"] == item_id
            assert 0 < audio_end_ms <= truncation["sent_ms"]
            assert 0 <= error_ms <= 100
            # Never more than could have been heard in the time since it started (one
            # period of slack). Less only when the loop stalls, as a device would
            # underrun; test_alsa_pulse measures it against a real device.
            assert audio_end_ms <= wall_ms + 25, (audio_end_ms, wall_ms)

            types = sent_types(server)
            if active:
                assert types.count("response.cancel") == 1
                assert session.cancels == 1
                assert session.responses[0]["status"] == "cancelled"
            else:
                assert "response.cancel" not in types  # it would only earn an error
                assert session.responses[0]["status"] == "completed"

            if active:
                # A late delta of the cancelled answer (in flight when the cancel left)
                # is dropped, not played; nor does its text reach the message.
                response_id = session.responses[0]["id"]
                await server.send_event(audio_delta(response_id, item_id, 500))
                await server.send_event(
                    {
                        "type": "response.output_audio_transcript.delta",
                        "response_id": response_id,
                        "item_id": item_id,
                        "output_index": 0,
                        "content_index": 0,
                        "delta": " and more",
                    }
                )
                # Both handled (events are handled in order) before looking.
                await server.send_event(SENTINEL)
                await until(lambda: handled_sentinel(timeline), what="the late deltas handled")
                assert not output.is_playing
                assert client.mode is RealtimeMode.LISTENING

            assistant = next(m for m in client.messages if m.id == item_id)
            assert assistant.interrupted
            assert assistant.duration_ms == audio_end_ms
            assert "and more" not in assistant.text
            assert [m.message.id for m in done if m.message.role == "assistant"] == [item_id]
            assert client.pending_assistant_transcript is None
            assert_all_valid(server)

    # The speaker wrote what was heard (plus at most the period in flight), no more.
    written = wav_ms(out_path)
    assert audio_end_ms - 1 <= written <= audio_end_ms + 25, (written, audio_end_ms)
