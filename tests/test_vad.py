"""Local VAD endpointing: real espeak-ng speech in silence, noise, hum and clicks.

Two kinds of test: the decision logic with a scripted stand-in for webrtcvad (exact
frame counts), and the whole thing on real speech (boundaries within a frame or two).

Levels used (RMS, 0..1 of full scale; the speech fixture is about 0.09, -21 dBFS):
- Steady pink (fan-like) noise or 50 Hz hum at 0.04 (-28 dBFS, a fan close to the
  mic) fools webrtcvad at aggressiveness 2 into speech on most frames. An energy
  floor `min_level` of 0.08 (-22 dBFS: twice the noise RMS, above its 20 ms frame
  peaks, below loud speech at -15 dBFS) keeps it out and still finds the speech.
- In a quiet room, `min_level` 0.005 (-46 dBFS) is enough to veto webrtcvad's own
  hangover (60 to 100 ms after every sound at aggressiveness 2), which otherwise
  joins clicks ten a second into a turn and delays every close by that hangover.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soxr

import harkd.audio.vad as vad_module
from harkd.audio.vad import (
    MIN_COMMIT_MS,
    WARMUP_MS,
    Endpointer,
    TurnAudio,
    TurnClosed,
    TurnDropped,
    TurnOpened,
    VadEvent,
)
from harkd.config import VadConfig
from speech_fixtures import (
    NoiseKind,
    click,
    frames,
    len_ms,
    level,
    mix,
    noise,
    read_wav,
    scale,
    silence,
    speech_pcm,
    speech_wav,
    write_wav,
)

RATE = 16000
PHRASE = "what time is it now"
"""Voiced at both ends, so webrtcvad's boundaries sit where the samples start and end."""

SHORT_HANGOVER_MS = 60
"""Its hangover after a short sound (6, 3, 2 frames of 10, 20, 30 ms), which the
endpointer asks for on top of start_ms before it opens a turn."""

QUIET_FLOOR = 0.005
NOISE_LEVEL = 0.04
NOISE_FLOOR = 0.08


def tag(index: int) -> bytes:
    """A payload naming its frame: the endpointer must hand it back untouched."""
    return index.to_bytes(4, "big")


@dataclass
class Turn:
    opened_at: int
    """Index of the frame whose `process` call opened the turn."""
    opened: TurnOpened
    payloads: list[bytes] = field(default_factory=list)
    end: TurnClosed | TurnDropped | None = None
    closed_at: int | None = None

    @property
    def frame_indices(self) -> list[int]:
        return [int.from_bytes(p, "big") for p in self.payloads]


def feed(
    endpointer: Endpointer,
    pcm: bytes,
    frame_ms: int = 20,
    payloads: list[bytes] | None = None,
    first_index: int = 0,
) -> list[tuple[int, VadEvent]]:
    """Every event, with the index of the frame whose `process` call returned it."""
    chunks = frames(pcm, RATE, frame_ms)
    if payloads is None:
        payloads = [tag(first_index + i) for i in range(len(chunks))]
    events = []
    for i, (chunk, payload) in enumerate(zip(chunks, payloads, strict=True)):
        events.extend((first_index + i, event) for event in endpointer.process(chunk, payload))
    return events


def turns(events: list[tuple[int, VadEvent]]) -> list[Turn]:
    """Group events into turns, checking that nothing comes back between turns."""
    result: list[Turn] = []
    current: Turn | None = None
    for index, event in events:
        if isinstance(event, TurnOpened):
            assert current is None, f"frame {index}: opened while open"
            current = Turn(index, event, list(event.preroll))
            result.append(current)
        else:
            assert current is not None, f"frame {index}: {event} between turns"
            if isinstance(event, TurnAudio):
                current.payloads.append(event.payload)
            else:
                current.end, current.closed_at = event, index
                current = None
    return result


