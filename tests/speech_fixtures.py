"""Synthetic audio for tests: real espeak-ng speech, silence, noise, hum and clicks.

Everything is PCM16 little-endian mono `bytes` at an explicit sample rate, so pieces
join with `+` and feed straight into the daemon's audio paths::

    from speech_fixtures import frames, len_ms, mix, noise, silence, speech_pcm

    pcm = silence(2000) + speech_pcm("turn on the kitchen lights") + silence(3000)
    pcm = mix(pcm, noise(len_ms(pcm), 0.005, kind="pink"))
    for frame in frames(pcm, 16000, 20): ...

Speech is synthesized once per (text, voice, rate) and process, in a temporary
directory removed at exit; it is trimmed of leading and trailing silence so that the
speech starts at sample 0 and ends at the last sample (tests can compute boundaries).
Levels are RMS in 0..1 of full scale (a full-scale sine has 0.707; -40 dBFS is 0.01).
Noise is seeded, hence the same on every run.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

NoiseKind = Literal["white", "pink", "hum"]

FULL_SCALE = 32768.0
_TRIM_LEVEL = 0.002
"""Absolute sample level (0..1) under which leading/trailing speech samples are cut."""


def speech_wav(text: str, rate: int = 16000, voice: str = "en-us") -> Path:
    """A WAV file (PCM16 mono at `rate`) of espeak-ng saying `text`, trimmed.

    Useful as a `file:PATH.wav` audio input. The file lives until the process exits.
    """
    return _speech_file(text, rate, voice)


def speech_pcm(
    text: str, rate: int = 16000, voice: str = "en-us", speed: int | None = None
) -> bytes:
    """espeak-ng saying `text` as PCM16 mono at `rate`, without leading/trailing silence.

    `speed` is in words per minute (espeak-ng's own default, 175, when None).
    """
    return read_wav(_speech_file(text, rate, voice, speed))[0]


@functools.cache
def _speech_file(text: str, rate: int, voice: str, speed: int | None = None) -> Path:
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (`make system` installs it)")
    directory = _cache_dir()
    stem = hashlib.sha256(f"{voice}\0{rate}\0{speed}\0{text}".encode()).hexdigest()[:16]
    raw, converted = directory / f"{stem}-raw.wav", directory / f"{stem}.wav"
    pace = [] if speed is None else ["-s", str(speed)]
    subprocess.run(["espeak-ng", "-v", voice, *pace, "-w", str(raw), text], check=True)
    # -D: no dither, so silence stays digital zero and runs are reproducible.
    subprocess.run(
        ["sox", "-D", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(converted)],
        check=True,
    )
    raw.unlink()
    pcm, _ = read_wav(converted)
    write_wav(converted, _trim(pcm), rate)
    return converted


@functools.cache
def _cache_dir() -> Path:
    """One directory per test session (process), removed at exit."""
    path = Path(tempfile.mkdtemp(prefix="harkd-speech-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _trim(pcm: bytes) -> bytes:
    samples = _samples(pcm)
    loud = np.flatnonzero(np.abs(samples) > _TRIM_LEVEL * FULL_SCALE)
    if loud.size == 0:
        return b""
    return samples[loud[0] : loud[-1] + 1].tobytes()


def silence(ms: float, rate: int = 16000) -> bytes:
    """Digital silence, `ms` long."""
    return bytes(2 * _count(ms, rate))


def noise(
    ms: float,
    level: float,
    rate: int = 16000,
    kind: NoiseKind = "white",
    seed: int = 0,
) -> bytes:
    """Steady noise with RMS `level` (0..1 of full scale).

    white: flat spectrum (hiss). pink: 1/f power (a fan, air handling).
    hum: 50 Hz mains with decaying harmonics up to 1 kHz (a transformer, a fridge).
    """
    n = _count(ms, rate)
    if n == 0:
        return b""
    rng = np.random.default_rng(seed)
    if kind == "white":
        signal = rng.standard_normal(n)
    elif kind == "pink":
        spectrum = np.fft.rfft(rng.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / rate)
        freqs[0] = freqs[1] if n > 1 else 1.0  # no infinite DC gain
        signal = np.fft.irfft(spectrum / np.sqrt(freqs), n)
    elif kind == "hum":
        t = np.arange(n) / rate
        signal = np.zeros(n)
        for harmonic in range(1, 21):
            phase = rng.uniform(0, 2 * np.pi)
            signal += np.sin(2 * np.pi * 50 * harmonic * t + phase) / harmonic**1.5
    else:
        raise ValueError(f"unknown noise kind {kind!r}")
    return _to_pcm(signal * (level / _rms(signal)))


def click(ms: int = 10, rate: int = 16000, level: float = 0.5, seed: int = 0) -> bytes:
    """A short broadband click (a tap on the table, a door latch): a decaying burst.

    `level` is the peak (0..1 of full scale).
    """
    n = max(1, _count(ms, rate))
    burst = np.random.default_rng(seed).uniform(-1, 1, n) * np.exp(-np.arange(n) / (n / 4))
    return _to_pcm(burst * (level / np.max(np.abs(burst))))


def mix(a: bytes, b: bytes) -> bytes:
    """Sample-wise sum of two signals at the same rate, clipped; the shorter is zero-padded."""
    x, y = _samples(a).astype(np.int32), _samples(b).astype(np.int32)
    if len(x) < len(y):
        x, y = y, x
    out = x.copy()
    out[: len(y)] += y
    return np.clip(out, -32768, 32767).astype("<i2").tobytes()


def scale(pcm: bytes, gain: float) -> bytes:
    """`pcm` multiplied by `gain`, clipped."""
    return _to_pcm(_samples(pcm).astype(np.float64) / FULL_SCALE * gain)


def frames(pcm: bytes, rate: int = 16000, frame_ms: int = 20) -> list[bytes]:
    """`pcm` cut into `frame_ms` frames; a trailing partial frame is dropped."""
    size = 2 * _count(frame_ms, rate)
    return [pcm[i : i + size] for i in range(0, len(pcm) - size + 1, size)]


def len_ms(pcm: bytes, rate: int = 16000) -> float:
    """Duration of `pcm` in milliseconds."""
    return len(pcm) / 2 / rate * 1000


def level(pcm: bytes) -> float:
    """RMS level of `pcm`, 0..1 of full scale (0 for empty input)."""
    samples = _samples(pcm)
    return _rms(samples.astype(np.float64)) / FULL_SCALE if samples.size else 0.0


def write_wav(path: str | Path, pcm: bytes, rate: int = 16000) -> None:
    """Write PCM16 mono `pcm` as a WAV file."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)


def read_wav(path: str | Path) -> tuple[bytes, int]:
    """PCM16 mono samples and rate of a WAV file (the first channel if several)."""
    with wave.open(str(path), "rb") as src:
        if src.getsampwidth() != 2:
            raise ValueError(f"{path}: expected 16-bit samples, got {8 * src.getsampwidth()}")
        data = src.readframes(src.getnframes())
        channels, rate = src.getnchannels(), src.getframerate()
    if channels > 1:
        data = _samples(data)[::channels].tobytes()
    return data, rate


def _count(ms: float, rate: int) -> int:
    return round(ms * rate / 1000)


def _samples(pcm: bytes) -> npt.NDArray[np.int16]:
    return np.frombuffer(pcm, dtype="<i2")


def _rms(signal: npt.NDArray[Any]) -> float:
    return float(np.sqrt(np.mean(np.square(signal))))


def _to_pcm(signal: npt.NDArray[Any]) -> bytes:
    """Floats in -1..1 of full scale to clipped PCM16."""
    return np.clip(np.round(signal * FULL_SCALE), -32768, 32767).astype("<i2").tobytes()
