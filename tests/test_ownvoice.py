"""The wake word in the assistant's own voice: found in what the speaker plays (real
espeak-ng speech, the real detector), and told apart from the user's."""

from __future__ import annotations

from harkd.audio.base import AudioFrame
from harkd.audio.ownvoice import OwnWakeWords
from harkd.audio.wakeword import WakeDetection, WakeDetector
from harkd.config import WakeConfig
from speech_fixtures import frames, silence, speech_pcm

RATE = 24_000  # what the speaker plays (the provider's rate)
SAYS = "okay nabu is all it takes"
VOICE = "en-gb"


def own_wake_words() -> OwnWakeWords:
    return OwnWakeWords.hearing(WakeConfig(enabled=True))


def play(own: OwnWakeWords, pcm: bytes, starts_at: float, write_ms: int = 100) -> None:
    """Writes of `write_ms` as a playback thread makes them, each heard after the last."""
    for index, chunk in enumerate(frames(pcm, RATE, write_ms)):
        own.played(chunk, RATE, starts_at + index * write_ms / 1000)


def microphone(at: float, word: str = "okay_nabu") -> WakeDetection:
    return WakeDetection(word, 0.9, 0.1, at)


def microphone_hears(lead_ms: int) -> float:
    """When a microphone's detector fires on the answer (`lead_ms` of silence, then
    `SAYS`), in seconds from the answer's start."""
    detector = WakeDetector(WakeConfig(enabled=True))
    heard = silence(lead_ms) + speech_pcm(SAYS, voice=VOICE) + silence(1000)
    for index, chunk in enumerate(frames(heard, 16_000, 20)):
        detector.process(AudioFrame(chunk, 16_000, (index + 1) * 0.02))
        for detection in detector.take():
            return detection.captured_at
    raise AssertionError("the microphone did not hear the wake word")


def answer(lead_ms: int) -> bytes:
    """What the speaker plays: the answer that says the wake word, at 24 kHz."""
    return silence(lead_ms, RATE) + speech_pcm(SAYS, rate=RATE, voice=VOICE) + silence(1000, RATE)


def test_the_wake_word_the_speaker_plays_is_its_own_and_the_users_later_is_not() -> None:
    own = own_wake_words()
    play(own, answer(500), 100.0)
    # The microphone's echo of it, heard where a microphone in the room hears it.
    echo_at = 100.0 + microphone_hears(500)
    assert own.said(microphone(echo_at))
    assert own.said(microphone(echo_at + 0.25))  # the room and the capture take time
    assert not own.said(microphone(echo_at, word="alexa"))
    # The user saying it after the answer is the user.
    assert not own.said(microphone(echo_at + 3.0))
    assert not own.said(microphone(echo_at - 2.0))


def test_what_was_dropped_unheard_was_not_said() -> None:
    own = own_wake_words()
    play(own, answer(500), 10.0)
    echo_at = 10.0 + microphone_hears(500)
    assert own.said(microphone(echo_at))
    own.dropped(10.3)  # a barge-in before the word: the room never heard it
    assert not own.said(microphone(echo_at))


def test_a_later_answer_is_placed_at_its_own_time_and_heard_afresh() -> None:
    own = own_wake_words()
    play(own, speech_pcm("the kitchen lights are on now", rate=RATE), 50.0)
    play(own, answer(200), 60.0)  # ten seconds later: a new stream
    echo_at = 60.0 + microphone_hears(200)
    assert own.said(microphone(echo_at))
    assert not own.said(microphone(55.0))