def frame_of(ms: float, frame_ms: int) -> int:
    """Index of the frame holding the instant `ms`."""
    return int(ms // frame_ms)


# --- the decision logic, with webrtcvad scripted --------------------------------

SPEECH_FRAME = np.full(320, 3000, dtype="<i2").tobytes()
QUIET_FRAME = bytes(640)
WARMUP = WARMUP_MS // 20
SHORT_HANGOVER = SHORT_HANGOVER_MS // 20
"""Asked for on top of start_ms even with this stand-in, which has no hangover."""


class ScriptedVad:
    """Stands in for webrtcvad.Vad: any non-zero sample is speech."""

    def __init__(self, aggressiveness: int) -> None:
        assert 0 <= aggressiveness <= 3

    def is_speech(self, frame: bytes, rate: int) -> bool:
        assert rate == RATE
        return frame != bytes(len(frame))


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vad_module.webrtcvad, "Vad", ScriptedVad)


def script(pattern: str) -> bytes:
    """16 kHz audio from a pattern: `S` a speech frame, `.` a silent one (20 ms each)."""
    return b"".join(SPEECH_FRAME if c == "S" else QUIET_FRAME for c in pattern)


def warm(endpointer: Endpointer) -> int:
    """Feed the warm-up in silence; returns the next frame index."""
    assert feed(endpointer, script("." * WARMUP)) == []
    return WARMUP


@pytest.mark.usefixtures("scripted")
@pytest.mark.parametrize(
    ("pattern", "opens_at"),
    [
        ("SSSSS", 4),  # 40 ms -> 2 frames of 20 ms, + 3 for webrtcvad's hangover
        ("SS.SSS", 5),  # one gap inside the onset is tolerated
        ("S.SSSS", 5),
        ("SS..SSSSS", 8),  # two gaps: the earlier speech no longer counts
        ("SSSS.", None),  # not enough speech (a click plus webrtcvad's hangover)
        ("S.S.S.S.S.S.S", None),  # every other frame: never 5 of 6
        ("SS.S.SS", None),
    ],
)
def test_opening_needs_start_ms_with_one_gap_at_most(pattern: str, opens_at: int | None) -> None:
    endpointer = Endpointer(VadConfig(start_ms=40))
    start = warm(endpointer)
    opened = [
        i - start
        for i, e in feed(endpointer, script(pattern), first_index=start)
        if isinstance(e, TurnOpened)
    ]
    assert opened == ([] if opens_at is None else [opens_at])


@pytest.mark.usefixtures("scripted")
def test_warmup_frames_never_count_as_speech() -> None:
    endpointer = Endpointer(VadConfig(start_ms=40))
    events = feed(endpointer, script("S" * (WARMUP + 10)))
    assert [i for i, e in events if isinstance(e, TurnOpened)] == [WARMUP + 4]
    endpointer.reset()
    events = feed(endpointer, script("S" * (WARMUP + 10)))
    assert [i for i, e in events if isinstance(e, TurnOpened)] == [WARMUP + 4]


@pytest.mark.usefixtures("scripted")
def test_silence_closes_and_reopening_needs_fresh_speech() -> None:
    endpointer = Endpointer(VadConfig(start_ms=40, end_silence_ms=200, preroll_ms=100))
    start = warm(endpointer)
    pattern = "SSSSSS" + "." * 9 + "S" + "....." + "SSSS" + "." * 30
    found = turns(feed(endpointer, script(pattern), first_index=start))
    assert len(found) == 1
    turn = found[0]
    assert turn.opened_at == start + 4
    # 200 ms = 10 silent frames: the S at 15 and the run at 21..24 restart the count.
    assert turn.closed_at == start + 34
    assert turn.end == TurnClosed("silence", speech_ms=(6 + 1 + 4) * 20)
    # Contiguous audio: 5 frames of preroll before the onset, then up to the close.
    assert turn.frame_indices == list(range(start - 5, turn.closed_at + 1))
    assert not endpointer.is_open
    assert endpointer.speech_ms == 0


