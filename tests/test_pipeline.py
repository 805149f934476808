"""The capture pipeline's stages, one at a time and together, with plain arrays."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import numpy as np
import pytest

from harkd.adapters.base import AudioFormat
from harkd.adapters.openai import openai_realtime
from harkd.audio.base import AudioFrame, DeviceListener
from harkd.audio.pipeline import (
    Endpoint,
    Gate,
    Meter,
    Resample,
    Stage,
    capture_pipeline,
)
from harkd.audio.vad import Endpointer, TurnOpened
from harkd.audio.wakeword import WakeDetection
from harkd.audio.wav import NullOutput
from harkd.capture import ASLEEP_BATCH, Capture
from harkd.client import RealtimeClient
from harkd.config import VadConfig
from harkd.session import Session
from harkd.tokens import static_token


def tone(rate: int, ms: int, level: float = 0.3, hz: float = 440.0) -> AudioFrame:
    t = np.arange(rate * ms // 1000) / rate
    pcm = (np.sin(2 * np.pi * hz * t) * level * 32767).astype("<i2").tobytes()
    return AudioFrame(pcm, rate, time.monotonic())


def silence(rate: int, ms: int) -> AudioFrame:
    return AudioFrame(bytes(rate * ms // 1000 * 2), rate, 0.0)


def test_meter_measures_and_passes_the_frame_on() -> None:
    meter = Meter(16_000)
    frame = tone(16_000, 20, level=0.5)
    assert meter.process(frame) is frame
    assert 0.3 < meter.meter.reading().level < 0.4  # RMS of a 0.5 sine


def test_gate_holds_frames_back_while_shut() -> None:
    shut = [False]
    gate = Gate(lambda: shut[0])
    frame = tone(16_000, 20)
    assert gate.process(frame) is frame
    shut[0] = True
    assert gate.process(frame) is None and gate.shut


def test_resample_carries_the_new_rate_and_passes_through_at_the_same_rate() -> None:
    up = Resample(16_000, 24_000)
    out = [up.process(tone(16_000, 20)) for _ in range(10)]
    assert all(frame.sample_rate == 24_000 for frame in out)
    assert (
        abs(sum(len(f.pcm) for f in out) - 24_000 * 2 * 200 // 1000) <= 2 * 320
    )  # the streaming filter holds back a few ms
    same = Resample(24_000, 24_000)
    frame = tone(24_000, 20)
    assert same.process(frame) is frame


def test_endpoint_regroups_any_period_into_whole_vad_frames() -> None:
    endpoint = Endpoint(Endpointer(VadConfig()))
    # 30 ms periods: 1.5 VAD frames each; nothing is lost or split wrongly.
    for _ in range(20):
        endpoint.process(silence(16_000, 30), b"p" * 10)
    assert len(endpoint._pending) < endpoint._frame_bytes


def test_server_mode_streams_the_gated_frame_at_the_provider_rate() -> None:
    shut = [False]
    pipeline = capture_pipeline(16_000, 24_000, is_shut=lambda: shut[0])
    sent = b"".join(out for _ in range(50) for out in pipeline.push(tone(16_000, 20)))
    # One second at 24 kHz; the streaming filter holds back a few ms.
    assert abs(len(sent) - 24_000 * 2) <= 2 * 240
    shut[0] = True
    assert pipeline.push(tone(16_000, 20)) == []


def test_manual_mode_opens_a_turn_on_speech() -> None:
    endpoint = Endpoint(Endpointer(VadConfig(start_ms=60)))
    pipeline = capture_pipeline(16_000, 24_000, is_shut=lambda: False, endpoint=endpoint)
    outputs = [o for _ in range(15) for o in pipeline.push(silence(16_000, 20))]
    assert outputs == []  # silence: nothing leaves
    voice = [o for _ in range(30) for o in pipeline.push(tone(16_000, 20, hz=300))]
    opened = [o for o in voice if isinstance(o, TurnOpened)]
    assert len(opened) == 1 and opened[0].preroll  # with its preroll, at 24 kHz


class ThreadRecorder:
    """A heavy conditioning stage that notes which thread it ran on."""

    heavy = True

    def __init__(self) -> None:
        self.threads: set[int] = set()

    def process(self, frame: AudioFrame) -> AudioFrame:
        self.threads.add(threading.get_ident())
        return frame


class Frames:
    """`count` frames of silence; `then[n]` runs once frame n (from 1) was handled."""

    sample_rate = 16_000
    name = "frames"

    def __init__(self, count: int, then: dict[int, Callable[[], None]] | None = None) -> None:
        self._count = count
        self._then = then or {}
        self._delivered = 0
        self.batches: list[tuple[int, int]] = []
        """(frames delivered, periods) of each `batch` call."""

    async def start(self, listener: DeviceListener) -> None:
        pass

    async def frames(self) -> AsyncIterator[AudioFrame]:
        for index in range(1, self._count + 1):
            if index - 1 in self._then:
                self._then[index - 1]()
            self._delivered = index
            yield silence(16_000, 20)
            await asyncio.sleep(0)

    async def stop(self) -> None:
        pass

    def batch(self, periods: int) -> None:
        self.batches.append((self._delivered, periods))


class WordAt:
    """A wake word detector that hears its word in frame `at` (from 1)."""

    heavy = False

    def __init__(self, at: int) -> None:
        self._at = at
        self._seen = 0
        self._found: list[WakeDetection] = []

    def process(self, frame: AudioFrame) -> AudioFrame:
        self._seen += 1
        if self._seen == self._at:
            self._found.append(WakeDetection("okay_nabu", 0.99, 0.1, frame.captured_at))
        return frame

    def take(self) -> list[WakeDetection]:
        found, self._found = self._found, []
        return found


async def test_heavy_stages_run_off_the_event_loop() -> None:
    heavy = ThreadRecorder()
    session = Session("manual")
    capture = Capture(
        session,
        lambda effects: None,
        lambda: None,
        provider_rate=24_000,
        vad=VadConfig(),
        conditioning=(heavy,),
    )
    await capture.run(Frames(5))
    assert heavy.threads and threading.get_ident() not in heavy.threads


def wake_capture(*conditioning: Stage) -> Capture:
    """A local-VAD capture whose wake word is heard in frame 10."""
    return Capture(
        Session("manual"),
        lambda effects: None,
        lambda: None,
        provider_rate=24_000,
        vad=VadConfig(),
        conditioning=conditioning,
        wake=WordAt(10),
    )


async def test_a_sleeping_ear_takes_frames_in_batches_and_one_by_one_once_woken() -> None:
    # Asleep only the wake word detector hears the audio: the microphone may hand it
    # over a few periods at a time. From the wake word on, frames come one by one.
    capture = wake_capture()
    capture.on_wake = lambda detection: capture.listen(5.0)
    source = Frames(30, then={20: capture.forget_held})  # another device answers
    await capture.run(source)
    # Back asleep (after frame 20), batching resumes with the next frame.
    assert source.batches == [(1, ASLEEP_BATCH), (10, 1), (21, ASLEEP_BATCH)]


async def test_without_a_wake_word_frames_are_never_batched() -> None:
    capture = Capture(Session("manual"), lambda e: None, lambda: None, provider_rate=24_000)
    source = Frames(10)
    await capture.run(source)
    assert source.batches == []


class Canceller:
    """An echo canceller that has converged and changes nothing."""

    heavy = False
    echo_free = True
    ungated = None

    def process(self, frame: AudioFrame) -> AudioFrame:
        return frame


class Heard:
    """A wake word detector that keeps what it heard."""

    heavy = False

    def __init__(self) -> None:
        self.frames: list[AudioFrame] = []

    def process(self, frame: AudioFrame) -> AudioFrame:
        self.frames.append(frame)
        return frame

    def take(self) -> list[WakeDetection]:
        return []


class GatingCanceller:
    """An echo canceller whose residual-echo gate holds everything back."""

    heavy = False
    echo_free = True

    def __init__(self) -> None:
        self.ungated: AudioFrame | None = None

    def process(self, frame: AudioFrame) -> AudioFrame:
        self.ungated = frame
        return silence(frame.sample_rate, 20)


def test_the_wake_word_detector_hears_the_canceller_before_its_gate() -> None:
    heard = Heard()
    pipeline = capture_pipeline(
        48_000, 24_000, is_shut=lambda: False, conditioning=[GatingCanceller()], wake=heard
    )
    sent = b"".join(
        o for _ in range(10) for o in pipeline.push(tone(48_000, 20)) if isinstance(o, bytes)
    )
    # The provider gets what the gate let through (nothing); the detector, at 16 kHz,
    # the voice the gate held back.
    assert sent and not any(sent)
    assert all(frame.sample_rate == 16_000 for frame in heard.frames)
    samples = np.frombuffer(b"".join(frame.pcm for frame in heard.frames[2:]), dtype="<i2")
    assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 0.2 * 32767 / np.sqrt(2)


async def test_with_echo_cancellation_a_sleeping_ear_still_takes_frames_one_by_one() -> None:
    # The canceller's timing was tuned on frames read one by one.
    capture = wake_capture(Canceller())
    source = Frames(20)
    await capture.run(source)
    assert source.batches == []


def test_a_speaker_fed_at_another_rate_than_the_provider_speaks_is_refused() -> None:
    adapter = openai_realtime()
    RealtimeClient(get_token=static_token("k"), adapter=adapter, audio_output=NullOutput())
    adapter.traits = replace(adapter.traits, output_format=AudioFormat(16_000))
    with pytest.raises(ValueError, match="takes 24000 Hz audio; the provider speaks at 16000 Hz"):
        RealtimeClient(get_token=static_token("k"), adapter=adapter, audio_output=NullOutput())
    # Fed at the provider's rate, it plays (and resamples to its own rate itself).
    RealtimeClient(
        get_token=static_token("k"), adapter=adapter, audio_output=NullOutput(source_rate=16_000)
    )
