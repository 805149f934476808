"""WAV files as a real-time microphone and speaker; the null speaker; the factories."""

from __future__ import annotations

import asyncio
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from harkd.audio import open_input, open_output
from harkd.audio.alsa import DEEP_CAPTURE_PERIODS, PERIODS, AlsaInput, AlsaOutput
from harkd.audio.wav import NullOutput, WavInput, WavOutput
from harkd.config import AudioInputConfig, AudioOutputConfig


class Listener:
    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def device_failed(self, device: str, message: str) -> None:
        self.events.append(("failed", device))

    def device_recovered(self, device: str) -> None:
        self.events.append(("recovered", device))


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> Path:
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(samples.astype("<i2").tobytes() if width == 2 else bytes(len(samples)))
    return path


def ramp(count: int) -> np.ndarray:
    return (np.arange(count) % 20000).astype("<i2")


async def test_wav_input_is_paced_and_ends_in_silence(tmp_path: Path) -> None:
    samples = ramp(16000 // 10)  # 100 ms at 16 kHz
    mic = WavInput(write_wav(tmp_path / "in.wav", samples, 16000), period_ms=20)
    assert mic.sample_rate == 16000
    await mic.start(Listener())
    frames = []
    started = time.monotonic()
    async for frame in mic.frames():
        frames.append(frame)
        if len(frames) == 10:
            break
    elapsed = time.monotonic() - started
    await mic.stop()
    assert 0.17 < elapsed < 0.4  # 10 frames of 20 ms, in real time
    assert all(len(f.pcm) == 640 and f.sample_rate == 16000 for f in frames)
    assert b"".join(f.pcm for f in frames[:5]) == samples.tobytes()
    assert all(f.pcm == bytes(640) for f in frames[5:])  # a quiet room after the end
    stamps = [f.captured_at for f in frames]
    assert stamps == sorted(stamps)


async def test_wav_input_batched_delivers_the_same_audio_in_bursts(tmp_path: Path) -> None:
    samples = ramp(16000 * 3 // 10)  # 300 ms: 15 frames
    mic = WavInput(write_wav(tmp_path / "in.wav", samples, 16000), period_ms=20)
    await mic.start(Listener())
    mic.batch(3)
    frames, arrivals = [], []
    started = time.monotonic()
    async for frame in mic.frames():
        frames.append(frame)
        arrivals.append(time.monotonic())
        if len(frames) == 15:
            break
    await mic.stop()
    assert b"".join(f.pcm for f in frames) == samples.tobytes()
    assert 0.27 < arrivals[-1] - started < 0.5  # still real time
    bursts = sum(1 for a, b in zip(arrivals, arrivals[1:], strict=False) if b - a > 0.01)
    assert bursts <= 6  # 5 hand-offs of 3 frames, not 15 of one
    stamps = [f.captured_at for f in frames]
    assert stamps == sorted(stamps) and stamps[-1] - stamps[0] == pytest.approx(0.28, abs=0.01)


async def test_wav_input_loops_and_picks_a_channel(tmp_path: Path) -> None:
    left, right = ramp(480), -ramp(480)
    path = write_wav(tmp_path / "st.wav", np.stack([left, right], axis=1), 24000)
    mic = WavInput(path, period_ms=10, loop=True, channel=1)
    await mic.start(Listener())
    frames = []
    async for frame in mic.frames():
        frames.append(frame.pcm)
        if len(frames) == 3:
            break
    await mic.stop()
    joined = np.frombuffer(b"".join(frames), dtype="<i2")
    assert np.array_equal(joined[:480], right)
    assert np.array_equal(joined[480:], right[:240])  # started over


async def test_wav_input_stop_ends_frames(tmp_path: Path) -> None:
    mic = WavInput(write_wav(tmp_path / "in.wav", ramp(1600), 16000))
    await mic.start(Listener())

    async def consume() -> int:
        return sum([1 async for _ in mic.frames()])

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    await mic.stop()
    assert 2 <= await asyncio.wait_for(task, 1) <= 8


def test_wav_input_rejects_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing.wav"):
        WavInput(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="16-bit"):
        WavInput(write_wav(tmp_path / "u8.wav", ramp(100), 8000, width=1))
    with pytest.raises(ValueError, match="channel 2"):
        WavInput(write_wav(tmp_path / "m.wav", ramp(100), 8000), channel=2)


def tone(ms: int, rate: int = 24000) -> bytes:
    t = np.arange(rate * ms // 1000) / rate
    return np.rint(9000 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()


async def test_wav_output_plays_in_real_time_and_drains(tmp_path: Path) -> None:
    path = tmp_path / "out" / "speaker.wav"
    speaker = WavOutput(path)
    drained: list[float] = []
    done = asyncio.Event()

    def on_drained() -> None:
        drained.append(time.monotonic())
        done.set()

    speaker.on_drained(on_drained)
    abandoned: list[dict[str, int]] = []
    speaker.on_abandoned(abandoned.append)  # a file never loses its device
    await speaker.start(Listener())
    started = time.monotonic()
    speaker.play("a", tone(150))
    speaker.play("a", tone(150))
    assert speaker.is_playing
    await asyncio.sleep(0.15)
    assert speaker.played_ms("a") == pytest.approx(150, abs=25)
    assert speaker.meter().level > 0.1
    await asyncio.wait_for(done.wait(), 2)
    assert 0.28 < drained[0] - started < 0.45
    assert not speaker.is_playing
    assert speaker.played_ms("a") == 300 and abandoned == []
    await speaker.stop()
    with wave.open(str(path), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        assert wav.readframes(wav.getnframes()) == tone(150) * 2


async def test_wav_output_barge_in_truncates_at_what_was_heard(tmp_path: Path) -> None:
    path = tmp_path / "speaker.wav"
    speaker = WavOutput(path, volume=50)
    drained: list[bool] = []
    speaker.on_drained(lambda: drained.append(True))
    await speaker.start(Listener())
    speaker.play("a", tone(500))
    await asyncio.sleep(0.2)
    played = speaker.stop_playback()
    assert played["a"] == pytest.approx(200, abs=30)
    assert not speaker.is_playing
    await asyncio.sleep(0.1)
    assert drained == []  # stop_playback answers for itself
    speaker.play("b", tone(40))  # usable right after the barge-in
    await asyncio.sleep(0.15)
    assert drained == [True]
    await speaker.stop()
    with wave.open(str(path), "rb") as wav:
        written_ms = wav.getnframes() / 24
        peak = np.abs(np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")).max()
    assert written_ms == pytest.approx(played["a"] + 40, abs=25)  # at most a period more
    assert peak == pytest.approx(9000 * 0.25, abs=2)  # volume 50 = -12 dB


async def test_null_output_is_a_paced_speaker() -> None:
    speaker = NullOutput()
    await speaker.start(Listener())
    speaker.play("a", tone(1000))
    await asyncio.sleep(0.1)
    assert speaker.played_ms("a") == pytest.approx(100, abs=25)
    assert speaker.stop_playback()["a"] == pytest.approx(100, abs=25)
    await speaker.stop()


async def test_null_output_drains_when_the_answer_would_have_ended() -> None:
    # 500 ms is not a whole number of the null speaker's periods: the end is still exact.
    speaker = NullOutput()
    drained = asyncio.Event()
    speaker.on_drained(drained.set)
    await speaker.start(Listener())
    began = time.monotonic()
    speaker.play("a", tone(500))
    await asyncio.sleep(0.45)
    assert speaker.is_playing and speaker.played_ms("a") == pytest.approx(450, abs=25)
    await asyncio.wait_for(drained.wait(), 1.0)
    assert time.monotonic() - began == pytest.approx(0.5, abs=0.05)
    assert not speaker.is_playing and speaker.played_ms("a") == 500
    await speaker.stop()


def test_factories_choose_the_edge(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "in.wav", ramp(100), 16000)
    mic = open_input(AudioInputConfig(device=f"file:{wav}", loop=True))
    assert isinstance(mic, WavInput) and mic.loop and mic.name == f"file:{wav}"
    alsa = open_input(AudioInputConfig(device="default"))
    assert isinstance(alsa, AlsaInput) and alsa.buffer_periods == PERIODS
    # Read in batches (waiting for a wake word): room for a batch and a late thread.
    deep = open_input(AudioInputConfig(device="default"), batched=True)
    assert isinstance(deep, AlsaInput) and deep.buffer_periods == DEEP_CAPTURE_PERIODS
    speaker = open_output(AudioOutputConfig(device=f"file:{tmp_path / 'o.wav'}", rate=16000))
    assert isinstance(speaker, WavOutput) and speaker.sample_rate == 16000
    assert isinstance(open_output(AudioOutputConfig(device=None)), NullOutput)
    assert isinstance(open_output(AudioOutputConfig(device="plughw:1")), AlsaOutput)
