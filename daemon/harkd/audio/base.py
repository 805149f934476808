"""The audio protocols the client talks to: a microphone and a speaker.

The ALSA edge and the WAV files implement these. Blocking device I/O stays inside
the implementations (one thread each); the client only sees frames arriving on the
event loop and a non-blocking `play`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

PROVIDER_RATE = 24_000
"""The one definition of 24 kHz PCM16: OpenAI Realtime's only rate, the default of the
session's traits, and what speakers are fed unless an adapter says otherwise."""

VAD_RATE = 16_000
"""The rate webrtcvad (and wake-word engines) work at."""


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """A chunk of captured PCM16 little-endian mono audio."""

    pcm: bytes
    sample_rate: int
    captured_at: float
    """`time.monotonic()` when the device read returned (latency bookkeeping)."""

    @property
    def duration_ms(self) -> float:
        """Length of the chunk in milliseconds."""
        return len(self.pcm) / 2 / self.sample_rate * 1000


@dataclass(frozen=True, slots=True)
class MeterReading:
    """Level and spectrum of recent audio (see `harkd.audio.meter`)."""

    level: float = 0.0
    frequency: tuple[float, ...] = ()
    time_domain: tuple[float, ...] = ()
    sample_rate: int = 0


class DeviceListener(Protocol):
    """How an audio edge reports a device that failed and came back.

    Called on the event loop (implementations marshal from their threads).
    """

    def device_failed(self, device: str, message: str) -> None:
        """The device could not be opened or stopped working; retrying."""

    def device_recovered(self, device: str) -> None:
        """The device works again."""


class AudioInput(Protocol):
    """A microphone delivering PCM16 mono frames at its own `sample_rate`."""

    sample_rate: int
    name: str

    async def start(self, listener: DeviceListener) -> None:
        """Open the device (or start retrying to) and begin capturing."""

    def frames(self) -> AsyncIterator[AudioFrame]:
        """Captured frames, in order, until `stop`."""

    async def stop(self) -> None:
        """Stop capturing and release the device."""

    def batch(self, periods: int) -> None:
        """A hint: hand frames over `periods` at a time from now on (1, the start: each
        as soon as it is captured). Frames keep their length, order and capture times;
        a batch only saves wake-ups, and costs up to `periods - 1` periods of latency.
        The client asks for it while only the wake word detector hears the audio; a
        source that cannot batch may go on delivering frames one by one."""


class AudioOutput(Protocol):
    """A speaker fed with the provider's PCM16 mono response audio."""

    sample_rate: int
    """The rate the device plays at."""
    source_rate: int
    """The rate of the audio `play` takes: the provider's output format."""
    name: str

    async def start(self, listener: DeviceListener) -> None:
        """Open the device (or start retrying to)."""

    async def stop(self) -> None:
        """Drop what is queued and release the device."""

    def play(self, item_id: str, pcm: bytes) -> None:
        """Queue PCM16 audio (at `source_rate`) of one assistant item; never blocks."""

    def stop_playback(self) -> dict[str, int]:
        """Silence now: drop everything queued in the buffer and the device.

        Returns the milliseconds of each item's audio that were really heard,
        measured at the moment of the drop.
        """

    def played_ms(self, item_id: str) -> int:
        """Milliseconds of an item's audio that have left the speaker so far."""

    @property
    def is_playing(self) -> bool:
        """True while queued audio is still to be heard."""

    def set_volume(self, volume: int) -> None:
        """Software gain, 0..100, applied to audio from now on."""

    def on_drained(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the event loop whenever queued audio has all been played."""

    def on_abandoned(self, callback: Callable[[dict[str, int]], None]) -> None:
        """Call `callback(played)` on the loop when audio was dropped for a lost device.

        That is: queued audio was dropped because the device could not play it in time;
        `played` is the milliseconds of each dropped item that were really heard (the
        shape of `stop_playback`'s result). Either `on_drained` or this ends what `play`
        queued: audio waiting for a lost device is played once the device is back, or
        abandoned after a few seconds. Outputs that cannot lose their device never call it.
        """

    def meter(self) -> MeterReading:
        """Level and spectrum of what is being played right now."""