@pytest.mark.usefixtures("scripted")
def test_max_turn_closes_runaway_turns_and_speech_reopens_afresh() -> None:
    endpointer = Endpointer(VadConfig(start_ms=40, max_turn_s=1.0, preroll_ms=0))
    start = warm(endpointer)
    found = turns(feed(endpointer, script("S" * 140), first_index=start))
    first, second = found[:2]
    # 1 s from the first speech frame: 50 frames.
    assert first.frame_indices == list(range(start, start + 50))
    assert first.end == TurnClosed("max_length", speech_ms=1000)
    # The start condition is met afresh: 5 new speech frames after the close.
    assert second.opened_at == first.closed_at + 5
    assert second.frame_indices[0] == first.closed_at + 1


@pytest.mark.usefixtures("scripted")
@pytest.mark.parametrize("speech_frames", [1, 2, 3, 4, 5, 6])
def test_turns_with_under_100_ms_of_speech_never_commit(speech_frames: int) -> None:
    endpointer = Endpointer(VadConfig(start_ms=10, end_silence_ms=100))
    start = warm(endpointer)
    pattern = "S" * speech_frames + "." * 10
    found = turns(feed(endpointer, script(pattern), first_index=start))
    speech_ms = speech_frames * 20
    if speech_frames < 1 + SHORT_HANGOVER:
        assert found == []
    elif speech_ms < MIN_COMMIT_MS:
        assert [t.end for t in found] == [TurnDropped(speech_ms)]
    else:
        assert [t.end for t in found] == [TurnClosed("silence", speech_ms)]


@pytest.mark.usefixtures("scripted")
def test_speech_ms_counts_speech_in_the_open_turn() -> None:
    endpointer = Endpointer(VadConfig(start_ms=20))
    warm(endpointer)
    feed(endpointer, script("SS.SS"))
    assert endpointer.is_open
    assert endpointer.speech_ms == 80
    feed(endpointer, script("..SS"))
    assert endpointer.speech_ms == 120


@pytest.mark.usefixtures("scripted")
def test_push_to_talk_opens_with_preroll_and_ignores_silence() -> None:
    endpointer = Endpointer(VadConfig(preroll_ms=100, end_silence_ms=200))
    assert endpointer.close_now() == []
    feed(endpointer, script("." * 30))
    (opened,) = endpointer.open_now()
    assert opened == TurnOpened(tuple(tag(i) for i in range(25, 30)))
    events = feed(endpointer, script("." * 40), first_index=30)
    assert [e for _, e in events] == [TurnAudio(tag(i)) for i in range(30, 70)]
    assert endpointer.speech_ms == 800  # all of it: the user decided
    assert endpointer.close_now() == [TurnClosed("manual", speech_ms=800)]
    assert not endpointer.is_open
    assert endpointer.close_now() == []


@pytest.mark.usefixtures("scripted")
def test_push_to_talk_preroll_is_what_was_heard_when_less_than_preroll_ms() -> None:
    endpointer = Endpointer(VadConfig(preroll_ms=100))
    feed(endpointer, script("...."))
    assert endpointer.open_now() == [TurnOpened((tag(0), tag(1), tag(2), tag(3)))]


@pytest.mark.usefixtures("scripted")
def test_push_to_talk_quick_press_is_dropped() -> None:
    endpointer = Endpointer(VadConfig())
    assert endpointer.open_now() == [TurnOpened(())]
    assert endpointer.open_now() == []
    feed(endpointer, script("SSSS"))
    assert endpointer.close_now() == [TurnDropped(80)]


@pytest.mark.usefixtures("scripted")
def test_push_to_talk_during_a_vad_turn_keeps_it_open_through_silence() -> None:
    endpointer = Endpointer(VadConfig(start_ms=40, end_silence_ms=100))
    warm(endpointer)
    assert [type(e) for _, e in feed(endpointer, script("SSSSS"))] == [TurnOpened]
    assert endpointer.open_now() == []
    assert all(isinstance(e, TurnAudio) for _, e in feed(endpointer, script("." * 20)))
    assert endpointer.close_now() == [TurnClosed("manual", speech_ms=25 * 20)]


