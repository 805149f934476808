"""Streaming PCM16 mono resampling that keeps its filter state across chunks.

Audio arrives in small chunks (20 ms capture periods, provider deltas). Resampling
each chunk on its own restarts the filter at every join and clicks; `StreamResampler`
wraps one `soxr.ResampleStream` per stream so that chunked output equals one-shot
output. soxr holds back a little audio (its filter's look-ahead), which `flush`
returns at the end of a stream. That look-ahead is latency on a live path, hence
the default "LQ": 1-8 ms of look-ahead against 20-33 ms for "HQ", still -57 dB of
aliasing and 16-bit precision (ample for speech; see benchmarks/bench_resample.py).
"QQ" (cubic) has no look-ahead but no anti-alias filter: not for downsampling.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import soxr

Quality = Literal["QQ", "LQ", "MQ", "HQ", "VHQ"]


class StreamResampler:
    """Resample a stream of PCM16 little-endian mono chunks from `in_rate` to `out_rate`.

    Not thread-safe: one stream, one owner. Equal rates pass audio through untouched.
    """

    def __init__(self, in_rate: int, out_rate: int, quality: Quality = "LQ") -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self.quality: Quality = quality
        self._stream: soxr.ResampleStream | None = None
        # An odd trailing byte waits for its partner (chunks need not be sample aligned).
        self._odd = b""

    @property
    def passthrough(self) -> bool:
        """True when input and output rates are equal (no resampling at all)."""
        return self.in_rate == self.out_rate

    def process(self, pcm: bytes) -> bytes:
        """Resample one chunk; the output may lag the input by the filter's look-ahead."""
        if self._odd:
            pcm = self._odd + pcm
            self._odd = b""
        if len(pcm) % 2:
            self._odd = pcm[-1:]
            pcm = pcm[:-1]
        if self.passthrough or not pcm:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2")
        out: np.ndarray = self._resampler().resample_chunk(samples)
        return out.astype("<i2", copy=False).tobytes()

    def flush(self) -> bytes:
        """End the stream: return the audio still held by the filter, then start afresh."""
        self._odd = b""
        if self._stream is None:
            return b""
        tail: np.ndarray = self._stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True)
        self._stream = None
        return tail.astype("<i2", copy=False).tobytes()

    def reset(self) -> None:
        """Forget the stream (held audio included), e.g. after a barge-in."""
        self._odd = b""
        self._stream = None

    def _resampler(self) -> soxr.ResampleStream:
        if self._stream is None:
            self._stream = soxr.ResampleStream(
                self.in_rate, self.out_rate, 1, dtype="int16", quality=self.quality
            )
        return self._stream
