"""The wake word in the assistant's own voice: the microphone's detections of what the
speaker played are dropped, the user's are kept (real espeak-ng speech, the real
detectors, the speaker's reports as the ALSA playback thread makes them)."""

from __future__ import annotations

import logging

import pytest

from harkd.audio.base import AudioFrame
from harkd.audio.ownvoice import OwnVoiceCheck
from harkd.audio.wakeword import WakeDetection, WakeDetector
from harkd.config import WakeConfig
from speech_fixtures import frames, mix, scale, silence, speech_pcm

SPEAKER_RATE = 24_000  # what the speaker plays (the provider's rate)
SAYS = "okay nabu is all it takes"
VOICE = "en-gb"
ROOM_S = 0.04
"""From the speaker's output to the microphone's frame: the room and the capture."""


def check() -> OwnVoiceCheck:
    wake = WakeConfig(enabled=True)
    return OwnVoiceCheck.around(WakeDetector(wake), wake)


def play(own: OwnVoiceCheck, pcm: bytes, starts_at: float, write_ms: int = 100) -> None:
    """Writes of `write_ms` as the playback thread makes them, each heard after the last."""
    for index, chunk in enumerate(frames(pcm, SPEAKER_RATE, write_ms)):
        own.played.played(chunk, SPEAKER_RATE, starts_at + index * write_ms / 1000)


def hear(own: OwnVoiceCheck, pcm: bytes, starts_at: float) -> list[WakeDetection]:
    """The microphone hearing 16 kHz `pcm` from `starts_at`: what gets through."""
    heard: list[WakeDetection] = []
    for index, chunk in enumerate(frames(pcm, 16_000, 20)):
        own.process(AudioFrame(chunk, 16_000, starts_at + (index + 1) * 0.02))
        heard += own.take()
    return heard


def answer(rate: int, text: str = SAYS) -> bytes:
    """The assistant's answer: a breath, the words, and the silence after them."""
    return silence(500, rate) + speech_pcm(text, rate=rate, voice=VOICE) + silence(1000, rate)


def test_the_wake_word_the_speaker_played_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="harkd.audio.ownvoice")
    own = check()
    play(own, answer(SPEAKER_RATE), 100.0)
    assert hear(own, answer(16_000), 100.0 + ROOM_S) == []  # its echo: heard, then dropped
    assert "wake word okay_nabu in the assistant's own voice: ignored" in caplog.text


def test_the_users_wake_word_is_kept_in_silence() -> None:
    [heard] = hear(check(), answer(16_000), 10.0)
    assert heard.word == "okay_nabu"


def test_the_users_wake_word_over_an_answer_that_does_not_say_it_is_kept() -> None:
    own = check()
    other = "the kitchen lights are on now and the heating is off"
    play(own, answer(SPEAKER_RATE, other), 20.0)
    echo = scale(answer(16_000, other), 0.1)  # the user nearer the microphone
    [heard] = hear(own, mix(echo, answer(16_000)), 20.0 + ROOM_S)
    assert heard.word == "okay_nabu"


def test_what_was_dropped_unheard_was_not_said() -> None:
    own = check()
    play(own, answer(SPEAKER_RATE), 30.0)
    own.played.dropped(30.3)  # a barge-in before the word: the room never heard it
    # ... so a wake word the microphone hears there is the user's.
    [heard] = hear(own, answer(16_000), 30.0 + ROOM_S)
    assert heard.word == "okay_nabu"
