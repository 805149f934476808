"""What the speaker really played, on the capture clock: the echo canceller's far end.

An echo canceller needs the audio that left the speaker, lined up with the microphone
frames that picked up its echo. The playback thread knows both halves of that: the
bytes the device accepted (after the software volume, so a volume change is in the
reference too) and how many frames were still queued in front of them, hence when
they will be heard. It hands each write to a `PlayedReference`:

    starts_at = time of the write + frames queued in front of it / device rate

and the reference keeps the audio on one timeline of `time.monotonic()` seconds at
the capture rate. The capture side reads the span each microphone frame covers; time
when nothing played reads as zeros (silence between answers needs no special case).
Audio that was written but never heard (a barge-in's drop, a device that vanished) is
erased with `dropped`, so the canceller is never told about echo that cannot come.

Consecutive writes of one stream are placed end to end, not at their own measured
times, so the scheduling jitter of the playback thread does not tear the reference;
a write that lands far from where the previous one ended (the stream restarted after
an idle pause, or the clocks drifted apart) starts a new stream at its own time.

Thread-safe: the playback thread writes, the capture pipeline's worker reads.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from harkd.audio.resample import StreamResampler

HISTORY_S = 4.0
"""How much played audio is kept: far more than any speaker-to-microphone delay."""
JOIN_TOLERANCE_S = 0.06
"""A write starting this close to where the previous one ended continues its stream.

Through PulseAudio the device's reported queue moves in a 20-30 ms sawtooth; a
tighter tolerance tears the reference mid-answer (and AEC3 lets echo through while it
finds the delay again)."""


class PlayedSink(Protocol):
    """Where a speaker reports the audio it really played (see `PlayedReference`)."""

    def played(self, pcm: bytes, rate: int, starts_at: float) -> None:
        """PCM16 mono `pcm` at `rate`, post-gain, is heard from `starts_at` (monotonic)."""

    def dropped(self, at: float) -> None:
        """Nothing written for times after `at` will be heard (a drop, a lost device)."""


@runtime_checkable
class ReportsPlayed(Protocol):
    """An output that can report what it played and when (an ALSA device can; a WAV
    file or the null output cannot: they have no speaker in the room)."""

    def report_played(self, sink: PlayedSink) -> None:
        """Tell `sink` (too) about every write the device accepts from now on."""


class PlayedReference:
    """A timeline of played audio at `rate`, written by a speaker, read by a canceller."""

    def __init__(self, rate: int, history_s: float = HISTORY_S) -> None:
        self.rate = rate  # immutable
        self._capacity = int(history_s * rate)  # immutable
        self._lock = threading.Lock()
        # Everything below is guarded by _lock. Sample index i (time i / rate) lives at
        # _ring[i % capacity] while end - capacity <= i < end; all else reads as zeros.
        self._ring = np.zeros(self._capacity, dtype=np.int16)
        self._end = 0
        self._cursor: int | None = None  # where the current stream's next sample goes
        self._resampler: StreamResampler | None = None
        self._stream_start = -float("inf")

    @property
    def stream_start(self) -> float:
        """When the latest stream (an answer after a pause) started to play."""
        with self._lock:
            return self._stream_start

    def played(self, pcm: bytes, rate: int, starts_at: float) -> None:
        """Record a write the device accepted (called by the playback thread)."""
        with self._lock:
            start = round(starts_at * self.rate)
            joined = (
                self._cursor is not None
                and abs(start - self._cursor) <= JOIN_TOLERANCE_S * self.rate
                and self._resampler is not None
                and self._resampler.in_rate == rate
            )
            if not joined:
                self._resampler = StreamResampler(rate, self.rate)
                self._cursor = start
                self._stream_start = starts_at
            assert self._resampler is not None and self._cursor is not None
            samples = np.frombuffer(self._resampler.process(pcm), dtype="<i2")
            self._put(self._cursor, samples)
            self._cursor += len(samples)

    def written_until(self) -> int | None:
        """Sample index where the current stream's next write goes (what lies beyond
        is not written yet); None after a drop, or before anything was played."""
        with self._lock:
            return self._cursor

    def dropped(self, at: float) -> None:
        """Erase what was written for times after `at`; the next write starts afresh."""
        with self._lock:
            cut = round(at * self.rate)
            if cut < self._end:
                self._zero(cut, self._end)
                self._end = max(cut, self._end - self._capacity)
            self._cursor = None
            self._resampler = None

    def read(self, start: int, count: int) -> npt.NDArray[np.int16]:
        """`count` samples from sample index `start` (time `start / rate`); zeros where
        nothing was played or it is too long ago."""
        out = np.zeros(count, dtype=np.int16)
        with self._lock:
            first = max(start, self._end - self._capacity)
            last = min(start + count, self._end)
            if first < last:
                out[first - start : last - start] = self._slice(first, last)
        return out

    def _put(self, start: int, samples: npt.NDArray[np.int16]) -> None:
        if len(samples) == 0:
            return
        if len(samples) > self._capacity:
            start += len(samples) - self._capacity
            samples = samples[-self._capacity :]
        end = start + len(samples)
        if start > self._end:
            self._zero(max(self._end, start - self._capacity), start)  # the pause between
        if start < self._end - self._capacity:
            start = self._end - self._capacity  # older than the history: nothing to keep
            samples = samples[-(end - start) :] if end > start else samples[:0]
        self._assign(start, samples)
        self._end = max(self._end, end)

    def _positions(self, start: int, end: int) -> tuple[slice, slice | None]:
        """Ring slices for indices [start, end) (end - start <= capacity)."""
        head = start % self._capacity
        length = end - start
        if head + length <= self._capacity:
            return slice(head, head + length), None
        return slice(head, self._capacity), slice(0, head + length - self._capacity)

    def _assign(self, start: int, samples: npt.NDArray[np.int16]) -> None:
        first, second = self._positions(start, start + len(samples))
        split = first.stop - first.start
        self._ring[first] = samples[:split]
        if second is not None:
            self._ring[second] = samples[split:]

    def _zero(self, start: int, end: int) -> None:
        start = max(start, end - self._capacity)
        if start < end:
            first, second = self._positions(start, end)
            self._ring[first] = 0
            if second is not None:
                self._ring[second] = 0

    def _slice(self, start: int, end: int) -> npt.NDArray[np.int16]:
        first, second = self._positions(start, end)
        if second is None:
            return self._ring[first].copy()
        return np.concatenate((self._ring[first], self._ring[second]))
