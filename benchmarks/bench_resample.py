"""Streaming resampling: soxr (StreamResampler) against numpy linear interpolation.

Standalone: `python benchmarks/bench_resample.py`. Feeds 1 s of audio in 20 ms chunks
(as capture and response deltas arrive) and prints, per conversion, the median time
per second of audio, the ratio to linear interpolation, the look-ahead latency, and
quality: the error against the ideal 440 Hz sine (a click at a join would show here)
and, when downsampling to 16 kHz, how much of a 10 kHz tone (above the new Nyquist) folds back as
an alias (linear interpolation does not filter it).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from harkd.audio.resample import StreamResampler

RUNS = 30
CHUNK_MS = 20


class LinearResampler:
    """The naive alternative: np.interp per chunk, keeping the phase across chunks."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.step = in_rate / out_rate
        self.seen = 0  # input samples before the current chunk
        self.made = 0  # output samples so far
        self.last = np.zeros(0)

    def process(self, pcm: bytes) -> bytes:
        x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
        buf = np.concatenate([self.last, x])
        base = self.seen - len(self.last)
        end = self.seen + len(x) - 1
        count = int(np.floor(end / self.step)) + 1 - self.made
        positions = (self.made + np.arange(max(0, count))) * self.step - base
        out = np.interp(positions, np.arange(len(buf)), buf)
        self.made += max(0, count)
        self.seen += len(x)
        self.last = x[-1:]
        return np.rint(out).astype("<i2").tobytes()

    def flush(self) -> bytes:
        return b""


def tone(rate: int, freq: float, seconds: float = 1.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return np.rint(12000 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def run(make: object, in_rate: int, out_rate: int, pcm: bytes) -> tuple[bytes, float]:
    chunk = in_rate * CHUNK_MS // 1000 * 2
    resampler = make(in_rate, out_rate)  # type: ignore[operator]
    started = time.perf_counter()
    out = b"".join(resampler.process(pcm[i : i + chunk]) for i in range(0, len(pcm), chunk))
    out += resampler.flush()
    return out, time.perf_counter() - started


def sine_error(out: bytes, out_rate: int) -> float:
    y = np.frombuffer(out, dtype="<i2").astype(float)
    ideal = 12000 * np.sin(2 * np.pi * 440 * np.arange(len(y)) / out_rate)
    middle = slice(out_rate // 20, len(y) - out_rate // 20)
    # Linear interpolation has no group delay; soxr is aligned too: compare directly.
    return float(np.max(np.abs(y[middle] - ideal[middle])) / 12000)


def alias_db(out: bytes) -> float:
    y = np.frombuffer(out, dtype="<i2").astype(float)
    rms = float(np.sqrt(np.mean(y**2))) or 1e-9
    return 20 * np.log10(rms / (12000 / np.sqrt(2)))


def main() -> None:
    makers = {
        "soxr HQ": lambda a, b: StreamResampler(a, b, "HQ"),
        "soxr LQ": lambda a, b: StreamResampler(a, b, "LQ"),
        "soxr QQ": lambda a, b: StreamResampler(a, b, "QQ"),
        "linear": LinearResampler,
    }
    for in_rate, out_rate in [(24000, 48000), (24000, 44100), (24000, 16000), (16000, 24000)]:
        pcm = tone(in_rate, 440)
        print(f"\n{in_rate} -> {out_rate} Hz, 1 s in {CHUNK_MS} ms chunks, median of {RUNS}")
        baseline = None
        for name, make in makers.items():
            times = [run(make, in_rate, out_rate, pcm)[1] for _ in range(RUNS)]
            median_ms = statistics.median(times) * 1000
            baseline = baseline if name != "linear" else median_ms
            out, _ = run(make, in_rate, out_rate, pcm)
            error = sine_error(out, out_rate)
            line = f"  {name:8s} {median_ms:7.3f} ms/s of audio  max error {error:7.4f}"
            if out_rate < in_rate:
                aliased, _ = run(make, in_rate, out_rate, tone(in_rate, 10000))
                line += f"  10 kHz alias {alias_db(aliased):6.1f} dB"
            if name.startswith("soxr"):
                probe = make(in_rate, out_rate)
                chunk = in_rate * CHUNK_MS // 1000 * 2
                produced = sum(
                    len(probe.process(pcm[i : i + chunk])) for i in range(0, 20 * chunk, chunk)
                )
                lag_ms = (20 * CHUNK_MS) - produced / 2 / out_rate * 1000
                line += f"  look-ahead {lag_ms:5.1f} ms"
            print(line)
        soxr_hq = statistics.median(
            run(makers["soxr HQ"], in_rate, out_rate, pcm)[1] for _ in range(RUNS)
        )
        assert baseline is not None
        print(f"  ratio soxr HQ / linear time: {soxr_hq * 1000 / baseline:.2f}")


if __name__ == "__main__":
    main()
