"""The playback buffer and the ledger of what was really heard, free of any device.

Response audio arrives per assistant item at 24 kHz, usually faster than real time.
`PlaybackBuffer` resamples it to the device rate (one `StreamResampler` per item, so
joins between deltas do not click), applies the software volume when audio leaves the
buffer (so a volume change is heard within the device's buffer, not after everything
already queued), and keeps a ledger that maps device frames back to items:

    played position = frames written to the device - frames still queued in it

from which `played_ms` tells how much of an item was heard, in milliseconds of the
item's 24 kHz audio (48 bytes per ms), never more than the item's received audio.
That number is what a barge-in truncates the assistant item at.

All methods are thread-safe: the event loop pushes and asks, a device thread pops.
Every mutable field is guarded by the buffer's one lock; nothing else is shared.

A device that vanishes loses what it held: `rewind` turns the frames it never played
back into popped-but-unwritten frames, so the ledger stays truthful and the caller
can write them again once a device is back.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

from harkd.audio.base import PROVIDER_RATE
from harkd.audio.resample import Quality, StreamResampler

_FINAL_KEPT = 64
"""Items whose final played_ms is remembered after they leave the ledger."""


@dataclass(slots=True)
class _Segment:
    """Frames popped for the device: of an item, or padding (`item` None)."""

    item: str | None
    frames: int


def volume_gain(volume: int) -> float:
    """Amplitude gain of a 0..100 volume: a square law, so 50 is about half as loud (-12 dB)."""
    clamped = max(0, min(100, volume))
    return (clamped / 100.0) ** 2


class PlaybackBuffer:
    """Queue of response audio at the device rate, plus the played-position ledger.

    `period_frames` is the device period; the buffer uses it to size silence padding.
    Frames are mono samples at `device_rate`; channel duplication is the device's job.
    """

    def __init__(
        self,
        device_rate: int,
        period_frames: int,
        volume: int = 100,
        source_rate: int = PROVIDER_RATE,
        quality: Quality = "LQ",
    ) -> None:
        self.source_rate = source_rate  # immutable
        self._quality: Quality = quality  # immutable
        self._lock = threading.Lock()
        # Everything below is guarded by _lock.
        self._device_rate = device_rate
        self._period_frames = period_frames
        self._generation = 0  # bumped by push, stop and clear
        self._volume = max(0, min(100, volume))
        self._gain = volume_gain(self._volume)
        # Audio waiting to be popped, at the device rate, before gain.
        self._queue: deque[tuple[str, bytes]] = deque()
        self._queued_bytes = 0
        self._item: str | None = None
        self._resampler = StreamResampler(source_rate, device_rate, quality)
        self._held = False  # the resampler holds look-ahead audio of `_item`
        # Popped but not yet confirmed written: (item or None for padding, frames).
        self._popped: deque[_Segment] = deque()
        # The device timeline: absolute frame spans written per item.
        self._spans: dict[str, list[tuple[int, int]]] = {}
        self._received: dict[str, int] = {}
        self._written = 0
        self._real_end = 0
        self._final: OrderedDict[str, int] = OrderedDict()
        # Heard of an item before it was retired (the device ran dry mid-item, e.g.
        # deltas arriving in real time) and came back with more audio.
        self._base: dict[str, int] = {}

    @property
    def device_rate(self) -> int:
        """The rate of the audio handed to the device."""
        with self._lock:
            return self._device_rate

    @property
    def period_frames(self) -> int:
        """The device period the buffer was configured for."""
        with self._lock:
            return self._period_frames

    @property
    def volume(self) -> int:
        """The current volume, 0..100."""
        with self._lock:
            return self._volume

    @property
    def generation(self) -> int:
        """A counter bumped by every `push`, `stop` and `clear`.

        A device thread that saw the buffer run dry tells the loop the generation it
        saw; if it changed since, new audio (or a stop) made that observation stale.
        """
        with self._lock:
            return self._generation

    def reconfigure(self, device_rate: int, period_frames: int) -> dict[str, int]:
        """Switch to another device rate (a different device came back).

        Audio queued at the old rate cannot be written to the new device: it is dropped
        and, like `stop`, the milliseconds each item had played are returned.
        """
        with self._lock:
            played = self._stop(0)
            self._device_rate = device_rate
            self._period_frames = period_frames
            self._resampler = StreamResampler(self.source_rate, device_rate, self._quality)
            return played

    def set_volume(self, volume: int) -> None:
        """Change the software volume; applies to audio popped from now on."""
        with self._lock:
            self._volume = max(0, min(100, volume))
            self._gain = volume_gain(self._volume)

    def push(self, item_id: str, pcm: bytes) -> None:
        """Queue PCM16 mono audio of `item_id` at the source (24 kHz) rate."""
        with self._lock:
            self._generation += 1
            if item_id != self._item:
                self._flush_resampler()
                self._item = item_id
            retired = self._final.pop(item_id, None)
            if retired is not None and item_id not in self._received:
                self._base[item_id] = retired  # keep counting from what was heard
            self._received[item_id] = self._received.get(item_id, 0) + len(pcm)
            out = self._resampler.process(pcm)
            self._held = not self._resampler.passthrough
            self._enqueue(item_id, out)

    def pop(self, max_frames: int, *, flush: bool = False) -> bytes | None:
        """Take up to `max_frames` frames of audio for the device, volume applied.

        `flush=True` also releases what the resampler still holds: the device thread
        asks for it when the device is about to run dry (end of a response or a late
        delta), since waiting for more audio would then be an audible gap anyway.
        Returns None when there is nothing to play. Report what was really written
        with `record_written`.
        """
        with self._lock:
            if flush:
                self._flush_resampler()
            if max_frames <= 0 or not self._queue:
                return None
            wanted = max_frames * 2
            parts: list[bytes] = []
            while self._queue and wanted > 0:
                item, data = self._queue[0]
                take = data[:wanted]
                if len(take) == len(data):
                    self._queue.popleft()
                else:
                    self._queue[0] = (item, data[wanted:])
                parts.append(take)
                wanted -= len(take)
                self._queued_bytes -= len(take)
                self._note_popped(item, len(take) // 2)
            pcm = b"".join(parts)
            return _apply_gain(pcm, self._gain)

    def silence(self, frames: int) -> bytes:
        """Padding for the device (belongs to no item); record it with `record_written`."""
        with self._lock:
            self._note_popped(None, frames)
        return bytes(frames * 2)

    def record_written(self, frames: int) -> None:
        """`frames` of what was popped (in order) are now in the device."""
        with self._lock:
            while frames > 0 and self._popped:
                segment = self._popped[0]
                item, count = segment.item, segment.frames
                used = min(count, frames)
                start, end = self._written, self._written + used
                if item is not None:
                    spans = self._spans.setdefault(item, [])
                    if spans and spans[-1][1] == start:
                        spans[-1] = (spans[-1][0], end)
                    else:
                        spans.append((start, end))
                    self._real_end = end
                self._written = end
                frames -= used
                if used == count:
                    self._popped.popleft()
                else:
                    segment.frames = count - used

    def played_ms(self, item_id: str, frames_still_in_device: int) -> int:
        """Milliseconds of `item_id`'s 24 kHz audio that have left the device."""
        with self._lock:
            if item_id in self._final:
                return self._final[item_id]
            return self._played_ms(item_id, self._position(frames_still_in_device))

    def played(self, frames_still_in_device: int) -> dict[str, int]:
        """`played_ms` of every item in the ledger."""
        with self._lock:
            position = self._position(frames_still_in_device)
            return {item: self._played_ms(item, position) for item in self._received}

    def unplayed_frames(self, frames_still_in_device: int) -> int:
        """Frames of real audio (not padding) written to the device and not yet heard."""
        with self._lock:
            return max(0, self._real_end - self._position(frames_still_in_device))

    @property
    def has_audio(self) -> bool:
        """True while audio waits in the buffer (or inside the resampler)."""
        with self._lock:
            return bool(self._queue) or self._held

    @property
    def has_unwritten_audio(self) -> bool:
        """True while item audio (not padding) waits to be written to a device.

        That is `has_audio`, or audio popped (or rewound) and not yet recorded written.
        """
        with self._lock:
            return bool(self._queue) or self._held or any(s.item is not None for s in self._popped)

    @property
    def queued_frames(self) -> int:
        """Frames waiting in the buffer (not counting the resampler's look-ahead)."""
        with self._lock:
            return self._queued_bytes // 2

    def stop(self, frames_still_in_device: int) -> dict[str, int]:
        """Barge-in: what each item played up to now, then drop everything queued."""
        with self._lock:
            return self._stop(frames_still_in_device)

    def rewind(self, frames: int) -> None:
        """The device vanished with its last `frames` written frames unplayed.

        They become popped-but-unwritten again, in front of anything popped since, so
        the caller writes their bytes (which it kept) first once a device is back;
        played positions stop counting them as heard.
        """
        with self._lock:
            start = max(0, self._written - frames)
            if start == self._written:
                return
            # The item (or padding) of each rewound frame, in device order.
            pieces = sorted(
                (max(s, start), e, item)
                for item, spans in self._spans.items()
                for s, e in spans
                if e > start
            )
            segments: deque[_Segment] = deque()
            cursor = start
            for begin, end, item in pieces:
                if begin > cursor:
                    _append_segment(segments, None, begin - cursor)
                _append_segment(segments, item, end - begin)
                cursor = end
            if cursor < self._written:
                _append_segment(segments, None, self._written - cursor)
            for item, spans in self._spans.items():
                self._spans[item] = [(s, min(e, start)) for s, e in spans if s < start]
            if self._real_end > start:
                ends = [spans[-1][1] for spans in self._spans.values() if spans]
                self._real_end = max(ends, default=0)
            self._written = start
            for segment in self._popped:
                _append_segment(segments, segment.item, segment.frames)
            self._popped = segments

    def discard_unwritten(self) -> None:
        """Forget what was popped and not written (padding the caller will not write)."""
        with self._lock:
            self._popped.clear()

    def forget_played(self) -> None:
        """The device played everything written: retire items from the ledger.

        Items still waiting in the buffer stay.
        """
        with self._lock:
            position = self._written
            waiting = {item for item, _ in self._queue} | {
                s.item for s in self._popped if s.item is not None
            }
            if self._held and self._item is not None:
                waiting.add(self._item)
            for item in list(self._received):
                if item not in waiting:
                    self._remember({item: self._played_ms(item, position)})
                    del self._received[item]
                    self._spans.pop(item, None)
                    self._base.pop(item, None)

    def clear(self) -> None:
        """Drop all queued audio and the ledger (the device was dropped or lost)."""
        with self._lock:
            self._reset()

    def _stop(self, frames_still_in_device: int) -> dict[str, int]:
        position = self._position(frames_still_in_device)
        result = {item: self._played_ms(item, position) for item in self._received}
        self._remember(result)
        self._reset()
        return result

    def _enqueue(self, item_id: str, pcm: bytes) -> None:
        if pcm:
            self._queue.append((item_id, pcm))
            self._queued_bytes += len(pcm)

    def _flush_resampler(self) -> None:
        if self._item is not None and self._held:
            self._enqueue(self._item, self._resampler.flush())
        self._held = False

    def _note_popped(self, item: str | None, frames: int) -> None:
        _append_segment(self._popped, item, frames)

    def _position(self, frames_still_in_device: int) -> int:
        return self._written - max(0, min(frames_still_in_device, self._written))

    def _played_ms(self, item_id: str, position: int) -> int:
        spans = self._spans.get(item_id, ())
        frames = sum(max(0, min(end, position) - start) for start, end in spans)
        played = frames * 1000 // self._device_rate
        received = self._received.get(item_id, 0) * 1000 // (2 * self.source_rate)
        return self._base.get(item_id, 0) + min(played, received)

    def _remember(self, played: dict[str, int]) -> None:
        for item, ms in played.items():
            self._final[item] = ms
            self._final.move_to_end(item)
        while len(self._final) > _FINAL_KEPT:
            self._final.popitem(last=False)

    def _reset(self) -> None:
        self._generation += 1
        self._queue.clear()
        self._queued_bytes = 0
        self._popped.clear()
        self._spans.clear()
        self._received.clear()
        self._base.clear()
        self._resampler.reset()
        self._held = False
        self._item = None
        self._written = 0
        self._real_end = 0


def _append_segment(segments: deque[_Segment], item: str | None, frames: int) -> None:
    if segments and segments[-1].item == item:
        segments[-1].frames += frames
    else:
        segments.append(_Segment(item, frames))


def _apply_gain(pcm: bytes, gain: float) -> bytes:
    if gain >= 1.0:
        return pcm
    if gain <= 0.0:
        return bytes(len(pcm))
    import numpy as np  # only a lowered volume needs it (see harkd.audio.pcm)

    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) * gain
    out: bytes = np.clip(np.rint(samples), -32768, 32767).astype("<i2").tobytes()
    return out
