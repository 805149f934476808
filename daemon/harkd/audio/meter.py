"""Level meter and spectrum of an audio stream, for `AudioVisualization` and MQTT levels.

`feed` is called from an audio thread for every chunk and only keeps a reference to
it: nothing is computed until someone reads. `reading` computes the RMS level of the
latest chunk and, at most `max_rate_hz` times a second, the spectrum (a Hann-windowed
rfft of the last 1024 samples). A daemon nobody watches pays nothing for its meters
(measured: they were ~40% of harkd's streaming CPU when computed on every chunk),
and does not even import numpy (~18 MB of resident memory) until the first read.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from typing import TYPE_CHECKING

from harkd.audio.base import MeterReading
from harkd.messages import AudioVisualization

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

WINDOW = 1024
"""Samples analysed for the spectrum and the time-domain view."""
TIME_POINTS = 64
"""Points of the decimated time-domain view."""
FLOOR_DB = -80.0
"""Spectrum magnitudes at or below this (dB of a full-scale sine) show as 0."""
HOLD_S = 0.1
"""Without new audio, a reading is held this long, then decays."""
DECAY_TAU_S = 0.15
"""Time constant of the decay toward 0 once the hold is over."""
_FULL_SCALE = 32768.0
_PENDING_CHUNKS = 64
"""Chunks kept until a read: over one WINDOW for any chunk of 16 samples or more."""


class LevelMeter:
    """RMS level, log-scaled band magnitudes and a short waveform of recent audio.

    Feed it from one thread (an audio thread); read it from one other (the event loop).
    """

    def __init__(self, sample_rate: int, bins: int = 32, max_rate_hz: float = 20.0) -> None:
        if bins < 1:
            raise ValueError(f"bins must be at least 1, got {bins}")
        self.sample_rate = sample_rate
        self.bins = bins
        self._min_interval_s = 1.0 / max_rate_hz if max_rate_hz > 0 else 0.0
        self._analysis: _Analysis | None = None  # made on the first read
        self._last_spectrum_at = -math.inf
        self._silent_frequency: tuple[float, ...] = (0.0,) * bins
        self._silent_time: tuple[float, ...] = (0.0,) * TIME_POINTS
        self._frequency = self._silent_frequency
        self._time_domain = self._silent_time
        # deque appends and pops are atomic: the audio thread and the loop share it
        # without a lock. A full deque drops its oldest chunk, which keeps `feed` O(1).
        self._pending: deque[bytes] = deque(maxlen=_PENDING_CHUNKS)
        self._reading = MeterReading(0.0, self._silent_frequency, self._silent_time, sample_rate)
        self._fed_at = -math.inf

    def feed(self, pcm: bytes, now: float | None = None) -> None:
        """Account for a chunk of PCM16 mono audio that is being captured or played now."""
        if len(pcm) >= 2:
            self._pending.append(pcm)
            self._fed_at = time.monotonic() if now is None else now

    def reading(self, now: float | None = None) -> MeterReading:
        """The latest reading, decayed toward silence if no audio arrived lately."""
        if now is None:
            now = time.monotonic()
        fed_at = self._fed_at
        chunks: list[bytes] = []
        with contextlib.suppress(IndexError):  # emptied by another reader meanwhile
            while self._pending:
                chunks.append(self._pending.popleft())
        if chunks:
            self._analyse(chunks, fed_at)
        reading = self._reading
        idle_s = now - fed_at - HOLD_S
        if idle_s <= 0:
            return reading
        factor = math.exp(-idle_s / DECAY_TAU_S)
        if factor < 1e-3:
            return MeterReading(0.0, self._silent_frequency, self._silent_time, self.sample_rate)
        return MeterReading(
            level=reading.level * factor,
            frequency=tuple(f * factor for f in reading.frequency),
            time_domain=tuple(t * factor for t in reading.time_domain),
            sample_rate=self.sample_rate,
        )

    def _analyse(self, chunks: list[bytes], fed_at: float) -> None:
        """Level of the latest chunk; spectrum and waveform when the rate allows."""
        if self._analysis is None:
            self._analysis = _Analysis(self.sample_rate, self.bins)
        analysis = self._analysis
        recent = b"".join(c[: len(c) - len(c) % 2] for c in chunks)[-2 * WINDOW :]
        analysis.push(recent)
        last = chunks[-1]
        level = analysis.level(last[: len(last) - len(last) % 2])
        if fed_at - self._last_spectrum_at >= self._min_interval_s:
            self._last_spectrum_at = fed_at
            self._frequency = analysis.spectrum()
            self._time_domain = analysis.waveform()
        self._reading = MeterReading(
            level=level,
            frequency=self._frequency,
            time_domain=self._time_domain,
            sample_rate=self.sample_rate,
        )


class _Analysis:
    """The numpy side of a meter: the last WINDOW samples and what is shown of them."""

    def __init__(self, sample_rate: int, bins: int) -> None:
        import numpy as np

        self._np = np
        self._ring: npt.NDArray[np.float32] = np.zeros(WINDOW, dtype=np.float32)
        self._window = np.hanning(WINDOW).astype(np.float32)
        # A full-scale sine peaks at sum(window)/2 in the rfft: that is 0 dB.
        self._reference = float(self._window.sum()) / 2.0
        self._edges = _band_edges(sample_rate, bins, WINDOW)

    def push(self, pcm: bytes) -> None:
        np = self._np
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / _FULL_SCALE
        if len(samples) >= WINDOW:
            self._ring[:] = samples[-WINDOW:]
        else:
            self._ring = np.roll(self._ring, -len(samples))
            self._ring[-len(samples) :] = samples

    def level(self, pcm: bytes) -> float:
        """RMS of `pcm`, 1.0 at full scale."""
        np = self._np
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / _FULL_SCALE
        return min(1.0, float(np.sqrt(np.mean(samples * samples))))

    def spectrum(self) -> tuple[float, ...]:
        np = self._np
        magnitude = np.abs(np.fft.rfft(self._ring * self._window)) / self._reference
        db = 20.0 * np.log10(np.maximum(magnitude, 1e-12))
        scaled = np.clip((db - FLOOR_DB) / -FLOOR_DB, 0.0, 1.0)
        # Each band shows its loudest component, as an analyser display does.
        return tuple(float(scaled[lo:hi].max()) for lo, hi in self._edges)

    def waveform(self) -> tuple[float, ...]:
        step = WINDOW // TIME_POINTS
        return tuple(float(x) for x in self._ring[step - 1 :: step])


def _band_edges(sample_rate: int, bins: int, window: int) -> list[tuple[int, int]]:
    """rfft index ranges of `bins` log-spaced bands from 60 Hz to Nyquist."""
    import numpy as np

    count = window // 2 + 1
    hz_per_index = sample_rate / window
    low = max(1.0, 60.0 / hz_per_index)
    edges = np.geomspace(low, count - 1, bins + 1)
    bands: list[tuple[int, int]] = []
    for i in range(bins):
        lo = int(edges[i])
        hi = max(lo + 1, int(math.ceil(edges[i + 1])))
        bands.append((lo, min(hi, count)))
    return bands


def visualization(mic: MeterReading, speaker: MeterReading) -> AudioVisualization:
    """The seed's `AudioVisualization` from a microphone and a speaker reading."""
    return AudioVisualization(
        input_level=mic.level,
        output_level=speaker.level,
        input_frequency_data=mic.frequency,
        output_frequency_data=speaker.frequency,
        input_time_domain_data=mic.time_domain,
        output_time_domain_data=speaker.time_domain,
        input_sample_rate=mic.sample_rate,
        output_sample_rate=speaker.sample_rate,
    )
