"""The wake word detector on real speech (espeak-ng), the ear's rules, armed turns of
the local VAD, and the `wake:` config's errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from harkd.audio.base import AudioFrame
from harkd.audio.vad import Endpointer, TurnAudio, TurnClosed, TurnDropped, TurnOpened, VadEvent
from harkd.audio.wakeword import WakeDetection, WakeDetector, models_dir
from harkd.config import ConfigError, VadConfig, WakeConfig, parse_config
from harkd.wake import Ear, EarState, load_sound
from speech_fixtures import click, frames, level, mix, noise, scale, silence, speech_pcm

WAKE = "okay nabu"


def detect(pcm: bytes, config: WakeConfig | None = None) -> list[WakeDetection]:
    """Every detection over `pcm` (16 kHz), fed in 20 ms frames at their audio time."""
    detector = WakeDetector(config or WakeConfig(enabled=True))
    found: list[WakeDetection] = []
    for index, chunk in enumerate(frames(pcm, 16_000, 20)):
        detector.process(AudioFrame(chunk, 16_000, (index + 1) * 0.02))
        found += detector.take()
    return found


def test_okay_nabu_is_heard_once_with_its_loudness() -> None:
    wake = speech_pcm(WAKE)
    heard = detect(silence(500) + wake + silence(1500))
    assert [d.word for d in heard] == ["okay_nabu"]
    assert heard[0].score > 0.85  # the model's own cut-off
    # Heard while it is being said or just after: not before it began.
    assert 0.5 < heard[0].captured_at < 0.5 + len(wake) / 32_000 + 0.3
    # Its loudness is the last second's: mostly the word itself.
    assert 0.5 * level(wake) < heard[0].level <= 1.05 * level(wake)


def test_other_speech_wakes_nothing() -> None:
    talk = speech_pcm("what time is it") + silence(300) + speech_pcm("turn on the kitchen lights")
    talk += speech_pcm("okay, no bother", voice="en-gb")
    assert detect(silence(300) + talk + silence(500)) == []


def test_the_wake_word_in_one_breath_with_the_question() -> None:
    assert [d.word for d in detect(speech_pcm("okay nabu, what time is it") + silence(500))] == [
        "okay_nabu"
    ]


def test_refractory_time_is_per_word() -> None:
    twice = speech_pcm(WAKE) + silence(400) + speech_pcm(WAKE) + silence(800)
    assert len(detect(twice, WakeConfig(enabled=True, refractory_s=3.0))) == 1
    assert len(detect(twice, WakeConfig(enabled=True, refractory_s=0.3))) == 2


def test_several_words_listen_at_once_and_thresholds_are_per_word() -> None:
    audio = speech_pcm("alexa") + silence(800) + speech_pcm(WAKE) + silence(800)
    both = WakeConfig.model_validate({"enabled": True, "words": ["okay_nabu", "alexa"]})
    assert [d.word for d in detect(audio, both)] == ["alexa", "okay_nabu"]
    # A cut-off no score reaches silences that word only.
    strict = WakeConfig.model_validate(
        {"enabled": True, "words": ["okay_nabu", {"model": "alexa", "threshold": 0.9999}]}
    )
    assert [d.word for d in detect(audio, strict)] == ["okay_nabu"]


def test_heard_through_a_quiet_microphone_and_a_noisy_room() -> None:
    wake = scale(speech_pcm(WAKE), 0.3)
    room = silence(400) + wake + silence(800)
    heard = detect(mix(room, noise(1200 + len(wake) // 32, 0.01, kind="pink")))
    assert [d.word for d in heard] == ["okay_nabu"]


def test_a_custom_model_is_given_by_its_json(tmp_path: Path) -> None:
    for suffix in (".json", ".tflite"):
        shutil.copy(models_dir() / f"okay_nabu{suffix}", tmp_path / f"kitchen{suffix}")
    spec = json.loads((tmp_path / "kitchen.json").read_text())
    (tmp_path / "kitchen.json").write_text(json.dumps({**spec, "model": "kitchen.tflite"}))
    config = WakeConfig.model_validate({"enabled": True, "words": [str(tmp_path / "kitchen.json")]})
    assert [d.word for d in detect(speech_pcm(WAKE) + silence(500), config)] == ["kitchen"]


def test_the_level_offset_evens_out_microphones() -> None:
    audio = speech_pcm(WAKE) + silence(300)
    plain = detect(audio)[0].level
    louder = detect(audio, WakeConfig(enabled=True, level_offset_db=6.0))[0].level
    assert louder == pytest.approx(plain * 10 ** (6 / 20), rel=0.01)


# --------------------------------------------------------------------------- the ear


def test_the_ear_waits_for_speech_from_the_first_audio_sent() -> None:
    ear = Ear()
    assert not ear.listening
    ear.wake(2.0)
    assert ear.listening and not ear.expired(100.0)  # the window starts now
    assert not ear.expired(101.9)
    assert ear.expired(102.0) and ear.state is EarState.ASLEEP


def test_speech_keeps_the_ear_open_until_the_turn_ends() -> None:
    ear = Ear()
    ear.wake(1.0)
    ear.expired(0.0)
    ear.speech_started()
    assert not ear.expired(50.0) and ear.state is EarState.TURN
    ear.sleep()
    assert not ear.listening


# --------------------------------------------------------------------------- armed turns


def run_vad(endpointer: Endpointer, pcm: bytes) -> list[VadEvent]:
    events: list[VadEvent] = []
    for chunk in frames(pcm, 16_000, 20):
        events += endpointer.process(chunk, chunk)
    return events


def test_an_armed_turn_streams_everything_and_closes_after_the_speech() -> None:
    endpointer = Endpointer(VadConfig(end_silence_ms=500))
    question = speech_pcm("what time is it")
    assert endpointer.open_armed(wait_ms=3000) == [TurnOpened(())]
    events = run_vad(endpointer, silence(400) + question + silence(1000))
    closed = [e for e in events if isinstance(e, TurnClosed)]
    assert len(closed) == 1 and closed[0].speech_ms >= 500
    sent = b"".join(e.payload for e in events if isinstance(e, TurnAudio))
    assert question in sent  # every word, from the wake word on


def test_an_armed_turn_without_speech_is_dropped_after_its_wait() -> None:
    endpointer = Endpointer(VadConfig())
    endpointer.open_armed(wait_ms=1000)
    events = run_vad(endpointer, silence(1500))
    dropped = [i for i, e in enumerate(events) if isinstance(e, TurnDropped)]
    assert len(dropped) == 1 and 45 <= dropped[0] <= 52  # at one second, not on silence
    assert not endpointer.is_open and endpointer.armed_speech_ms == 0


def test_the_chime_does_not_open_a_turn_by_itself() -> None:
    chime = load_sound("chime", 16_000)
    endpointer = Endpointer(VadConfig())
    endpointer.open_armed(wait_ms=1500)
    endpointer.hold_off(len(chime) / 32, 200)
    events = run_vad(endpointer, chime + silence(2000))
    assert not any(isinstance(e, TurnClosed) for e in events)
    assert any(isinstance(e, TurnDropped) for e in events)
    assert endpointer.armed_speech_ms >= 100  # heard, and held off: the log says so
    # Without the hold-off the chime would have been a turn of its own.
    endpointer.open_armed(wait_ms=1500)
    events = run_vad(endpointer, silence(300) + chime + silence(2000))
    assert any(isinstance(e, TurnClosed) for e in events)


def test_speech_over_the_chime_still_opens_the_turn() -> None:
    chime = load_sound("chime", 16_000)
    question = speech_pcm("what time is it")
    endpointer = Endpointer(VadConfig())
    endpointer.open_armed(wait_ms=3000)
    endpointer.hold_off(len(chime) / 32, 200)
    events = run_vad(endpointer, mix(chime, question) + silence(1000))
    assert any(isinstance(e, TurnClosed) for e in events)


def test_a_short_command_over_the_chime_still_opens_the_turn() -> None:
    """In one breath, "okay nabu, stop": most of "stop" falls in the chime's hold-off
    and its last bit after it, a stop consonant apart. Together they are more speech
    than the chime and a fresh VAD can explain, so the turn starts and is answered."""
    chime = load_sound("chime", 16_000)
    command = speech_pcm("stop", voice="en-gb", speed=130)
    endpointer = Endpointer(VadConfig())
    endpointer.open_armed(wait_ms=3000)
    endpointer.hold_off(len(chime) / 32, 200)
    heard = mix(silence(60) + chime, silence(100) + command)
    events = run_vad(endpointer, heard + silence(1500))
    assert [type(e) for e in events if not isinstance(e, TurnAudio)] == [TurnClosed]


@pytest.mark.parametrize("chime", [False, True])
def test_clicks_after_the_wake_word_are_no_turn(chime: bool) -> None:
    """Nobody speaks after the wake word; a tap every quarter second does not add up
    to speech over the seconds the armed turn waits: it is dropped, not answered."""
    sound = load_sound("chime", 16_000) if chime else b""
    endpointer = Endpointer(VadConfig())
    endpointer.open_armed(wait_ms=4000)
    if sound:
        endpointer.hold_off(len(sound) / 32, 200)
    taps = b"".join(click(seed=i) + silence(250) for i in range(14))
    events = run_vad(endpointer, mix(silence(60) + sound, silence(300) + taps) + silence(1000))
    assert [type(e) for e in events if not isinstance(e, TurnAudio)] == [TurnDropped]


# --------------------------------------------------------------------------- config


def problems(wake: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config({"realtime": {"api_key": "k"}, "wake": wake}, "config.yaml", {})
    return str(caught.value)


def test_bad_wake_config_names_the_key(tmp_path: Path) -> None:
    assert "wake.words.0.model: unknown wake word 'okay_nab'" in problems({"words": ["okay_nab"]})
    assert "wake.threshold:" in problems({"threshold": 1.5})
    assert "wake.words.1.threshold:" in problems(
        {"words": ["alexa", {"model": "alexa", "threshold": 0}]}
    )
    missing = problems({"enabled": True, "words": [str(tmp_path / "mine.json")]})
    assert f"wake.words.0.model: cannot read {tmp_path / 'mine.json'}" in missing
    (tmp_path / "mine.json").write_text(
        json.dumps({"model": "mine.tflite", "micro": {"probability_cutoff": 0.5}})
    )
    assert "wake.words.0.model: cannot read the model" in problems(
        {"enabled": True, "words": [str(tmp_path / "mine.json")]}
    )
    assert "wake.sound: cannot read" in problems({"enabled": True, "sound": "file:/no/such.wav"})
    assert "wake.timeout_s:" in problems({"timeout_s": 0})
    assert "realtime.connect:" in str(
        pytest.raises(
            ConfigError, parse_config, {"realtime": {"api_key": "k", "connect": "lazy"}}, "c", {}
        ).value
    )
