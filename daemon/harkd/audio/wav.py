"""WAV files as microphone and speaker, paced in real time (`file:PATH.wav` devices).

`WavInput` behaves like a microphone that hears the file: frames of `period_ms` at
the file's own rate arrive on a monotonic schedule (no drift however long it runs).
At the end of the file it either starts over (`loop=True`) or goes on delivering
digital silence - a quiet room - so that voice activity detection sees the speech
end and the turn closes, as it would with a real microphone.

`WavOutput` behaves like a speaker that writes what it plays: a pacing task takes one
period from the playback buffer per period of wall-clock time and appends it to the
WAV file, so `played_ms`, `stop_playback`, `is_playing` and `on_drained` tell the same
truth as with a real device. Only audio is written (idle time between responses is
not), and the header is kept valid after every write and finalized on `stop`.

`NullOutput` (`audio.output.device: null`) is the same virtual speaker without a file
(with 200 ms periods: nothing needs feeding, and positions come from the clock).
It is paced rather than discarding at once so that barge-in stays truthful: an
interrupt truncates the answer where a listener would have been, and the assistant is
`speaking` for as long as the answer lasts (which also keeps half-duplex mic gating
meaningful).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import wave
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from harkd.aio import cancel_and_wait
from harkd.audio.base import PROVIDER_RATE, AudioFrame, DeviceListener, MeterReading
from harkd.audio.meter import LevelMeter
from harkd.audio.pcm import pick_channel
from harkd.audio.playback import PlaybackBuffer

log = logging.getLogger(__name__)

_MAX_LAG_S = 0.5
"""A paced loop this late (event loop stalled) restarts its schedule instead of bursting."""


class WavInput:
    """A PCM16 WAV file as a real-time microphone (implements `AudioInput`).

    Multi-channel files deliver `channel`. The header is checked here, so a bad file
    is reported when the input is created, before anything runs.
    """

    def __init__(
        self, path: str | Path, period_ms: int = 20, loop: bool = False, channel: int = 0
    ) -> None:
        self.path = Path(path)
        self.name = f"file:{self.path}"
        self.period_ms = period_ms
        self.loop = loop
        self.channel = channel
        self._channels, self.sample_rate = _check_wav(self.path, channel)
        self._pcm = b""
        self._stopping = False
        self._batch = 1

    async def start(self, listener: DeviceListener) -> None:
        """Read the file; a file cannot fail later, so `listener` is never called."""
        self._pcm = await asyncio.to_thread(_read_channel, self.path, self.channel)
        self._stopping = False
        log.info(
            "audio input %s: %d Hz, %.1f s%s",
            self.name,
            self.sample_rate,
            len(self._pcm) / 2 / self.sample_rate,
            ", looping" if self.loop else "",
        )

    async def frames(self) -> AsyncIterator[AudioFrame]:
        """Frames of `period_ms`, one per period of wall-clock time (or a `batch` of
        them every few periods), until `stop`."""
        frame_bytes = max(1, self.sample_rate * self.period_ms // 1000) * 2
        period_s = frame_bytes / 2 / self.sample_rate
        pcm = self._pcm
        position = 0
        anchor = time.monotonic()
        count = 0
        while not self._stopping:
            # Frame n is complete (captured) once its last sample has "arrived"; a
            # batch waits for its last frame.
            delay = anchor + (count + self._batch) * period_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -_MAX_LAG_S:
                log.debug("%s: %.0f ms behind, restarting the schedule", self.name, -delay * 1e3)
                anchor = time.monotonic() - (count + self._batch) * period_s
            if self._stopping:
                return
            complete = max(count + 1, int((time.monotonic() - anchor) / period_s))
            while count < complete:
                chunk = pcm[position : position + frame_bytes]
                position += len(chunk)
                if len(chunk) < frame_bytes:
                    if self.loop and pcm:
                        position = frame_bytes - len(chunk)
                        chunk += pcm[:position]
                    else:
                        chunk += bytes(frame_bytes - len(chunk))
                count += 1
                yield AudioFrame(chunk, self.sample_rate, anchor + count * period_s)

    def batch(self, periods: int) -> None:
        """Deliver `periods` frames at a time from the next wake-up on."""
        self._batch = max(1, periods)

    async def stop(self) -> None:
        """End `frames` (within one period)."""
        self._stopping = True


class _PacedOutput:
    """A virtual speaker: a pacing task consumes the playback buffer in real time."""

    def __init__(self, name: str, rate: int, period_ms: int, volume: int, source_rate: int) -> None:
        self.name = name
        self.sample_rate = rate
        self.source_rate = source_rate
        self._period_frames = max(1, rate * period_ms // 1000)
        self._buffer = PlaybackBuffer(rate, self._period_frames, volume, source_rate=source_rate)
        self._meter = LevelMeter(rate)
        self._drained_callbacks: list[Callable[[], None]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._playing = False
        # The chunk "in the speaker": it is heard until `_flight_end`.
        self._flight_frames = 0
        self._flight_end = 0.0

    async def start(self, listener: DeviceListener) -> None:
        """Start the pacing task; a virtual speaker never fails, `listener` is unused."""
        if self._task is None:
            await self._open()
            self._task = asyncio.create_task(self._pace(), name=f"audio-out {self.name}")

    async def stop(self) -> None:
        """Drop what is queued, stop pacing and release the sink."""
        self.stop_playback()
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        await self._close()

    def play(self, item_id: str, pcm: bytes) -> None:
        """Queue 24 kHz PCM16 audio of an item; never blocks (dropped unless started)."""
        if self._task is None:
            return
        self._buffer.push(item_id, pcm)
        self._playing = True
        self._wake.set()

    def stop_playback(self) -> dict[str, int]:
        """Silence now; returns each item's milliseconds heard up to this instant."""
        played = self._buffer.stop(self._in_flight(time.monotonic()))
        self._flight_frames = 0
        self._playing = False
        return played

    def played_ms(self, item_id: str) -> int:
        """Milliseconds of the item's audio heard so far."""
        return self._buffer.played_ms(item_id, self._in_flight(time.monotonic()))

    @property
    def is_playing(self) -> bool:
        """True while queued audio is still to be heard."""
        return self._playing

    def set_volume(self, volume: int) -> None:
        """Software gain, 0..100, from the next period on."""
        self._buffer.set_volume(volume)

    def on_drained(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the loop) whenever all queued audio has been heard."""
        self._drained_callbacks.append(callback)

    def on_abandoned(self, callback: Callable[[dict[str, int]], None]) -> None:
        """Nothing to keep: a file or the null sink is never lost, so queued audio always
        ends by draining or by `stop_playback`."""

    def meter(self) -> MeterReading:
        """Level and spectrum of what is being heard now."""
        return self._meter.reading()

    async def _open(self) -> None:
        """Prepare the sink (subclasses with a file open it here)."""

    async def _close(self) -> None:
        """Release the sink."""

    def _write(self, pcm: bytes) -> None:
        """Hand one period to the sink as it starts playing."""

    def _in_flight(self, now: float) -> int:
        remaining = math.ceil((self._flight_end - now) * self.sample_rate)
        return max(0, min(self._flight_frames, remaining))

    async def _pace(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            tick = time.monotonic()
            while True:
                starving = self._buffer.queued_frames < self._period_frames
                chunk = self._buffer.pop(self._period_frames, flush=starving)
                if chunk is None:
                    break
                frames = len(chunk) // 2
                now = time.monotonic()
                if now - tick > _MAX_LAG_S:
                    tick = now  # the loop stalled: a real device would have underrun
                self._write(chunk)
                self._buffer.record_written(frames)
                self._meter.feed(chunk, now)
                tick += frames / self.sample_rate
                self._flight_frames, self._flight_end = frames, tick
                await asyncio.sleep(max(0.0, tick - time.monotonic()))
            if self._playing and self._in_flight(time.monotonic()) == 0:
                self._playing = False
                self._buffer.forget_played()
                self._notify_drained()

    def _notify_drained(self) -> None:
        for callback in list(self._drained_callbacks):
            try:
                callback()
            except Exception:
                log.exception("%s: on_drained callback failed", self.name)


class WavOutput(_PacedOutput):
    """A speaker that writes what it plays to a PCM16 mono WAV file (implements `AudioOutput`)."""

    def __init__(
        self,
        path: str | Path,
        rate: int = PROVIDER_RATE,
        period_ms: int = 20,
        volume: int = 100,
        source_rate: int = PROVIDER_RATE,
    ) -> None:
        self.path = Path(path)
        super().__init__(f"file:{self.path}", rate, period_ms, volume, source_rate)
        self._file: wave.Wave_write | None = None

    async def _open(self) -> None:
        def open_file() -> wave.Wave_write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            out = wave.open(str(self.path), "wb")  # noqa: SIM115 - closed in _close
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(self.sample_rate)
            return out

        self._file = await asyncio.to_thread(open_file)

    async def _close(self) -> None:
        out, self._file = self._file, None
        if out is not None:
            await asyncio.to_thread(out.close)

    def _write(self, pcm: bytes) -> None:
        # writeframes patches the header every time: the file stays valid on a crash.
        if self._file is not None:
            self._file.writeframes(pcm)


class NullOutput(_PacedOutput):
    """No speaker (`audio.output.device: null`): paced, so played positions stay truthful."""

    def __init__(
        self,
        rate: int = PROVIDER_RATE,
        period_ms: int = 200,
        volume: int = 100,
        source_rate: int = PROVIDER_RATE,
    ) -> None:
        # Nothing is fed in real time, and positions inside a chunk come from the clock,
        # so long periods lose no precision and wake the loop a tenth as often.
        super().__init__("null", rate, period_ms, volume, source_rate)


def read_wav(path: Path, channel: int = 0) -> tuple[bytes, int]:
    """One channel of a PCM16 WAV file and its rate; ValueError naming the file."""
    _, rate = _check_wav(path, channel)
    return _read_channel(path, channel), rate


def _check_wav(path: Path, channel: int) -> tuple[int, int]:
    """(channels, rate) of a PCM16 WAV; ValueError naming the file otherwise."""
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
    except (OSError, EOFError, wave.Error) as exc:
        raise ValueError(f"{path}: cannot read as a PCM WAV file: {exc}") from exc
    if width != 2:
        raise ValueError(f"{path}: expected 16-bit PCM, got {width * 8}-bit samples")
    if channel >= channels:
        raise ValueError(f"{path}: channel {channel} requested, the file has {channels}")
    return channels, rate


def _read_channel(path: Path, channel: int) -> bytes:
    with wave.open(str(path), "rb") as wav:
        channels = wav.getnchannels()
        data = wav.readframes(wav.getnframes())
    return pick_channel(data, channel, channels)
