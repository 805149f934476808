"""The wake word in the assistant's own voice, found in what the speaker plays.

The wake word detector listens before the half-duplex gate, so that the user's wake
word can stop an answer. Without echo cancellation it hears the speaker as well: an
answer that says "okay nabu" (to "how do I wake you?") would interrupt itself.
Satellites avoid that by listening to their own playback too, and so does harkd: a
second detector, with the same models and thresholds, hears every write the speaker
accepts (the playback thread reports each with when the room will hear it; see
`PlayedSink`). A wake word the microphone hears within `MATCH_EARLY_S` before to
`MATCH_LATE_S` after one the speaker played is the assistant's own voice.

The speaker's detector runs in the playback thread as it writes, ahead of what the
room hears, so its finding is in before the microphone's echo of it.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING

from harkd.audio.base import VAD_RATE, AudioFrame
from harkd.audio.reference import JOIN_TOLERANCE_S
from harkd.audio.resample import StreamResampler

if TYPE_CHECKING:
    from harkd.audio.pipeline import WakeStage
    from harkd.audio.wakeword import WakeDetection
    from harkd.config import WakeConfig

MATCH_EARLY_S = 0.3
"""The microphone may fire this much before the speaker's detector (the two detectors
cross their thresholds at slightly different points of one word)."""
MATCH_LATE_S = 1.0
"""... and this much after: the way through the room and the capture, the echo's
score rising later, and the played position's error through a sound server."""
PAUSE_S = 0.1
"""A write this long after the previous one ended starts a new stream."""
FLUSH_S = 1.0
"""Silence fed before a new stream (up to the pause before it): the models forget the
end of the last answer, as the room did."""
THRESHOLD = 0.5
"""The speaker's detector takes less than the microphone's to count a word: heard
twice, a word at the threshold's edge may cross it on one side only, and a word the
speaker half said only excuses the microphone's detection of it for a moment."""
_FRAME_BYTES = VAD_RATE * 20 // 1000 * 2


class OwnWakeWords:
    """A `PlayedSink` that detects wake words in the speaker's audio, and tells a
    microphone detection that is their echo."""

    @classmethod
    def hearing(cls, wake: WakeConfig) -> OwnWakeWords:
        """For the words of `wake`, each counted from `THRESHOLD` (or a lower one of
        the user's)."""
        from harkd.audio.wakeword import WakeDetector

        def lowered(threshold: float | None) -> float:
            return min(THRESHOLD, threshold or wake.threshold or THRESHOLD)

        words = [
            word.model_copy(update={"threshold": lowered(word.threshold)}) for word in wake.words
        ]
        return cls(WakeDetector(wake.model_copy(update={"words": words})))

    def __init__(self, detector: WakeStage) -> None:
        self._detector = detector
        self._lock = threading.Lock()
        self._said: deque[WakeDetection] = deque(maxlen=32)  # guarded by _lock
        # Playback thread only:
        self._resampler: StreamResampler | None = None
        self._restart = False  # set by `dropped` (another thread): a new stream follows
        self._pending = b""  # 16 kHz audio short of a whole 20 ms frame
        self._pending_end = 0.0  # when the room hears the end of `_pending`

    def played(self, pcm: bytes, rate: int, starts_at: float) -> None:
        """The speaker accepted `pcm`, heard from `starts_at` (playback thread)."""
        pause = starts_at - self._pending_end
        fresh = self._resampler is None or self._restart or self._resampler.in_rate != rate
        if fresh or pause > PAUSE_S:
            # A new stream (an answer, a drop's sequel): the models first hear the
            # pause's silence, as the room did.
            silence = FLUSH_S if fresh else min(FLUSH_S, pause)
            self._restart = False
            self._resampler = StreamResampler(rate, VAD_RATE)
            self._pending = bytes(int(silence * VAD_RATE) * 2)
            self._pending_end = starts_at
        elif abs(pause) > JOIN_TOLERANCE_S:
            # The same stream, but its queue was measured afresh (a stream's first
            # writes, a sound server's sawtooth): follow the device's clock.
            self._pending_end = starts_at
        assert self._resampler is not None
        self._pending += self._resampler.process(pcm)
        self._pending_end += len(pcm) / 2 / rate
        whole = len(self._pending) - len(self._pending) % _FRAME_BYTES
        ends_at = self._pending_end - (len(self._pending) - _FRAME_BYTES) / 2 / VAD_RATE
        for offset in range(0, whole, _FRAME_BYTES):
            frame = self._pending[offset : offset + _FRAME_BYTES]
            self._detector.process(AudioFrame(frame, VAD_RATE, ends_at + offset / 2 / VAD_RATE))
        self._pending = self._pending[whole:]
        said = self._detector.take()
        if said:
            with self._lock:
                self._said.extend(said)

    def dropped(self, at: float) -> None:
        """What was written for after `at` will not be heard."""
        self._restart = True
        with self._lock:
            kept = [said for said in self._said if said.captured_at <= at]
            self._said.clear()
            self._said.extend(kept)

    def said(self, heard: WakeDetection) -> bool:
        """Whether the microphone's `heard` is the speaker playing the same word."""
        with self._lock:
            return any(
                said.word == heard.word
                and said.captured_at - MATCH_EARLY_S
                <= heard.captured_at
                <= said.captured_at + MATCH_LATE_S
                for said in self._said
            )
