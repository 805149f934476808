"""LevelMeter: level, spectrum, waveform; rate-limited analysis; decay; thread safety."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from harkd.audio.meter import DECAY_TAU_S, HOLD_S, TIME_POINTS, LevelMeter


def tone(freq: float, amplitude: float = 32767.0, rate: int = 24000, ms: int = 50) -> bytes:
    t = np.arange(rate * ms // 1000) / rate
    return np.rint(amplitude * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def test_silence_reads_zero() -> None:
    meter = LevelMeter(24000)
    meter.feed(bytes(960), now=1.0)
    reading = meter.reading(now=1.0)
    assert reading.level == 0.0
    assert reading.sample_rate == 24000
    assert len(reading.frequency) == 32
    assert max(reading.frequency) == 0.0
    assert reading.time_domain == (0.0,) * TIME_POINTS


def test_full_scale_sine_level_and_spectrum_peak() -> None:
    meter = LevelMeter(24000, bins=32)
    meter.feed(tone(1000.0), now=1.0)
    reading = meter.reading(now=1.0)
    assert reading.level == pytest.approx(1 / np.sqrt(2), abs=0.01)
    assert all(0.0 <= f <= 1.0 for f in reading.frequency)
    peak = int(np.argmax(reading.frequency))
    assert reading.frequency[peak] > 0.95  # a full-scale sine is 0 dB
    # The peak band is where 1 kHz lives on the log axis, not at the edges.
    assert 8 < peak < 28
    assert len(reading.time_domain) == TIME_POINTS
    assert max(abs(x) for x in reading.time_domain) > 0.5


def test_quieter_tone_reads_lower() -> None:
    loud, quiet = LevelMeter(24000), LevelMeter(24000)
    loud.feed(tone(1000.0), now=0.0)
    quiet.feed(tone(1000.0, amplitude=327.0), now=0.0)
    assert quiet.reading(0.0).level == pytest.approx(loud.reading(0.0).level / 100, rel=0.05)
    # 40 dB down on an 80 dB display scale: about half height.
    assert max(quiet.reading(0.0).frequency) == pytest.approx(0.5, abs=0.05)


def test_spectrum_is_rate_limited_but_level_is_not() -> None:
    meter = LevelMeter(24000, max_rate_hz=20)
    meter.feed(tone(300.0), now=1.0)
    first = meter.reading(now=1.0)
    meter.feed(tone(5000.0, amplitude=3000.0), now=1.01)  # 10 ms later: no new FFT
    second = meter.reading(now=1.01)
    assert second.frequency == first.frequency
    assert second.level < first.level / 5
    meter.feed(tone(5000.0, amplitude=3000.0), now=1.06)  # 60 ms later: analysed again
    assert meter.reading(now=1.06).frequency != first.frequency


def test_decays_toward_zero_without_audio() -> None:
    meter = LevelMeter(24000)
    meter.feed(tone(1000.0), now=10.0)
    level = meter.reading(now=10.0).level
    assert meter.reading(now=10.0 + HOLD_S / 2).level == level
    later = meter.reading(now=10.0 + HOLD_S + DECAY_TAU_S)
    assert later.level == pytest.approx(level / np.e, rel=0.01)
    assert max(later.frequency) < 1.0
    gone = meter.reading(now=15.0)
    assert gone.level == 0.0
    assert gone.frequency == (0.0,) * 32
    assert gone.time_domain == (0.0,) * TIME_POINTS


def test_fed_from_a_thread_while_read() -> None:
    meter = LevelMeter(48000, bins=16)
    chunk = tone(440.0, rate=48000, ms=20)
    stop = threading.Event()

    def feeder() -> None:
        while not stop.is_set():
            meter.feed(chunk)

    thread = threading.Thread(target=feeder)
    thread.start()
    try:
        for _ in range(2000):
            reading = meter.reading()
            assert len(reading.frequency) == 16
            assert 0.0 <= reading.level <= 1.0
    finally:
        stop.set()
        thread.join(5)
    assert meter.reading().level > 0.5
