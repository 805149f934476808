"""StreamResampler: stateful across chunks, so joins do not click."""

from __future__ import annotations

import numpy as np
import pytest

from harkd.audio import resample
from harkd.audio.resample import StreamResampler


def sine(rate: int, seconds: float, freq: float = 440.0, amplitude: float = 12000.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.rint(amplitude * np.sin(2 * np.pi * freq * t)).astype("<i2")


def chunked(resampler: StreamResampler, pcm: bytes, chunk_bytes: int) -> bytes:
    out = [resampler.process(pcm[i : i + chunk_bytes]) for i in range(0, len(pcm), chunk_bytes)]
    return b"".join(out) + resampler.flush()


def test_equal_rates_pass_through_untouched() -> None:
    pcm = sine(24000, 0.1).tobytes()
    resampler = StreamResampler(24000, 24000)
    assert resampler.passthrough
    assert resampler.process(pcm) == pcm
    assert resampler.flush() == b""


@pytest.mark.parametrize(
    ("in_rate", "out_rate"), [(24000, 48000), (24000, 44100), (24000, 16000), (16000, 24000)]
)
def test_chunked_output_equals_one_shot(in_rate: int, out_rate: int) -> None:
    pcm = sine(in_rate, 1.0).tobytes()
    one_shot = StreamResampler(in_rate, out_rate)
    whole = np.frombuffer(one_shot.process(pcm) + one_shot.flush(), dtype="<i2")
    # 20 ms chunks, and an odd size that splits samples across chunks.
    for chunk_bytes in (in_rate // 50 * 2, 333):
        parts = np.frombuffer(
            chunked(StreamResampler(in_rate, out_rate), pcm, chunk_bytes), dtype="<i2"
        )
        assert len(parts) == len(whole)
        assert np.max(np.abs(parts.astype(int) - whole.astype(int))) <= 2  # LSBs of rounding
    assert abs(len(whole) - out_rate) <= 2


@pytest.mark.parametrize(("in_rate", "out_rate"), [(24000, 48000), (24000, 44100), (24000, 16000)])
def test_no_discontinuity_at_chunk_joins(in_rate: int, out_rate: int) -> None:
    amplitude = 12000.0
    pcm = sine(in_rate, 0.5, amplitude=amplitude).tobytes()
    out = np.frombuffer(
        chunked(StreamResampler(in_rate, out_rate), pcm, in_rate // 50 * 2), dtype="<i2"
    ).astype(float)
    ideal = amplitude * np.sin(2 * np.pi * 440.0 * np.arange(len(out)) / out_rate)
    middle = slice(out_rate // 50, len(out) - out_rate // 50)  # skip the filter's start and end
    error = np.abs(out[middle] - ideal[middle])
    # A click at a join would be an error of the order of the amplitude.
    assert error.max() < 0.005 * amplitude


def test_reset_forgets_held_audio() -> None:
    resampler = StreamResampler(24000, 48000)
    resampler.process(sine(24000, 0.02).tobytes())
    resampler.reset()
    assert resampler.flush() == b""
    fresh = StreamResampler(24000, 48000)
    pcm = sine(24000, 0.1).tobytes()
    assert resampler.process(pcm) + resampler.flush() == fresh.process(pcm) + fresh.flush()


def test_rejects_nonsense_rates() -> None:
    with pytest.raises(ValueError, match="positive"):
        StreamResampler(0, 16000)


def test_the_system_libsoxr_serves_when_python_soxr_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Debian's python3-soxr links libsoxr.so.0 instead of carrying it: that one is used."""
    import ctypes

    try:
        ctypes.CDLL("libsoxr.so.0")
    except OSError:
        pytest.skip("no system libsoxr.so.0 here")
    monkeypatch.setattr(resample, "_candidates", lambda: ["libsoxr.so.0"])
    resample._soxr.cache_clear()
    try:
        pcm = sine(16000, 0.2).tobytes()
        system = StreamResampler(16000, 24000)
        out = system.process(pcm) + system.flush()
    finally:
        resample._soxr.cache_clear()
    bundled = StreamResampler(16000, 24000)
    assert out == bundled.process(pcm) + bundled.flush()
