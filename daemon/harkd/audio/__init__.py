"""Audio edge: microphones and speakers from config (`audio.input`, `audio.output`).

`file:PATH.wav` selects a WAV file paced in real time, an output device of `null`
a virtual speaker nobody hears (still paced, see `harkd.audio.wav`), and any other
name an ALSA PCM (`harkd.audio.alsa`, imported only then).
"""

from __future__ import annotations

import logging
from pathlib import Path

from harkd.audio.base import PROVIDER_RATE, AudioInput, AudioOutput
from harkd.config import AudioInputConfig, AudioOutputConfig

log = logging.getLogger(__name__)

FILE_PREFIX = "file:"


def open_input(cfg: AudioInputConfig, *, batched: bool = False) -> AudioInput:
    """The microphone `cfg` names; a bad WAV file raises ValueError naming it.
    `batched`: it will be read in batches (`harkd.capture.reads_in_batches`), so an
    ALSA device gets a deeper capture buffer."""
    if cfg.device.startswith(FILE_PREFIX):
        from harkd.audio.wav import WavInput

        path = Path(cfg.device.removeprefix(FILE_PREFIX))
        return WavInput(path, period_ms=cfg.period_ms, loop=cfg.loop, channel=cfg.channel)
    from harkd.audio.alsa import DEEP_CAPTURE_PERIODS, PERIODS, AlsaInput

    return AlsaInput(
        cfg.device,
        rate=cfg.rate,
        period_ms=cfg.period_ms,
        channel=cfg.channel,
        buffer_periods=DEEP_CAPTURE_PERIODS if batched else PERIODS,
    )


def open_output(cfg: AudioOutputConfig, source_rate: int = PROVIDER_RATE) -> AudioOutput:
    """The speaker `cfg` names, fed at `source_rate` (the provider's output format);
    nothing is opened before `start`."""
    if cfg.device is None:
        from harkd.audio.wav import NullOutput

        return NullOutput(rate=cfg.rate, volume=cfg.volume, source_rate=source_rate)
    if cfg.device.startswith(FILE_PREFIX):
        from harkd.audio.wav import WavOutput

        path = Path(cfg.device.removeprefix(FILE_PREFIX))
        return WavOutput(path, rate=cfg.rate, volume=cfg.volume, source_rate=source_rate)
    from harkd.audio.alsa import AlsaOutput

    return AlsaOutput(cfg.device, rate=cfg.rate, volume=cfg.volume, source_rate=source_rate)


async def stop_devices(*devices: AudioInput | AudioOutput | None) -> None:
    """Stop each device; one that fails to stop is logged and the rest still stop."""
    for device in devices:
        if device is not None:
            try:
                await device.stop()
            except Exception:
                log.exception("stopping %s failed", device.name)


__all__ = ["AudioInput", "AudioOutput", "open_input", "open_output", "stop_devices"]
