"""Full duplex in a PulseAudio room where the microphone hears the daemon's own speaker.

What a user would notice: with echo cancellation and barge-in on, the assistant's own
voice never opens a turn or interrupts it (server VAD and local VAD alike) although
the microphone stays open while it speaks; the user's voice over an answer stops it
where the user stopped hearing it, and is heard and answered. Waiting for a wake word,
the assistant saying "okay nabu" does not wake it; the user saying it does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from e2e import assert_all_valid, until
from echo_room import ANSWER, converged_room, heard_ms, record_speaker, speak
from harkd.config import WakeConfig
from harkd.events import VadMode
from harkd.testing import FakeScript
from pulse_fixture import PulseServer
from speech_fixtures import silence, speech_pcm, write_wav

pytestmark = [pytest.mark.pulse, pytest.mark.timeout(120)]

USER = "what time is it in tokyo"
TOKYO = "It is nine in the evening in Tokyo."


@pytest.fixture(scope="module")
def user_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("echo") / "user.wav"
    write_wav(path, speech_pcm(USER, rate=24000, voice="en-gb") + silence(300, 24000), 24000)
    return path


@pytest.fixture(scope="module")
def wake_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("echo") / "okay_nabu.wav"
    spoken = speech_pcm(f"okay nabu, {USER}", rate=24000, voice="en-gb")
    write_wav(path, spoken + silence(300, 24000), 24000)
    return path


@pytest.mark.parametrize("vad_mode", ["server", "manual"])
async def test_its_own_answer_opens_no_turn_and_does_not_barge_in(
    pulse: PulseServer, vad_mode: VadMode
) -> None:
    script = FakeScript(reply=ANSWER, speak=speak)
    # The first answer teaches the canceller the room (the mic is gated until it has
    # converged); the second plays with the microphone open throughout.
    async with converged_room(pulse, script, vad_mode) as (room, server):
        learning = room.learning
        room.mic_open_while_speaking.clear()
        second = await room.answer("and next week?")

        for answer in (*learning, second):
            assert answer.text == ANSWER and not answer.interrupted
        # The gate, sampled every 50 ms over the ~7 s answer: shut for the answer's
        # first moments (ONSET_GUARD_S), then open to the end.
        samples = room.mic_open_while_speaking
        assert len(samples) > 60
        assert all(samples[len(samples) // 5 :]), samples
        session = server.sessions[0]
        assert [r["status"] for r in session.responses] == ["completed"] * (len(learning) + 1)
        # Only the typed prompts: the mic opened no turn.
        assert [m.role for m in room.finals] == ["user", "assistant"] * (len(learning) + 1)
        assert session.speech_segments == []  # the server VAD heard no speech
        assert session.commits == 0 and session.auto_commits == 0  # no local turn
        assert_all_valid(server)


async def test_the_users_voice_over_the_answer_barges_in_and_is_answered(
    pulse: PulseServer, user_wav: Path
) -> None:
    def reply(user_text: str) -> str:
        return TOKYO if user_text == USER else ANSWER

    script = FakeScript(user_transcripts=[USER], reply=reply, speak=speak)
    async with converged_room(pulse, script) as (room, server):
        learning = len(room.learning)
        recording = record_speaker(pulse)
        item = await room.answer_playing("and next week?")
        heard_before = room.output.played_ms(item)
        speaker = room.say(user_wav)
        await until(
            lambda: any(m.role == "assistant" and m.interrupted for m in room.finals),
            what="the barge-in",
        )
        # The room goes quiet within a period or two; the user's answer comes
        # only after they finished talking.
        await asyncio.sleep(0.5)
        recording.stop()
        await until(lambda: len(room.assistant_answers()) == learning + 2, what="the user's answer")
        speaker.wait(10)

        session = server.sessions[0]
        # (The cut answer's response was complete: the server sends faster than
        # real time; what the user heard is cut by the truncate.)
        assert len(session.responses) == learning + 2
        truncates = [e for _, e in server.received if e["type"] == "conversation.item.truncate"]
        [truncate] = [t for t in truncates if t["item_id"] == item]
        # The user's words were committed by the server VAD and answered.
        assert session.auto_commits == 1 and len(session.speech_segments) == 1
        roles = [(m.role, m.text, m.interrupted) for m in room.finals]
        assert roles[-2:] == [("user", USER, False), ("assistant", TOKYO, False)]
        # The truncate point is what the room heard of the cut answer.
        heard, slack = heard_ms(recording.samples(), bytes(room.output.sent[item]))
        end = truncate["audio_end_ms"]
        assert heard - 40 <= end <= heard + slack + 40, (end, heard, slack)
        assert heard_before <= end < len(speak(ANSWER)) / 48 - 500
        assert_all_valid(server)


async def test_its_own_wake_word_does_not_wake_it_and_the_users_does(
    pulse: PulseServer, wake_wav: Path
) -> None:
    naming = (
        "You can wake me at any time: just say okay nabu, and then your question. "
        "Okay nabu is all it takes, okay nabu."
    )

    def reply(user_text: str) -> str:
        if user_text == USER:
            return TOKYO
        return naming if user_text == "how do I wake you?" else ANSWER

    script = FakeScript(user_transcripts=[USER], reply=reply, speak=speak)
    async with converged_room(pulse, script, wake=WakeConfig(enabled=True)) as (room, server):
        learning = room.learning
        # The assistant says the wake word three times, the microphone open (in
        # half duplex the detector hears it: the raw microphone scores 0.85-0.95).
        own = await room.answer("how do I wake you?")
        assert own.text == naming and not own.interrupted
        assert room.wakes == []
        assert server.sessions[0].speech_segments == []  # nothing was sent

        # The same detector hears the user say it (so it was listening).
        await asyncio.to_thread(room.say(wake_wav).wait, 20)
        await until(lambda: len(room.assistant_answers()) == len(learning) + 2, what="the answer")
        [heard] = room.wakes
        assert heard.word == "okay_nabu" and heard.answered
        roles = [(m.role, m.text) for m in room.finals[-2:]]
        assert roles == [("user", USER), ("assistant", TOKYO)]
        assert_all_valid(server)


async def test_the_users_wake_word_over_an_answer_cuts_it_and_is_answered(
    pulse: PulseServer, wake_wav: Path
) -> None:
    """The user nearer the microphone than the speaker (its volume at half: the echo
    12 dB under the user's voice). Heard every time; with the echo as loud as the user
    about 7 times in 8 (README: measured in this room, not asserted here)."""
    script = FakeScript(
        user_transcripts=[USER], reply=lambda t: TOKYO if t == USER else ANSWER, speak=speak
    )
    wake = WakeConfig(enabled=True)
    async with converged_room(pulse, script, wake=wake, volume=50) as (room, server):
        learning = room.learning
        await room.answer_playing("and next week?")
        speaker = room.say(wake_wav)
        await until(lambda: bool(room.wakes), what="the user's wake word")
        await until(lambda: len(room.assistant_answers()) == len(learning) + 2, what="the answer")
        await asyncio.to_thread(speaker.wait, 10)
        [heard] = room.wakes
        assert heard.word == "okay_nabu" and heard.answered
        cut, answered = room.assistant_answers()[-2:]
        assert cut.interrupted and answered.text == TOKYO
        assert [(m.role, m.text) for m in room.finals[-2:]] == [
            ("user", USER),
            ("assistant", TOKYO),
        ]
        assert_all_valid(server)
