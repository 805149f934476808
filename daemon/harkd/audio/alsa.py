"""The ALSA edge: a capture thread and a playback thread per device (pyalsaaudio).

Blocking device I/O never touches the event loop. Each direction owns one thread:

* `AlsaInput` opens the PCM non-blocking and waits for each period in `poll`, reads
  every whole period the device holds, stamps each frame with when it was captured
  and hands them to the loop with one `call_soon_threadsafe` into a bounded queue (the
  oldest frame is dropped, with a rate-limited warning, when the consumer falls
  behind). Told to `batch`, it dozes between reads so that periods collect in the
  device buffer and move in one wake-up (nobody waits on the audio then). A capture that delivers
  nothing for `STALL_S` has lost its device: a blocking read would wait forever there
  (a suspended PulseAudio source does that, and stays stuck after it resumes).
* `AlsaOutput` opens the PCM non-blocking and writes from a `PlaybackBuffer`; it
  sleeps on an Event between writes (woken by `play`, `stop_playback` and `stop`) and
  never holds its lock while sleeping. Every call on the PCM object happens under
  that lock, so the loop thread can measure (`avail`) and `drop` at the instant of
  a barge-in without waiting for the writer.

A device that cannot be opened or fails later is reported once per outage through
`DeviceListener.device_failed` (on the loop), closed, and retried with exponential
backoff (0.5 s .. 10 s) until it works again (`device_recovered`); the threads never
die of a device error. Overruns and underruns are recovered in place.

Answer audio is never lost to a short outage of the speaker. What the device held
unplayed when it vanished goes back in front of the queue (`PlaybackBuffer.rewind`),
audio that arrives while the device is away is queued as usual, and reopening is then
tried every 0.5 s. Once the device is back it all plays. Audio that could not start
playing within `HOLD_S` is dropped and `on_abandoned` callbacks are told what was
heard of each item, as `stop_playback` would have returned.

A speaker can also stall without an error (a suspended PulseAudio sink, a USB card
whose clock stopped): while it holds audio, a played position (frames written minus
those still queued) that does not move for `PLAYBACK_STALL_S` counts as a lost device,
with the same reports and the same keeping of its audio. Such a device reopens fine
and stalls again, so after a stall it counts as recovered only once it has played
(two buffers' worth: a sound server swallows one even while suspended) or has nothing
to play; meanwhile the held audio keeps its hold clock, so it is abandoned after
`HOLD_S` (checked between reopenings, up to `PLAYBACK_STALL_S` late).

Idle playback writes nothing: when the buffer runs dry the thread writes one period
of silence as the last real audio is about to play out (so a device that underruns
does so in silence, not on the final sample - some hardware clicks or repeats its
ring buffer there; a late delta mid-answer costs at most that period of silence),
then, once the real audio has been heard, drops the stream and re-prepares it. The
device then sits prepared and stopped until the next answer: no underrun noise, no
silence written while idle, and no reopening. Every `IDLE_CHECK_S` the idle thread
probes the device, so a speaker unplugged between answers is noticed then and not
on the next answer's first write: a kernel device reports it in `avail`, a sound
server plugin (`pulse`, `pipewire`) only in `snd_pcm_poll_descriptors_revents`.

For echo cancellation and the wake word's own-voice check (`report_played`) the
playback thread tells each `PlayedSink` every write the device accepted, mono and
after the volume, with when it will be heard (now plus what is queued in front of
it), and that written audio was dropped unheard (a barge-in's `drop`, a lost device).
That is the canceller's far end: what was played, not what was queued.

What a position means: ALSA counts frames still queued as `buffer_size - avail`.
Through the PulseAudio/PipeWire `pulse` PCM that excludes the sound server's own sink
latency (pyalsaaudio exposes no `snd_pcm_delay`), so played positions run ahead of
the ear by that latency (a few ms on a hardware sink; tested within 40 ms).

Threads: each field says who owns it. "Loop" fields are only touched on the event
loop, "thread" fields only by the device thread, "_lock" fields by either under the
lock; `PlaybackBuffer` and `threading.Event` are thread-safe themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import alsaaudio

from harkd.audio.base import PROVIDER_RATE, AudioFrame, DeviceListener, MeterReading
from harkd.audio.meter import LevelMeter
from harkd.audio.pcm import pick_channel, spread_channels
from harkd.audio.playback import PlaybackBuffer
from harkd.audio.resample import StreamResampler

if TYPE_CHECKING:
    from harkd.audio.reference import PlayedSink  # numpy: only echo cancellation needs it
from harkd.backoff import Backoff

log = logging.getLogger(__name__)

PERIODS = 4
"""Periods in a device buffer (80 ms at 20 ms periods)."""
DEEP_CAPTURE_PERIODS = 10
"""Periods in the capture buffer of a microphone that will be read in batches (200 ms):
a batch dozes through at most half of it, the rest is room for a thread that wakes
late (see `harkd.capture.reads_in_batches` for when)."""
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 10.0
JOIN_TIMEOUT_S = 2.0
"""How long `stop` waits for a device thread (a capture wakes within `STALL_S`)."""
START_TIMEOUT_S = 5.0
"""How long `start` waits for the first open attempt before returning anyway."""
IDLE_CHECK_S = 0.5
"""An idle playback device is probed this often (a vanished USB card shows up here)."""
STALL_S = 1.0
"""A capture device that delivers no audio for this long has failed."""
PLAYBACK_STALL_S = 2.0
"""A playback device holding audio that plays none of it for this long has failed.