@pytest.mark.usefixtures("scripted")
def test_push_to_talk_is_bounded_by_max_turn() -> None:
    endpointer = Endpointer(VadConfig(max_turn_s=0.3))  # 0.3 * 1000 = 300.00000000000006
    endpointer.open_now()
    events = feed(endpointer, script("." * 30))
    assert events[-1] == (14, TurnClosed("max_length", speech_ms=300))
    assert len(events) == 16  # 15 TurnAudio, then the close; then nothing


@pytest.mark.usefixtures("scripted")
def test_reset_forgets_the_turn_and_the_preroll() -> None:
    endpointer = Endpointer(VadConfig(start_ms=40, preroll_ms=200))
    warm(endpointer)
    feed(endpointer, script("SSSSS"))
    assert endpointer.is_open
    endpointer.reset()
    assert not endpointer.is_open
    assert endpointer.speech_ms == 0
    assert feed(endpointer, script("." * 3), first_index=100) == []
    assert endpointer.open_now() == [TurnOpened((tag(100), tag(101), tag(102)))]


def test_rejects_wrong_frame_sizes() -> None:
    with pytest.raises(ValueError, match="frame_ms"):
        Endpointer(VadConfig(), frame_ms=25)
    endpointer = Endpointer(VadConfig(), frame_ms=10)
    assert endpointer.frame_bytes == 320
    with pytest.raises(ValueError, match="expected 320 bytes"):
        endpointer.process(bytes(640), b"")


# --- real speech -----------------------------------------------------------------


@pytest.fixture(scope="module")
def phrase() -> bytes:
    return speech_pcm(PHRASE)


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
def test_turn_opens_and_closes_where_the_speech_is(phrase: bytes, frame_ms: int) -> None:
    config = VadConfig()  # aggressiveness 2, start 90 ms, end 700 ms, min_level 0
    lead_ms, speech_ms = 1200, len_ms(phrase)
    end_ms = lead_ms + speech_ms
    (turn,) = turns(
        feed(Endpointer(config, frame_ms), silence(lead_ms) + phrase + silence(2000), frame_ms)
    )

    opened_ms = (turn.opened_at + 1) * frame_ms
    start_ms = math.ceil(config.start_ms / frame_ms) * frame_ms + SHORT_HANGOVER_MS
    expected_open = lead_ms + start_ms
    assert abs(opened_ms - expected_open) <= frame_ms

    assert turn.closed_at is not None
    closed_ms = (turn.closed_at + 1) * frame_ms
    # Within a frame of end_silence_ms: webrtcvad's hangover counts as silence.
    closing = math.ceil(config.end_silence_ms / frame_ms) * frame_ms
    assert abs(closed_ms - (end_ms + closing)) <= 2 * frame_ms
    assert isinstance(turn.end, TurnClosed)
    assert turn.end.reason == "silence"
    assert turn.end.speech_ms >= 0.8 * speech_ms


def test_energy_floor_vetoes_webrtcvad_hangover(phrase: bytes) -> None:
    config = VadConfig(min_level=QUIET_FLOOR)
    end_ms = 1200 + len_ms(phrase)
    (turn,) = turns(feed(Endpointer(config), silence(1200) + phrase + silence(2000)))
    assert turn.closed_at is not None
    assert abs((turn.closed_at + 1) * 20 - (end_ms + config.end_silence_ms)) <= 2 * 20


