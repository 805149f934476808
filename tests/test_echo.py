"""Echo cancellation, noise suppression and gain as a capture stage, with arrays.

A synthetic room: the far end is espeak speech "played" into a `PlayedReference` at
known times, the microphone hears it delayed and attenuated (plus a short reverb),
and the user talks over part of it. What a user would notice: the assistant's voice
is gone from what the daemon listens to, the user's voice is not, and the daemon
says once when the canceller has converged and with what delay.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt
import pytest
import webrtcvad

from harkd.audio.base import AudioFrame
from harkd.audio.echo import (
    READ_AHEAD_S,
    AudioProcessing,
    DoubleTalkFilter,
    ResidualGate,
    processing_stages,
)
from harkd.audio.pipeline import capture_pipeline
from harkd.audio.reference import PlayedReference
from harkd.audio.wav import NullOutput
from harkd.config import ConfigError, ProcessingConfig, parse_config
from speech_fixtures import noise, silence, speech_pcm

RATE = 16000
FRAME = 320  # 20 ms
T0 = 1000.0  # the monotonic time the scenario starts at
ANSWER = (
    "Sure. I am turning on the kitchen lights now, and while I am at it let me tell you "
    "all about the weather for the rest of the week."
)
ECHO_DELAY_S = 0.06


def samples(pcm: bytes) -> npt.NDArray[np.float64]:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64)


def db(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    return float(10 * np.log10((np.mean(a**2) + 1) / (np.mean(b**2) + 1)))


def room(
    far: npt.NDArray[np.float64], user: npt.NDArray[np.float64], user_at_s: float
) -> npt.NDArray[np.float64]:
    """What the microphone hears: the far end delayed, attenuated, a little reverb,
    plus the user from `user_at_s`."""
    delay = int(ECHO_DELAY_S * RATE)
    echo = np.convolve(np.concatenate((np.zeros(delay), far)) * 0.5, [1.0, 0, 0.3, 0, 0.15])
    mic = np.zeros(max(len(echo), int(user_at_s * RATE) + len(user)))
    mic[: len(echo)] += echo
    start = int(user_at_s * RATE)
    mic[start : start + len(user)] += user
    return mic


class Speaker:
    """Plays `far` from T0 into `reference` as the playback thread reports it: 20 ms
    writes with jittered stamps, each written `lead_s` (80 ms: the device buffer)
    before it plays."""

    def __init__(
        self, reference: PlayedReference, far: npt.NDArray[np.float64], lead_s: float = 0.08
    ) -> None:
        self.reference = reference
        self.lead_s = lead_s
        self.pcm = np.clip(far, -32768, 32767).astype("<i2")
        self.jitter = np.random.default_rng(1).uniform(-0.004, 0.004, len(far) // FRAME + 1)
        self.next = 0
        self.dropped_at: float | None = None

    def advance(self, now: float) -> None:
        """Write everything due to play before `now` + `lead_s`."""
        while self.next < len(self.pcm) and T0 + self.next / RATE < now + self.lead_s:
            at = T0 + self.next / RATE
            if self.dropped_at is not None and at >= self.dropped_at:
                self.reference.dropped(self.dropped_at)  # a barge-in: the rest is not heard
                self.next = len(self.pcm)
                return
            chunk = self.pcm[self.next : self.next + FRAME].tobytes()
            self.reference.played(chunk, RATE, at + self.jitter[self.next // FRAME])
            self.next += FRAME


def run(
    stage: AudioProcessing,
    mic: npt.NDArray[np.float64],
    speaker: Speaker | None = None,
    frame: int = FRAME,
    lost: range = range(0),
) -> npt.NDArray[np.float64]:
    """Feed the mic in frames stamped as ALSA would (when the period was complete);
    the frames numbered in `lost` never arrive (a busy loop's queue dropped them)."""
    out: list[npt.NDArray[np.float64]] = []
    pcm = np.clip(np.rint(mic), -32768, 32767).astype("<i2")
    for start in range(0, len(pcm) - frame + 1, frame):
        stamp = T0 + (start + frame) / RATE
        if start // frame in lost:
            out.append(np.zeros(frame))  # keeps the output aligned with the mic
            continue
        if speaker is not None:
            speaker.advance(stamp)
        result = stage.process(AudioFrame(pcm[start : start + frame].tobytes(), RATE, stamp))
        if result is not None:
            out.append(samples(result.pcm))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def far() -> npt.NDArray[np.float64]:
    return samples(silence(300) + speech_pcm(ANSWER) + silence(300))


@pytest.fixture(scope="module")
def user() -> npt.NDArray[np.float64]:
    return samples(speech_pcm("what time is it in tokyo", voice="en-gb"))


def echo_stage() -> tuple[AudioProcessing, PlayedReference]:
    reference = PlayedReference(RATE)
    return AudioProcessing(ProcessingConfig(echo_cancellation=True), RATE, reference), reference


def test_the_assistants_voice_is_removed_and_the_users_kept(
    far: npt.NDArray[np.float64], user: npt.NDArray[np.float64], caplog: pytest.LogCaptureFixture
) -> None:
    stage, reference = echo_stage()
    user_at_s = 5.0
    mic = room(far, user, user_at_s)
    caplog.set_level(logging.INFO, "harkd.audio.echo")
    assert not stage.echo_free
    out = run(stage, mic, Speaker(reference, far))

    # After convergence (3 s of the answer), the echo alone is attenuated by >= 25 dB.
    echo_only = slice(3 * RATE, int(user_at_s * RATE))
    assert db(mic[echo_only], out[echo_only]) >= 25
    # The user's words over the answer come through, a little quieter (AEC3 suppresses
    # harder while both talk), far louder than the echo that remains.
    talk = slice(int(user_at_s * RATE), int(user_at_s * RATE) + len(user))
    assert db(user, out[talk]) < 12
    assert db(out[talk], out[echo_only]) > 20
    assert stage.echo_free

    converged = [r.getMessage() for r in caplog.records if "converged" in r.getMessage()]
    assert len(converged) == 1, converged
    assert stage.convergence is not None and stage.convergence.delay_ms is not None
    # The echo lags the reference by the room's delay plus the read-ahead.
    expected_ms = (ECHO_DELAY_S + READ_AHEAD_S) * 1000
    assert abs(stage.convergence.delay_ms - expected_ms) <= 5, stage.convergence.delay_ms
    assert stage.convergence.converged_after_s is not None
    assert stage.convergence.converged_after_s < 3


def test_vad_hears_the_user_over_the_answer_and_not_the_answer(
    far: npt.NDArray[np.float64], user: npt.NDArray[np.float64]
) -> None:
    stage, reference = echo_stage()
    user_at_s = 5.0
    out = run(stage, room(far, user, user_at_s), Speaker(reference, far))
    vad = webrtcvad.Vad(2)
    pcm = np.clip(out, -32768, 32767).astype("<i2")

    def voiced(start_s: float, end_s: float) -> float:
        frames = range(int(start_s * RATE), int(end_s * RATE) - FRAME, FRAME)
        return np.mean([vad.is_speech(pcm[i : i + FRAME].tobytes(), RATE) for i in frames])

    user_end_s = user_at_s + len(user) / RATE
    assert voiced(3.0, user_at_s - 0.1) < 0.1  # the answer alone: (almost) never speech
    assert voiced(user_at_s + 0.1, user_end_s - 0.1) > 0.9  # the user over it
    # ... from their first words: the gate that holds back leaked echo passes the user
    # as soon as the mic hears what the speaker does not explain (AEC3 suppresses the
    # user's onset as hard as echo; gated on that, only 0.43 of these were heard).
    assert voiced(user_at_s, user_at_s + 0.3) > 0.8


def test_the_user_over_the_answer_reaches_the_vad_frame_by_frame(
    far: npt.NDArray[np.float64], user: npt.NDArray[np.float64]
) -> None:
    """Each of the user's voiced frames, judged on its own (no VAD hangover to carry
    it): AEC3 suppresses many of them as hard as the echo, and only 0.71 came through
    before the double-talk filter took the user's voice from the mic."""
    stage, reference = echo_stage()
    user_at_s = 5.0
    out = run(stage, room(far, user, user_at_s), Speaker(reference, far))
    start = int(user_at_s * RATE)
    heard = np.clip(out[start : start + len(user)], -32768, 32767).astype("<i2")
    said = user.astype("<i2")

    def voiced(pcm: npt.NDArray[np.int16], at: int) -> bool:
        return webrtcvad.Vad(2).is_speech(pcm[at : at + FRAME].tobytes(), RATE)

    frames = [at for at in range(0, len(said) - FRAME, FRAME) if voiced(said, at)]
    kept = np.mean([voiced(heard, at) for at in frames])
    assert kept > 0.85, kept


def test_the_double_talk_filter_keeps_the_user_and_drops_the_echo() -> None:
    """A block with the user's voice at 1 kHz over the echo at 300 Hz: the filter keeps
    the one and suppresses the other to its floor (-20 dB)."""
    gate = ResidualGate(RATE)
    edges = gate._edges  # noqa: SLF001 - the filter works on the gate's bands
    filter_ = DoubleTalkFilter(RATE, edges)
    t = np.arange(2 * FRAME) / RATE
    user_tone = 3000 * np.sin(2 * np.pi * 1000 * t)
    echo_tone = 3000 * np.sin(2 * np.pi * 300 * t)
    mic = np.rint(user_tone + echo_tone).astype(np.int16)

    def band_energies(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        spectrum = np.abs(np.fft.rfft(x[-FRAME:] * np.hanning(FRAME))) ** 2
        return np.add.reduceat(spectrum, edges[:-1])[: len(edges) - 1]

    gains = filter_.gains(band_energies(mic.astype(np.float64)), band_energies(echo_tone))
    block = FRAME // 2
    filtered = np.concatenate(
        [
            filter_.run(mic[i - block : i], mic[i : i + block], gains)
            for i in range(block, len(mic), block)
        ]
    )
    # Compare the steady second half with each tone (the filter runs 2.5 ms behind).
    tail = filtered[-FRAME:]

    def level_of(tone_hz: float) -> float:
        spectrum = np.abs(np.fft.rfft(tail * np.hanning(FRAME)))
        return float(spectrum[round(tone_hz * FRAME / RATE)])

    spectrum_in = np.abs(np.fft.rfft(mic[-FRAME:] * np.hanning(FRAME)))
    kept_db = 20 * np.log10(level_of(1000) / spectrum_in[round(1000 * FRAME / RATE)])
    dropped_db = 20 * np.log10(level_of(300) / spectrum_in[round(300 * FRAME / RATE)])
    assert kept_db > -1.0, kept_db
    assert dropped_db < -15.0, dropped_db


def test_silence_volume_change_and_a_dropped_answer_stay_cancelled(
    far: npt.NDArray[np.float64],
) -> None:
    """The reference is post-gain; a drop erases what was never heard."""
    stage, reference = echo_stage()
    quiet = far * 0.25  # the volume went down to 50 (a square law: -12 dB)
    # Answer, 1 s of silence (no reference at all), the answer quieter, then a barge-in
    # drops the rest: written to the device but never heard.
    heard = np.concatenate((far, np.zeros(RATE), quiet[: 3 * RATE]))
    speaker = Speaker(reference, np.concatenate((heard, quiet[3 * RATE :])))
    speaker.dropped_at = T0 + len(heard) / RATE
    mic = np.concatenate((room(heard, np.zeros(0), 0), np.zeros(2 * RATE)))
    out = run(stage, mic, speaker)
    quiet_part = slice(len(far) + RATE + int(0.5 * RATE), len(heard))
    assert db(mic[quiet_part], out[quiet_part]) >= 25
    # Nothing after the drop is in the reference: the canceller expects no echo there.
    assert not reference.read(round(speaker.dropped_at * RATE), RATE).any()


def test_frames_lost_on_the_way_do_not_misalign_the_reference(
    far: npt.NDArray[np.float64],
) -> None:
    stage, reference = echo_stage()
    mic = room(far, np.zeros(0), 0)
    out = run(stage, mic, Speaker(reference, far), lost=range(150, 153))  # at 3 s
    # After the re-anchoring (10 frames) and AEC3 settling, the echo is gone again.
    after = slice(4 * RATE, len(out))
    assert db(mic[after], out[after]) >= 25


def test_a_speaker_that_writes_just_in_time_is_cancelled_all_the_same(
    far: npt.NDArray[np.float64],
) -> None:
    """Through PulseAudio the playback thread writes only 30-60 ms ahead of the ear:
    a frame's reference is then partly unwritten when the frame arrives."""
    stage, reference = echo_stage()
    mic = room(far, np.zeros(0), 0)
    out = run(stage, mic, Speaker(reference, far, lead_s=0.03))
    assert len(out) >= len(mic) - 2 * FRAME  # nothing lost; at most a frame still waits
    # Read at once, frames lacked up to their last 10 ms of reference: the canceller
    # converged later, removed 37 dB instead of 60, and the VAD heard the answer.
    assert stage.convergence is not None and stage.convergence.converged_after_s is not None
    assert stage.convergence.converged_after_s < 3
    converged = slice(3 * RATE, len(out))
    assert db(mic[converged], out[converged]) >= 50
    vad = webrtcvad.Vad(2)
    pcm = np.clip(out[converged], -32768, 32767).astype("<i2")
    assert not any(
        vad.is_speech(pcm[i : i + FRAME].tobytes(), RATE) for i in range(0, len(pcm) - FRAME, FRAME)
    )


def gate_pass(
    gate: ResidualGate,
    far: npt.NDArray[np.float64],
    echo_gain: float,
    delay_s: float = ECHO_DELAY_S,
) -> npt.NDArray[np.int16]:
    """`far` through the gate, the mic hearing it `delay_s` late at `echo_gain`, and a
    canceller that removes 40 dB of whatever the mic hears (so every block is, by the
    canceller's own account, echo it removed)."""
    delay = int(delay_s * RATE)
    near = np.concatenate((np.zeros(delay), far[: len(far) - delay])) * echo_gain
    ref = np.clip(far, -32768, 32767).astype("<i2")
    mic = np.clip(near, -32768, 32767).astype("<i2")
    out = (mic // 100).astype("<i2")
    return np.concatenate(
        [
            gate.apply(mic[i : i + FRAME], ref[i : i + FRAME], out[i : i + FRAME])
            for i in range(0, len(ref) - FRAME + 1, FRAME)
        ]
    )


def test_the_gate_learns_the_echo_again_when_it_changes(
    far: npt.NDArray[np.float64], caplog: pytest.LogCaptureFixture
) -> None:
    """The volume turned up on the device (the reference does not see it) and the
    echo's delay moved: the gate takes the louder, later echo for the user for a
    moment, then learns it and holds the assistant's voice back again."""
    gate = ResidualGate(RATE)
    answers = np.concatenate([far] * 3)
    gate_pass(gate, answers, 0.05)
    assert gate.learned
    caplog.set_level(logging.INFO, "harkd.audio.echo")
    changed = gate_pass(gate, answers, 0.05 * 10 ** (20 / 20), delay_s=0.2)
    assert any("learning it again" in r.getMessage() for r in caplog.records)
    assert gate.learned
    last_answer = changed[-len(far) // FRAME * FRAME :].reshape(-1, FRAME)
    passed = np.mean(last_answer.any(axis=1))
    assert passed < 0.05, passed  # was 0.9 before it learned the change
    vad = webrtcvad.Vad(2)
    assert not any(vad.is_speech(frame.tobytes(), RATE) for frame in last_answer)


def test_frames_that_are_not_whole_10ms_blocks_are_regrouped(
    far: npt.NDArray[np.float64],
) -> None:
    stage, reference = echo_stage()
    mic = room(far, np.zeros(0), 0)
    out = run(stage, mic, Speaker(reference, far), frame=240)  # 15 ms periods
    assert abs(len(out) - len(mic)) < 2 * 240
    assert db(mic[3 * RATE : len(out)], out[3 * RATE :]) >= 25


def test_reference_timeline() -> None:
    reference = PlayedReference(RATE, history_s=1.0)
    tone = (np.arange(800) % 100 + 1).astype("<i2")
    reference.played(tone[:400].tobytes(), RATE, 10.0)
    # 3 ms late by its own stamp: still the same stream, placed end to end.
    reference.played(tone[400:].tobytes(), RATE, 10.0 + 403 / RATE)
    start = 10 * RATE
    assert np.array_equal(reference.read(start, 800), tone)
    assert not reference.read(start - 100, 100).any()  # before: silence
    assert not reference.read(start + 800, 100).any()  # after: silence
    # A write far later starts a new stream at its own time, silence in between.
    reference.played(tone.tobytes(), RATE, 11.0)
    assert not reference.read(start + 800, RATE - 800).any()
    assert np.array_equal(reference.read(11 * RATE, 800), tone)
    # Older than the history reads as silence.
    reference.played(tone.tobytes(), RATE, 12.5)
    assert not reference.read(start, 800).any()
    # A drop erases what would have played after it.
    reference.dropped(12.5 + 400 / RATE)
    assert np.array_equal(reference.read(round(12.5 * RATE), 400), tone[:400])
    assert not reference.read(round(12.5 * RATE) + 400, 400).any()


def test_reference_at_another_rate_is_converted() -> None:
    reference = PlayedReference(RATE)
    t = np.arange(24000) / 24000
    tone = np.rint(8000 * np.sin(2 * np.pi * 440 * t)).astype("<i2")
    for start in range(0, 24000, 480):
        reference.played(tone[start : start + 480].tobytes(), 24000, 5.0 + start / 24000)
    got = reference.read(5 * RATE + 1000, RATE - 2000).astype(float)
    assert abs(np.sqrt(np.mean(got**2)) - 8000 / np.sqrt(2)) < 200
    spectrum = np.abs(np.fft.rfft(got))
    assert abs(np.argmax(spectrum) * RATE / len(got) - 440) < 2


def test_noise_suppression_on_its_own_quiets_a_noisy_kitchen() -> None:
    speech = samples(speech_pcm("turn on the kitchen lights"))
    hiss = samples(noise(4000, 0.02, kind="white"))
    mic = hiss.copy()
    mic[RATE : RATE + len(speech)] += speech
    stage = AudioProcessing(ProcessingConfig(noise_suppression="high"), RATE)
    assert stage.echo_free  # no canceller: nothing to wait for
    out = run(stage, mic)
    tail = slice(3 * RATE, len(out))  # noise alone, once the estimate settled
    assert db(mic[tail], out[tail]) >= 10
    talk = slice(RATE, RATE + len(speech))
    assert abs(db(out[talk], speech)) < 4


def test_auto_gain_on_its_own_lifts_a_faint_voice() -> None:
    faint = samples(speech_pcm("turn on the kitchen lights")) * 0.03
    mic = np.tile(np.concatenate((faint, np.zeros(RATE // 2))), 4)
    stage = AudioProcessing(ProcessingConfig(auto_gain=True), RATE)
    out = run(stage, mic)
    last = slice(len(out) - len(faint) - RATE // 2, len(out))
    assert db(out[last], mic[last]) >= 6


def test_meter_shows_the_echo_cancelled_level(far: npt.NDArray[np.float64]) -> None:
    stage, reference = echo_stage()
    speaker = Speaker(reference, far)
    pipeline = capture_pipeline(RATE, 24000, is_shut=lambda: False, conditioning=[stage])
    assert pipeline.off_loop
    mic = np.clip(room(far, np.zeros(0), 0), -32768, 32767).astype("<i2")
    levels = []
    for start in range(0, len(mic) - FRAME + 1, FRAME):
        stamp = T0 + (start + FRAME) / RATE
        speaker.advance(stamp)
        pipeline.push(AudioFrame(mic[start : start + FRAME].tobytes(), RATE, stamp))
        if start > 4 * RATE:
            levels.append(pipeline.meter.meter.reading().level)
    raw = np.sqrt(np.mean(mic[4 * RATE :].astype(float) ** 2)) / 32768
    assert raw > 0.02
    assert max(levels) < raw / 5


def test_echo_cancellation_needs_a_speaker_that_reports_what_it_played() -> None:
    for device, said in ((None, "null"), ("file:/tmp/answer.wav", "a file")):
        raw = {
            "realtime": {"api_key": "sk-x"},
            "audio": {"output": {"device": device}, "processing": {"echo_cancellation": True}},
        }
        with pytest.raises(ConfigError) as caught:
            parse_config(raw, "config.yaml")
        assert "audio.processing.echo_cancellation" in str(caught.value)
        assert said in str(caught.value)
    with pytest.raises(ConfigError, match=r"audio\.processing\.noise_suppression"):
        bad = {"processing": {"noise_suppression": "max"}}
        parse_config({"realtime": {"api_key": "x"}, "audio": bad}, "c")
    with pytest.raises(ValueError, match="cannot report what it played"):
        processing_stages(ProcessingConfig(echo_cancellation=True), RATE, NullOutput())
    assert processing_stages(ProcessingConfig(), RATE, NullOutput()) == []


def test_the_alsa_speaker_feeds_the_cancellers_reference() -> None:
    from harkd.audio.alsa import AlsaOutput

    speaker = AlsaOutput("pulse")
    [stage] = processing_stages(ProcessingConfig(echo_cancellation=True), RATE, speaker)
    assert not stage.echo_free  # nothing learned yet: half duplex until it converges
    [reference] = speaker._played_sinks  # noqa: SLF001
    assert isinstance(reference, PlayedReference)
    [ns_only] = processing_stages(ProcessingConfig(noise_suppression="low"), RATE, NullOutput())
    assert ns_only.echo_free and ns_only.convergence is None


def test_noise_suppression_alone_leaves_the_wake_word_nothing_ungated_to_hear() -> None:
    # No echo cancellation, no residual gate: the detector hears the conditioned frame
    # itself (and the pipeline resamples it once, for the detector and the endpointer).
    [ns_only] = processing_stages(ProcessingConfig(noise_suppression="low"), RATE, NullOutput())
    speech = speech_pcm("hello there", rate=RATE)[: RATE // 50 * 2]
    assert ns_only.process(AudioFrame(speech, RATE, 1.0)) is not None
    assert ns_only.ungated is None