Generous: a loaded machine delays the writer, never the device's own clock, so this
only has to outlast scheduling hiccups and a sound server's start-up."""
HOLD_S = 5.0
"""Answer audio waits this long for a lost speaker to come back, then is abandoned."""
WARN_INTERVAL_S = 5.0


class DeviceError(Exception):
    """The PCM reported a state harkd cannot recover in place; the device is reopened."""


class DeviceStalled(DeviceError):
    """The playback device holds audio and plays none of it, without an error."""


class _Throttled:
    """A warning that is logged at most once per interval, with a count of the rest."""

    def __init__(self, message: str, interval_s: float = WARN_INTERVAL_S) -> None:
        self._message = message
        self._interval_s = interval_s
        self._last = -float("inf")
        self._count = 0

    def __call__(self, *args: object) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._last >= self._interval_s:
            log.warning(self._message + " (%d times)", *args, self._count)
            self._last = now
            self._count = 0


class _Edge(ABC):
    """Failure bookkeeping shared by both directions: report once, retry with backoff."""

    def __init__(self, device: str) -> None:
        self.name = device
        # Set on the loop before the thread starts (Thread.start publishes them), then
        # only read by the thread.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: DeviceListener | None = None
        self._stopping = threading.Event()
        # Loop: the device thread and the future `start` waits on (settled via the loop).
        self._thread: threading.Thread | None = None
        self._first_attempt: asyncio.Future[None] | None = None
        # Thread: an outage is being reported (device_failed sent, recovered not yet).
        self._failed = False

    async def _start_thread(self, listener: DeviceListener, kind: str) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._listener = listener
        self._stopping.clear()
        self._first_attempt = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._thread_main, name=f"alsa-{kind} {self.name}", daemon=True
        )
        self._thread.start()
        # Return once the device is open (or known to be failing), so that the
        # first frames or the first answer are not lost to a still-opening device.
        try:
            async with asyncio.timeout(START_TIMEOUT_S):
                await asyncio.shield(self._first_attempt)
        except TimeoutError:
            log.warning("%s: still opening after %.0f s", self.name, START_TIMEOUT_S)

    async def _stop_thread(self) -> None:
        self._stopping.set()
        self._wake()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, JOIN_TIMEOUT_S)
            if thread.is_alive():
                log.warning("%s: device thread still busy after %.0f s", self.name, JOIN_TIMEOUT_S)

    @abstractmethod
    def _thread_main(self) -> None:
        """The device thread: open, move audio, recover, until `_stopping` is set."""

    def _wake(self) -> None:  # noqa: B027 - a hook: each direction sleeps on its own Event
        """Interrupt the thread's wait (the output between writes, the input's doze)."""

    def _call_soon(self, callback: Callable[..., object], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stopping.set()

    def _attempted(self) -> None:
        def settle(future: asyncio.Future[None]) -> None:
            if not future.done():
                future.set_result(None)

        if self._first_attempt is not None:
            self._call_soon(settle, self._first_attempt)

    def _report_failure(self, message: str) -> None:
        if self._failed:
            log.debug("%s: still failing: %s", self.name, message)
            return
        self._failed = True
        log.warning("audio device %s failed: %s (retrying)", self.name, message)
        if self._listener is not None:
            self._call_soon(self._listener.device_failed, self.name, message)

    def _report_working(self) -> None:
        if not self._failed:
            return
        self._failed = False
        log.info("audio device %s recovered", self.name)
        if self._listener is not None:
            self._call_soon(self._listener.device_recovered, self.name)

    def _retry_backoff(self) -> Backoff:
        # No jitter: nobody else retries this device, there is no crowd to spread.
        return Backoff(BACKOFF_INITIAL_S, BACKOFF_MAX_S, jitter=0)

    def _pause(self, backoff: Backoff) -> None:
        """Wait the next backoff delay, or until stopped."""
        self._stopping.wait(backoff.next())


class AlsaInput(_Edge):
    """An ALSA capture PCM as a microphone (implements `AudioInput`).

    Opens mono (or `channel + 1` channels to pick a channel other than the first);
    a device that refuses mono is opened with more channels and `channel` is picked.
    If the device runs at another rate than asked, frames are resampled to `rate`, so
    `sample_rate` always holds. `max_queued_frames` bounds the queue to the loop.
    """

    def __init__(
        self,
        device: str = "default",
        rate: int = 16000,
        period_ms: int = 20,
        channel: int = 0,
        *,
        max_queued_frames: int = 50,
        buffer_periods: int = PERIODS,
    ) -> None:
        super().__init__(device)
        self.buffer_periods = buffer_periods
        self.sample_rate = rate
        self.period_ms = period_ms
        self.channel = channel
        self._frame_bytes = max(1, rate * period_ms // 1000) * 2
        self._max_queued = max_queued_frames
        # Loop: frames reach it only through _put, called on the loop.
        self._queue: asyncio.Queue[AudioFrame | None] | None = None
        self._warn_dropped = _Throttled(f"{device}: capture consumer too slow, dropped a frame")
        # Set on the loop, read by the thread (an int: no lock needed); the Event cuts
        # the thread's doze short when batching ends or the input stops.
        self._batch = 1
        self._undozed = threading.Event()
        # Thread:
        self._warn_overrun = _Throttled(f"{device}: capture overrun, recovered")

    async def start(self, listener: DeviceListener) -> None:
        """Start the capture thread; returns once the device opened or failed once."""
        if self._thread is None:  # a fresh queue: a restart must not see the old end
            self._queue = asyncio.Queue(self._max_queued)
        await self._start_thread(listener, "capture")

    async def frames(self) -> AsyncIterator[AudioFrame]:
        """Captured frames of `period_ms`, in order, until `stop`."""
        if self._queue is None:
            raise RuntimeError(f"{self.name}: start() the input before reading frames")
        queue = self._queue
        while (frame := await queue.get()) is not None:
            yield frame

    async def stop(self) -> None:
        """Stop capturing, release the device and end `frames`."""
        await self._stop_thread()
        if self._queue is not None:
            self._put(None)

    def batch(self, periods: int) -> None:
        """Hand frames over `periods` at a time from now on (1: as each is captured)."""
        self._batch = max(1, periods)
        if self._batch == 1:
            self._undozed.set()

    def _wake(self) -> None:
        self._undozed.set()

    def _put_all(self, frames: list[AudioFrame]) -> None:
        for frame in frames:
            self._put(frame)

    def _put(self, frame: AudioFrame | None) -> None:
        """On the loop: enqueue, dropping the oldest frame when the consumer lags."""
        queue = self._queue
        if queue is None:
            return
        if queue.full():
            queue.get_nowait()
            if frame is not None:
                self._warn_dropped()
        queue.put_nowait(frame)

    def _thread_main(self) -> None:
        backoff = self._retry_backoff()
        while not self._stopping.is_set():
            try:
                pcm, channels, rate = self._open()
            except alsaaudio.ALSAAudioError as exc:
                self._report_failure(str(exc))
                self._attempted()
                self._pause(backoff)
                continue
            self._attempted()
            failure = None
            try:
                self._capture(pcm, channels, rate)
            except (alsaaudio.ALSAAudioError, DeviceError) as exc:
                failure = str(exc)
            finally:
                pcm.close()
            if failure is not None:
                if not self._failed:
                    backoff.reset()  # it worked until now: a new outage
                self._report_failure(failure)
                self._pause(backoff)

    def _open(self) -> tuple[alsaaudio.PCM, int, int]:
        period = max(1, self.sample_rate * self.period_ms // 1000)
        wanted = 1 if self.channel == 0 else self.channel + 1

        def open_with(channels: int) -> alsaaudio.PCM:
            return _open_pcm(alsaaudio.PCM_CAPTURE, alsaaudio.PCM_NONBLOCK, self, channels, period)

        try:
            pcm = open_with(wanted)
        except alsaaudio.ALSAAudioError:
            if wanted >= 2:
                raise
            pcm = open_with(2)  # some hardware refuses mono capture
        info = pcm.info()
        channels, rate = int(info["channels"]), int(info["rate"])
        problem = _format_problem(info)
        if problem is None and self.channel >= channels:
            problem = f"channel {self.channel} requested, the device has {channels}"
        if problem is not None:
            pcm.close()
            raise alsaaudio.ALSAAudioError(problem)
        log.info(
            "audio input %s: %d Hz, %d channel(s), period %d frames",
            self.name,
            rate,
            channels,
            info["period_size"],
        )
        return pcm, channels, rate

    def _capture(self, pcm: alsaaudio.PCM, channels: int, rate: int) -> None:
        """Move periods to the loop until stopped; raises once the device fails or stalls.

        The device counts as working (again) once it delivered audio, not when it
        opened: a stalled source opens fine and then stays silent.
        """
        resampler = None
        if rate != self.sample_rate:
            # Low quality keeps soxr's look-ahead (added latency) to a few ms.
            resampler = StreamResampler(rate, self.sample_rate, quality="LQ")
        poller = select.poll()
        for fd, events in pcm.polldescriptors():
            poller.register(fd, events)
        pending = bytearray()
        frame_s = self._frame_bytes / 2 / self.sample_rate
        max_doze_s = int(pcm.info()["buffer_size"]) / rate / 2
        last_audio = time.monotonic()
        while not self._stopping.is_set():
            silent_s = time.monotonic() - last_audio
            if silent_s >= STALL_S:
                raise DeviceError(f"no audio for {silent_s:.1f} s [{self.name}]")
            # Normally a period is ready within period_ms; the timeout only runs out
            # on a device that stopped delivering, so this costs no extra wake-ups.
            if not poller.poll((STALL_S - silent_s) * 1000):
                continue
            frames, data = pcm.read()
            if frames < 0:
                self._warn_overrun()  # pyalsaaudio already re-prepared the stream
                continue
            if frames == 0:
                # Woken without a whole period (a plugin's poll can do that): do not spin.
                self._stopping.wait(self.period_ms / 2000)
                continue
            read = [data]
            if self._batch > 1:
                # Whatever else the device holds comes along: one hand-off per wake-up.
                # (Bounded: a file PCM always has more.)
                for _ in range(self.buffer_periods - 1):
                    more, data = pcm.read()
                    if more <= 0:
                        if more < 0:
                            self._warn_overrun()
                        break
                    read.append(data)
            captured_at = time.monotonic()
            last_audio = captured_at
            self._report_working()
            for data in read:
                data = pick_channel(data, self.channel, channels)
                pending += resampler.process(data) if resampler is not None else data
            count = len(pending) // self._frame_bytes
            if count:
                # The last frame was captured just now, each earlier one a frame before.
                size = self._frame_bytes
                ready = [
                    AudioFrame(
                        bytes(pending[i * size : (i + 1) * size]),
                        self.sample_rate,
                        captured_at - (count - 1 - i) * frame_s,
                    )
                    for i in range(count)
                ]
                del pending[: count * size]
                self._call_soon(self._put_all, ready)
            if self._batch > 1:
                # Nobody waits on this audio now: let the next periods collect in the
                # device buffer and move them in one go. Checked again after the clear:
                # a `batch(1)` just before it still counts.
                self._undozed.clear()
                if self._batch > 1:
                    self._undozed.wait(min(self._batch * self.period_ms / 1000, max_doze_s))


class AlsaOutput(_Edge):
    """An ALSA playback PCM as the speaker (implements `AudioOutput`).

    `rate` is the rate asked of the device (24000 avoids resampling the provider's
    audio; a device that insists on another rate gets resampled audio). Mono is
    asked for; a device that needs more channels gets the audio on every channel.
    """

    def __init__(
        self,
        device: str = "default",
        rate: int = 24000,
        period_ms: int = 20,
        volume: int = 100,
        source_rate: int = PROVIDER_RATE,
    ) -> None:
        super().__init__(device)
        self.sample_rate = rate
        self.source_rate = source_rate
        self.period_ms = period_ms
        # Thread-safe by its own lock; never replaced (`reconfigure` on a rate change).
        self._buffer = PlaybackBuffer(
            rate, max(1, rate * period_ms // 1000), volume, source_rate=source_rate
        )
        self._wake_event = threading.Event()
        self._lock = threading.Lock()  # every call on the PCM object, and the fields below
        # _lock:
        self._pcm: alsaaudio.PCM | None = None  # None while the device is lost
        self._meter = LevelMeter(rate)  # fed by the thread; replaced on a rate change
        self._buffer_size = 0
        self._period = 0
        self._channels = 1
        self._running = False  # audio written since the stream was last prepared
        self._padded = False  # the silence tail is in the device
        self._ran_dry = False  # it underran while running: what it held was all heard
        self._remainder = b""  # popped mono audio the device has not accepted yet
        self._recent = b""  # the last frames written (mono): what a loss rewinds
        self._in_device = 0  # frames in the device at the last measure, plus writes since
        self._played_sinks: tuple[PlayedSink, ...] = ()  # echo reference, own-voice wake check
        # Thread:
        self._total_written = 0  # frames ever written (never reset): positions are relative
        self._recent_bytes = 0  # how much `_recent` keeps: a buffer, or 3 while `_unproven`
        self._position = 0  # the device's played position (written - queued) last seen
        self._stalled_since: float | None = None  # holding audio, and no progress since
        self._unproven = False  # reopened after a stall: working once it plays (or idles)
        self._proof_position = 0  # ... that is, once its position passes this
        self._opened_total = 0  # `_total_written` when the PCM was opened
        self._poller: select.poll | None = None  # the open PCM's descriptors (idle probe)
        self._held_since: float | None = None  # audio waits for a lost device since then
        # Loop:
        self._playing = False
        self._drained_callbacks: list[Callable[[], None]] = []
        self._abandoned_callbacks: list[Callable[[dict[str, int]], None]] = []

    async def start(self, listener: DeviceListener) -> None:
        """Start the playback thread; returns once the device opened or failed once."""
        await self._start_thread(listener, "playback")

    async def stop(self) -> None:
        """Drop what is queued and release the device."""
        self.stop_playback()
        await self._stop_thread()

    def play(self, item_id: str, pcm: bytes) -> None:
        """Queue 24 kHz PCM16 audio of one item; never blocks.

        While the device is lost the audio waits for it (see `on_abandoned`). Before
        `start` and after `stop` it is dropped: no thread would ever play it.
        """
        if self._thread is None:
            return
        self._buffer.push(item_id, pcm)
        self._playing = True
        self._wake_event.set()

    def stop_playback(self) -> dict[str, int]:
        """Silence now: drop the buffer and the device's queue (`snd_pcm_drop`).

        Returns each item's milliseconds heard, measured at the drop. Does not call
        `on_drained` (the caller knows). The stream is re-prepared by the playback
        thread right away, ready for the next answer without reopening.
        """
        with self._lock:
            played = self._buffer.stop(self._queued_frames())
            if self._pcm is not None and self._running:
                try:
                    self._pcm.drop()
                except alsaaudio.ALSAAudioError as exc:
                    log.debug("%s: drop failed: %s", self.name, exc)
            self._tell_dropped()
            self._running = False
            self._padded = False
            self._ran_dry = False
            self._remainder = b""
            self._recent = b""
            self._in_device = 0
        self._playing = False
        self._wake_event.set()
        return played

    def report_played(self, sink: PlayedSink) -> None:
        """Tell `sink` every write the device accepts (mono, post-gain) and when it will
        be heard, and when written audio is dropped unheard (echo cancellation, the
        wake word's own-voice check); several sinks may listen."""
        with self._lock:
            self._played_sinks = (*self._played_sinks, sink)

    def played_ms(self, item_id: str) -> int:
        """Milliseconds of the item's audio that have left the speaker so far."""
        with self._lock:
            return self._buffer.played_ms(item_id, self._queued_frames())

    @property
    def is_playing(self) -> bool:
        """True from `play` until the audio has been heard, dropped or abandoned."""
        return self._playing

    def set_volume(self, volume: int) -> None:
        """Software gain, 0..100 (square law), heard within the device buffer (80 ms)."""
        self._buffer.set_volume(volume)

    def on_drained(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the loop whenever all played audio has been heard."""
        self._drained_callbacks.append(callback)

    def on_abandoned(self, callback: Callable[[dict[str, int]], None]) -> None:
        """Call `callback(played)` on the loop when audio was dropped for a lost device.

        That happens when queued audio could not start playing within `HOLD_S` because
        the device was lost (or, rarely, came back at another rate). `played` maps each
        item in the ledger to its milliseconds really heard, like `stop_playback`'s
        result; `is_playing` is False by then unless audio arrived after the drop.
        """
        self._abandoned_callbacks.append(callback)

    def meter(self) -> MeterReading:
        """Level and spectrum of the audio being written to the device."""
        with self._lock:
            meter = self._meter
        return meter.reading()

    def _wake(self) -> None:
        self._wake_event.set()

    def _queued_frames(self) -> int:
        """Frames still queued in the device (caller holds the lock)."""
        if self._pcm is None or not self._running:
            return 0
        avail = int(self._pcm.avail())
        if avail < 0:  # underrun (everything was played) or dropped
            return 0
        return max(0, self._buffer_size - avail)

    def _tell_dropped(self) -> None:
        """What the device held will not be heard (lock held)."""
        at = time.monotonic()
        for sink in self._played_sinks:
            sink.dropped(at)

    def _drained(self, generation: int) -> None:
        """On the loop: the device played everything up to buffer generation `generation`."""
        if generation != self._buffer.generation or not self._playing:
            return  # new audio arrived meanwhile, or stop_playback already answered
        self._playing = False
        for callback in list(self._drained_callbacks):
            try:
                callback()
            except Exception:
                log.exception("%s: on_drained callback failed", self.name)

    def _abandon_held(self) -> None:
        """On the loop: held audio waited `HOLD_S` for the lost device; drop it."""
        with self._lock:
            if self._pcm is not None:
                return  # the device came back meanwhile: the audio is playing
            played = self._buffer.stop(0)
            self._remainder = b""
        self._wake_event.set()  # the thread restarts its hold clock for newer audio
        self._abandoned(played)

    def _abandoned(self, played: dict[str, int]) -> None:
        """On the loop: audio was dropped unheard; tell the `on_abandoned` callbacks."""
        if not played:
            return  # stop_playback dropped it first and has answered already
        log.warning("%s: dropped answer audio the lost device could not play", self.name)
        if not self._buffer.has_audio:
            self._playing = False
        for callback in list(self._abandoned_callbacks):
            try:
                callback(played)
            except Exception:
                log.exception("%s: on_abandoned callback failed", self.name)

    def _thread_main(self) -> None:
        backoff = self._retry_backoff()
        while not self._stopping.is_set():
            try:
                pcm = self._open()
            except alsaaudio.ALSAAudioError as exc:
                self._report_failure(str(exc))
                self._attempted()
                self._wait_for_retry(backoff.next())
                continue
            # A stalled device (a suspended sink) reopens fine and stalls again: it
            # recovers once it plays, and the held audio keeps its hold clock meanwhile.
            if not self._unproven:
                self._report_working()
                self._held_since = None
            self._attempted()
            backoff.reset()
            self._stalled_since = None
            self._position = self._total_written  # a fresh PCM holds nothing
            # A sound server takes a buffer's worth into its own even while suspended.
            self._opened_total = self._total_written
            self._proof_position = self._total_written + 2 * self._buffer_size
            # Unproven, all written since the open may be unheard: 3 buffers at most.
            self._recent_bytes = 2 * self._buffer_size * (3 if self._unproven else 1)
            failure = None
            try:
                self._write_loop(pcm)
            except (alsaaudio.ALSAAudioError, DeviceError) as exc:
                failure = str(exc)
                self._unproven = isinstance(exc, DeviceStalled)
            finally:
                self._close(pcm, lost=failure is not None)
            if failure is not None:
                self._report_failure(failure)
                self._wait_for_retry(BACKOFF_INITIAL_S)

    def _open(self) -> alsaaudio.PCM:
        period = max(1, self.sample_rate * self.period_ms // 1000)

        def open_with(channels: int) -> alsaaudio.PCM:
            return _open_pcm(alsaaudio.PCM_PLAYBACK, alsaaudio.PCM_NONBLOCK, self, channels, period)

        try:
            pcm = open_with(1)
        except alsaaudio.ALSAAudioError:
            pcm = open_with(2)  # some hardware refuses mono playback
        info = pcm.info()
        problem = _format_problem(info)
        if problem is not None:
            pcm.close()
            raise alsaaudio.ALSAAudioError(problem)
        rate = int(info["rate"])
        self._poller = select.poll()
        for fd, events in pcm.polldescriptors():
            self._poller.register(fd, events)
        dropped: dict[str, int] = {}
        with self._lock:
            self._pcm = pcm
            self._channels = int(info["channels"])
            self._period = int(info["period_size"])
            self._buffer_size = int(info["buffer_size"])
            self._running = False
            self._padded = False
            self._in_device = 0
            if rate != self._buffer.device_rate or self._period != self._buffer.period_frames:
                dropped = self._buffer.reconfigure(rate, self._period)
                self._remainder = b""
                self._meter = LevelMeter(rate)
        if dropped:
            self._call_soon(self._abandoned, dropped)
        log.info(
            "audio output %s: %d Hz, %d channel(s), period %d frames, buffer %d frames",
            self.name,
            rate,
            self._channels,
            self._period,
            self._buffer_size,
        )
        return pcm

    def _close(self, pcm: alsaaudio.PCM, *, lost: bool) -> None:
        """Release the PCM; after a failure keep what it never played for the next one."""
        drained = False
        with self._lock:
            self._pcm = None
            if lost:
                # Not `_running`: a lost stream looks like an underrun on its way out.
                unheard = min(self._in_device, len(self._recent) // 2)
                self._buffer.rewind(unheard)
                self._tell_dropped()
                self._remainder = self._recent[len(self._recent) - 2 * unheard :] + self._remainder
                if not self._buffer.has_unwritten_audio:
                    # Every real frame was heard; only padding went with the device.
                    self._buffer.discard_unwritten()
                    self._remainder = b""
                    self._buffer.forget_played()
                    drained = True
            generation = self._buffer.generation
            self._running = False
            self._padded = False
            self._recent = b""
            self._in_device = 0
            with contextlib.suppress(alsaaudio.ALSAAudioError):
                pcm.drop()  # close() drains a playback PCM: drop first
            pcm.close()
        self._poller = None
        if drained:
            self._call_soon(self._drained, generation)

    def _wait_for_retry(self, delay: float) -> None:
        """Wait `delay` before reopening the lost device.

        While answer audio waits, reopening is tried every `BACKOFF_INITIAL_S`, and
        audio that waited `HOLD_S` is handed to the loop to be abandoned.
        """
        started = time.monotonic()
        while not self._stopping.is_set():
            now = time.monotonic()
            waiting = self._buffer.has_unwritten_audio
            if not waiting:
                self._held_since = None
            elif self._held_since is None:
                self._held_since = now
            retry_at = started + (min(delay, BACKOFF_INITIAL_S) if waiting else delay)
            wake_at = retry_at
            if self._held_since is not None:
                expires = self._held_since + HOLD_S
                if now >= expires:
                    self._held_since = None  # the loop drops it, then wakes us
                    self._call_soon(self._abandon_held)
                else:
                    wake_at = min(wake_at, expires)
            if now >= retry_at:
                break
            self._wake_event.wait(wake_at - now)
            self._wake_event.clear()

    def _write_loop(self, pcm: alsaaudio.PCM) -> None:
        while not self._stopping.is_set():
            self._wake_event.clear()
            with self._lock:
                # Snapshot first: a push after it makes this round's drain stale.
                generation = self._buffer.generation
                timeout, drained = self._service(pcm)
            if drained:
                self._call_soon(self._drained, generation)
            self._wake_event.wait(timeout)

    def _service(self, pcm: alsaaudio.PCM) -> tuple[float, bool]:
        """One round of the writer (lock held): write what fits, detect the drain.

        Returns how long to sleep and whether the real audio has all been heard.
        """
        rate = self._buffer.device_rate
        period_s = self._period / rate
        avail = self._avail(pcm)
        queued = self._buffer_size - avail
        self._in_device = queued if self._running else 0
        position = self._total_written - queued
        if position != self._position:  # the device played (or dropped) something
            self._position = position
            self._stalled_since = None
            if self._unproven and position >= self._proof_position:
                self._proven()
        elif self._running and queued > 0:
            self._check_stall()
        unplayed = self._buffer.unplayed_frames(queued)
        starving = unplayed <= self._period
        if avail > 0:
            fresh = not self._remainder
            data = self._remainder or self._buffer.pop(avail, flush=starving)
            if data is None and self._running and starving and not self._padded:
                # The answer (or a late delta) ends here: underrun in silence, not on audio.
                data = self._buffer.silence(min(avail, self._period))
                self._padded = True
                self._write(pcm, data, meter=False)
                return period_s / 2, False
            if data:
                self._padded = False
                written = self._write(pcm, data, meter=fresh)
                if written:
                    avail -= written
                    unplayed += written
        if self._buffer.has_audio or self._remainder:
            # Sleep until a period of room frees up.
            room_in = (self._period - avail) / rate
            return max(period_s / 4, room_in), False
        if self._running and unplayed > 0:
            # Wake when it is time to pad (before) or to stop (after padding).
            until = unplayed if self._padded else unplayed - self._period
            return max(period_s / 4, until / rate), False
        if self._running or self._ran_dry:
            # Everything real was heard; only silence (if anything) remains: stop cleanly.
            # Also when the answer's end underran before its silence tail was written
            # (the thread woke late on a busy machine): it was heard all the same.
            self._running = False
            self._padded = False
            self._ran_dry = False
            self._in_device = 0
            self._rearm(pcm)
            self._buffer.forget_played()
            return IDLE_CHECK_S, True
        if self._unproven:
            self._proven()  # nothing to play: the next answer tells
        self._probe(pcm)
        return IDLE_CHECK_S, False

    def _check_stall(self) -> None:
        """The device holds audio and played none of it since the last wake-up.

        A device that stalls without an error (a suspended sound server sink, a USB
        card whose clock stopped) would hold the answer forever: after
        `PLAYBACK_STALL_S` it counts as lost, so its audio is kept and it is reopened.
        """
        now = time.monotonic()
        if self._stalled_since is None:
            self._stalled_since = now
        elif now - self._stalled_since >= PLAYBACK_STALL_S:
            stalled_s = now - self._stalled_since
            if self._unproven:
                # Reopened after a stall and never proven: a sound server took what it
                # counts as played into its own buffer, and drops it with the stream.
                self._in_device = self._total_written - self._opened_total
            raise DeviceStalled(f"nothing played for {stalled_s:.1f} s [{self.name}]")

    def _proven(self) -> None:
        """The device reopened after a stall plays (or has nothing to play): it works."""
        self._unproven = False
        self._held_since = None
        self._recent_bytes = 2 * self._buffer_size
        self._report_working()

    def _probe(self, pcm: alsaaudio.PCM) -> None:
        """Idle: let a sound server plugin report a lost stream (it raises here).

        Costs a zero-timeout poll; `_avail` already covers kernel devices.
        """
        assert self._poller is not None
        ready = dict(self._poller.poll(0))
        pcm.polldescriptors_revents([(fd, ready.get(fd, 0)) for fd, _ in pcm.polldescriptors()])

    def _avail(self, pcm: alsaaudio.PCM) -> int:
        """Room in the device buffer, recovering xruns and dropped streams in place."""
        avail = int(pcm.avail())
        state = pcm.state()
        if avail == -errno.EPIPE or state in _REARM_STATES:
            xrun = state == alsaaudio.PCM_STATE_XRUN or avail == -errno.EPIPE
            if xrun and (self._buffer.unplayed_frames(0) > 0 or self._buffer.has_audio):
                log.debug("%s: playback underrun", self.name)
            # Everything queued was played (xrun) or dropped: the device holds nothing.
            self._ran_dry = xrun and self._running
            self._running = False
            self._padded = False
            self._rearm(pcm)
            avail = int(pcm.avail())
        if avail < 0:
            raise DeviceError(f"{os.strerror(-avail)} [{self.name}]")
        return min(avail, self._buffer_size)

    def _rearm(self, pcm: alsaaudio.PCM) -> None:
        """Bring the stream back to PREPARED (stopped, empty, ready to start on a write)."""
        if pcm.state() != alsaaudio.PCM_STATE_SETUP:
            pcm.drop()
        # pyalsaaudio prepares a stream in SETUP state before writing; an empty write
        # does only that, so the next answer starts without the round trip.
        pcm.write(b"")

    def _write(self, pcm: alsaaudio.PCM, data: bytes, *, meter: bool) -> int:
        """Write mono device-rate audio; returns the frames the device accepted."""
        if meter:
            self._meter.feed(data)
        self._remainder = data  # still ours if the write raises: a new device gets it
        device_bytes = spread_channels(data, self._channels)
        result = pcm.write(device_bytes)
        if result == -errno.EPIPE:
            result = pcm.write(device_bytes)  # the underrun was recovered: write again
        written = max(0, int(result))
        if written and self._played_sinks:
            # Heard once what is queued in front of it has played.
            rate = self._buffer.device_rate
            starts_at = time.monotonic() + (self._in_device if self._running else 0) / rate
            for sink in self._played_sinks:
                sink.played(data[: 2 * written], rate, starts_at)
        if written:
            self._running = True
            self._ran_dry = False
            self._total_written += written
            self._buffer.record_written(written)
            self._in_device += written
            self._recent = (self._recent + data[: 2 * written])[-self._recent_bytes :]
        self._remainder = data[2 * written :]
        return written


_REARM_STATES = (
    alsaaudio.PCM_STATE_SETUP,
    alsaaudio.PCM_STATE_XRUN,
    alsaaudio.PCM_STATE_SUSPENDED,
)


def _format_problem(info: dict[str, Any]) -> str | None:
    if info.get("format") != alsaaudio.PCM_FORMAT_S16_LE:
        return (
            f"the device does not take 16-bit samples (got {info.get('format_name')}); "
            "use a plughw: or default device"
        )
    return None


def list_devices() -> str:
    """A readable list of ALSA PCMs and cards, for `harkd devices`."""
    lines = ["Capture PCMs (audio.input.device):"]
    lines += [f"  {name}" for name in alsaaudio.pcms(alsaaudio.PCM_CAPTURE)] or ["  (none)"]
    lines += ["", "Playback PCMs (audio.output.device):"]
    lines += [f"  {name}" for name in alsaaudio.pcms(alsaaudio.PCM_PLAYBACK)] or ["  (none)"]
    lines += ["", "Cards:"]
    cards = alsaaudio.card_indexes()
    for index in cards:
        card_id, long_name = alsaaudio.card_name(index)
        lines.append(f"  {index}: {card_id} - {long_name}  (plughw:{index} or hw:{index})")
    if not cards:
        lines.append("  (none: no sound card is visible to this user; is it in group audio?)")
    lines += [
        "",
        "Which name to use:",
        "  default          what the system routes to (often PulseAudio/PipeWire)",
        "  pulse, pipewire  through the sound server (shares the device with other programs)",
        "  plughw:N         card N directly, ALSA converts rate, format and channels (recommended)",
        "  hw:N             card N raw: only its native rates and formats",
        "  file:PATH.wav    a WAV file (input: played in real time; output: written)",
    ]
    return "\n".join(lines)


def _open_pcm(
    kind: int, mode: int, device: AlsaInput | AlsaOutput, channels: int, period: int
) -> alsaaudio.PCM:
    """Open `device` as S16_LE at its rate with periods of `period` frames (an input's
    `buffer_periods` of them, `PERIODS` for an output)."""
    return alsaaudio.PCM(
        kind,
        mode,
        device=device.name,
        channels=channels,
        rate=device.sample_rate,
        format=alsaaudio.PCM_FORMAT_S16_LE,
        periodsize=period,
        periods=device.buffer_periods if isinstance(device, AlsaInput) else PERIODS,
    )