def test_payload_is_exactly_preroll_speech_and_closing_silence(phrase: bytes) -> None:
    """2 s silence + speech + 3 s silence; the payload is 24 kHz audio, counted in bytes."""
    config = VadConfig()
    pcm16k = silence(2000) + phrase + silence(3000)
    samples = np.frombuffer(pcm16k, dtype="<i2")
    pcm24k = soxr.resample(samples, RATE, 24000).astype("<i2").tobytes()
    chunk = 24 * 20 * 2  # bytes of 20 ms at 24 kHz
    payloads = [pcm24k[i * chunk : (i + 1) * chunk] for i in range(len(pcm16k) // 640)]

    endpointer = Endpointer(config)
    events = feed(endpointer, pcm16k, payloads=payloads)
    (turn,) = turns(events)  # also: nothing at all came back between turns
    assert turn.closed_at is not None
    sent = b"".join(turn.payloads)

    onset = frame_of(2000, 20)
    preroll_frames = config.preroll_ms // 20
    opening_frames = (math.ceil(config.start_ms / 20) * 20 + SHORT_HANGOVER_MS) // 20
    assert len(turn.opened.preroll) == preroll_frames + opening_frames
    start, stop = (onset - preroll_frames) * chunk, (turn.closed_at + 1) * chunk
    assert sent == pcm24k[start:stop]
    # In milliseconds: preroll + speech + closing silence (700 ms; the hangover counts as silence).
    closing_ms = len(sent) / (24 * 2) - config.preroll_ms - len_ms(phrase)
    assert abs(closing_ms - config.end_silence_ms) <= 2 * 20


def test_preroll_is_bounded_by_what_was_heard(phrase: bytes) -> None:
    config = VadConfig(preroll_ms=1000)
    (turn,) = turns(feed(Endpointer(config), silence(400) + phrase + silence(1000)))
    assert turn.frame_indices[0] == 0  # only 400 ms of audio existed before the speech
    config = VadConfig(preroll_ms=0)
    (turn,) = turns(feed(Endpointer(config), silence(1000) + phrase + silence(1000)))
    assert turn.frame_indices[0] == frame_of(1000, 20)  # the deciding frames only


def test_two_utterances_two_turns_no_audio_twice(phrase: bytes) -> None:
    pcm = silence(1000) + phrase + silence(1500) + phrase + silence(1500)
    found = turns(feed(Endpointer(VadConfig()), pcm))
    assert [type(t.end) for t in found] == [TurnClosed, TurnClosed]
    sent = [i for t in found for i in t.frame_indices]
    assert sent == sorted(set(sent))


def test_runaway_speech_is_closed_at_max_turn() -> None:
    long_speech = speech_pcm("one two three four five six seven eight nine ten eleven twelve")
    assert len_ms(long_speech) > 3000
    config = VadConfig(max_turn_s=2.0)
    first, second = turns(feed(Endpointer(config), silence(1000) + long_speech + silence(1500)))
    assert isinstance(first.end, TurnClosed)
    assert first.end.reason == "max_length"
    preroll_frames = config.preroll_ms // 20
    assert len(first.payloads) - preroll_frames == 100  # 2 s from the first speech frame
    # The speech goes on, and opens a new turn only once the start condition is met
    # afresh: no preroll from the closed turn, nothing sent twice.
    opening_frames = (math.ceil(config.start_ms / 20) * 20 + SHORT_HANGOVER_MS) // 20
    assert first.closed_at is not None
    assert second.opened_at >= first.closed_at + opening_frames
    assert second.frame_indices[0] == first.closed_at + 1
    assert isinstance(second.end, TurnClosed)


@pytest.mark.parametrize("ms", [5, 10, 20])
@pytest.mark.parametrize("peak", [0.3, 1.0])
def test_a_click_does_not_open_a_turn(ms: int, peak: float) -> None:
    pcm = silence(1000) + click(ms, RATE, peak) + silence(1000)
    assert feed(Endpointer(VadConfig()), pcm) == []


def click_train(ms: int, every_ms: int) -> bytes:
    pcm = silence(500)
    for k in range(10):
        pcm += click(ms, RATE, 1.0, seed=k) + silence(every_ms - ms)
    return pcm


@pytest.mark.parametrize("ms", [5, 10, 20])
@pytest.mark.parametrize("every_ms", [250, 1000])
def test_a_train_of_clicks_does_not_open_a_turn(ms: int, every_ms: int) -> None:
    assert feed(Endpointer(VadConfig()), click_train(ms, every_ms)) == []


@pytest.mark.parametrize("ms", [5, 10, 20])
def test_rapid_clicks_need_a_quiet_floor(ms: int) -> None:
    # Ten a second: webrtcvad's hangover joins them into one long "speech" run.
    assert feed(Endpointer(VadConfig(min_level=QUIET_FLOOR)), click_train(ms, 100)) == []


@pytest.mark.parametrize("kind", ["pink", "hum"])
def test_steady_noise_fools_webrtcvad_but_not_the_energy_floor(kind: NoiseKind) -> None:
    pcm = noise(8000, NOISE_LEVEL, RATE, kind=kind)
    assert any(isinstance(e, TurnOpened) for _, e in feed(Endpointer(VadConfig()), pcm))
    assert feed(Endpointer(VadConfig(min_level=NOISE_FLOOR)), pcm) == []


@pytest.mark.parametrize("kind", ["white", "pink", "hum"])
def test_speech_in_steady_noise_with_the_energy_floor(kind: NoiseKind) -> None:
    speech = scale(speech_pcm("turn on the kitchen lights"), 2.0)  # -15 dBFS
    lead_ms, end_ms = 1200, 1200 + len_ms(speech)
    clean = silence(lead_ms) + speech + silence(2000)
    pcm = mix(clean, noise(round(len_ms(clean)), NOISE_LEVEL, RATE, kind=kind))
    config = VadConfig(min_level=NOISE_FLOOR)
    (turn,) = turns(feed(Endpointer(config), pcm))
    assert turn.closed_at is not None
    assert isinstance(turn.end, TurnClosed)
    # The onset may need a frame or three more, as quiet onsets fall under the floor.
    expected_open = lead_ms + math.ceil(config.start_ms / 20) * 20 + SHORT_HANGOVER_MS
    assert expected_open <= (turn.opened_at + 1) * 20 <= expected_open + 3 * 20
    # All of the speech is sent: the preroll reaches back before it, the close is after it.
    assert turn.frame_indices[0] <= frame_of(lead_ms, 20)
    assert frame_of(end_ms, 20) < turn.closed_at <= frame_of(end_ms + config.end_silence_ms, 20) + 2


@pytest.mark.parametrize("blip_ms", [20, 40, 60, 80, 100, 140])
def test_short_blips_never_commit(blip_ms: int) -> None:
    """A blip of vowel with start_ms low enough to open: under 100 ms is dropped."""
    vowel = speech_pcm("turn on the kitchen lights")[int(0.28 * RATE) * 2 :]
    blip = vowel[: blip_ms * RATE // 1000 * 2]
    config = VadConfig(start_ms=10, min_level=QUIET_FLOOR)
    found = turns(feed(Endpointer(config), silence(500) + blip + silence(1500)))
    for turn in found:
        if isinstance(turn.end, TurnClosed):
            assert turn.end.speech_ms >= MIN_COMMIT_MS
        else:
            assert isinstance(turn.end, TurnDropped)
    if blip_ms < MIN_COMMIT_MS:
        assert not any(isinstance(t.end, TurnClosed) for t in found)
    if blip_ms == 80:  # long enough to open with start_ms 10, too short to commit
        assert [type(t.end) for t in found] == [TurnDropped]


@pytest.mark.parametrize("kind", ["white", "pink", "hum"])
def test_fixture_noise_has_the_asked_level(kind: NoiseKind) -> None:
    pcm = noise(2000, 0.04, RATE, kind=kind)
    assert len_ms(pcm) == 2000
    assert level(pcm) == pytest.approx(0.04, rel=0.01)


def test_fixture_speech_wav_round_trip_and_mix(tmp_path: Path) -> None:
    path = speech_wav(PHRASE, 24000)
    pcm, rate = read_wav(path)
    assert rate == 24000
    assert len_ms(pcm, 24000) == pytest.approx(len_ms(speech_pcm(PHRASE)), abs=1)
    write_wav(tmp_path / "copy.wav", pcm, rate)
    assert read_wav(tmp_path / "copy.wav") == (pcm, 24000)
    mixed = mix(silence(100, 24000), pcm)
    assert mixed == pcm  # the shorter is zero-padded
    assert frames(silence(50), RATE, 20) == [bytes(640), bytes(640)]  # partial dropped
