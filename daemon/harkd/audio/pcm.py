"""Interleaving PCM16 channels without numpy, on the default path's every period.

The edges pick one channel of a multi-channel microphone and copy mono audio to
every channel of a multi-channel speaker. Strided memoryview and array slices do
that in C, so the default path needs no numpy (about 18 MB of resident memory).
Samples are native-endian here: every platform harkd runs on is little-endian,
as PCM16 on the wire is.
"""

from __future__ import annotations

from array import array


def pick_channel(data: bytes, channel: int, channels: int) -> bytes:
    """Channel `channel` of interleaved PCM16 with `channels` channels; a trailing
    partial frame is dropped."""
    if channels == 1:
        return data
    usable = len(data) - len(data) % (2 * channels)
    return memoryview(data)[:usable].cast("h")[channel::channels].tobytes()


def spread_channels(mono: bytes, channels: int) -> bytes:
    """Mono PCM16 copied to each of `channels` interleaved channels."""
    if channels == 1:
        return mono
    samples = array("h", mono[: len(mono) - len(mono) % 2])
    out = array("h", bytes(len(samples) * channels * 2))
    for channel in range(channels):
        out[channel::channels] = samples
    return out.tobytes()
