"""Local voice activity detection and endpointing for manual turn mode, free of I/O.

The capture loop feeds one frame at a time to `Endpointer.process`: the frame at
16 kHz for the decision, and the same audio as the caller will send it (the
payload, e.g. 24 kHz PCM16 for the provider), which the endpointer only buffers and
hands back. Events come out:

- `TurnOpened(preroll)`: clear the input buffer, append the preroll chunks;
- `TurnAudio(payload)`: append;
- `TurnClosed(reason, speech_ms)`: commit and ask for a response;
- `TurnDropped(speech_ms)`: clear; under 100 ms of speech is never committed.

Between turns nothing comes out but a `TurnOpened`; inside a turn every frame comes
back as `TurnAudio`, the closing silence included.

Decision rules (frames of `frame_ms`, durations rounded up to whole frames):

- A frame is speech when webrtcvad says so and its RMS level is at least
  `min_level` of full scale; the energy floor keeps fans and hum out.
- webrtcvad stretches every sound by its hangover: after a short sound it keeps
  saying "speech" for 60 ms more at aggressiveness 2-3 (80 ms at 0-1, with 20 ms
  frames), so a 20 ms click reads as 80 ms of speech. The opening therefore needs
  `start_ms` plus that short-sound hangover of speech frames, which is `start_ms`
  of actual sound. The later decision costs nothing: the preroll carries the onset.
- A turn opens on a speech frame when that much speech lies within the last that
  much plus one frame: one non-speech frame inside the onset is tolerated (a stop
  consonant, a dropout). Only frames seen since the last close count, so a turn
  never reopens on what closed the previous one.
- The preroll is `preroll_ms` of audio before the first speech frame of that
  opening window, followed by the window's frames up to and including the
  deciding one.
- An open turn closes after `end_silence_ms` of consecutive non-speech
  (`"silence"`), or when it reaches `max_turn_s` counted from the first speech
  frame (`"max_length"`). A turn with under 100 ms of speech is dropped instead.
- After long speech the hangover is about 100 ms at aggressiveness 2-3 (150 ms at
  0-1). Inside an open turn a frame therefore also needs energy within
  `TURN_RANGE_DB` of the turn's loudest speech frame: the hangover's quiet tail
  counts as silence, so a turn closes `end_silence_ms` (plus at most a frame) after
  the speech even with `min_level` 0.
- For `WARMUP_MS` after construction and `reset` no frame counts as speech: a fresh
  webrtcvad calls the first frame of any steady noise speech (plus its hangover),
  which in a room with a fan would open a turn on every reset.
- After a wake word: `open_armed` opens a turn at once, so everything said after the
  wake word is streamed (nothing of it is lost to the opening decision), but the turn
  is armed: it counts no speech and does not close on silence until the opening rule
  above is met; with no speech within its wait it is dropped.
- A hold-off keeps an armed turn from starting on a sound of the device's own (the
  wake chime, `hold_off`) or on a fresh VAD's first frames: for its length the
  opening rule above does not apply. It lasts a window longer than the sound could be
  heard, so the sound alone has left the opening window by then. The sound explains
  at most its own length plus the short-sound hangover of speech, and the fresh VAD
  one frame plus that hangover: once the armed turn has heard more speech than all
  of that plus the opening's, over the sound or in the window after the hold-off,
  the user spoke and the turn starts (speech that straddles the hold-off's end
  counts whole). Later, only the opening rule starts it: sparse clicks counted over
  seconds would add up too. Nothing of what was said is lost either way: an armed
  turn streams every frame.
- Push-to-talk: `open_now` opens a turn regardless of the VAD with the last
  `preroll_ms` as preroll; such a turn does not close on silence, only on
  `close_now` (`"manual"`) or at `max_turn_s`, and all of its audio counts as
  speech, since the user decided.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

import webrtcvad

from ..config import VadConfig
from ..events import MIN_COMMIT_MS
from .base import VAD_RATE

FRAME_MS_CHOICES = (10, 20, 30)
"""The frame lengths webrtcvad accepts."""

TURN_RANGE_DB = 35.0
"""Inside a turn, frames this far below its loudest speech frame count as silence."""
_TURN_RANGE = 10 ** (-TURN_RANGE_DB / 10)

WARMUP_MS = 200
"""After construction and `reset`, frames never count as speech for this long."""

_FULL_SCALE = 32768.0

# webrtcvad's hangover after a short sound, in frames, by aggressiveness and frame
# length (kOverHangMax1* in WebRTC's vad_core.c; measured to match).
_SHORT_HANGOVER_FRAMES = {
    0: {10: 8, 20: 4, 30: 3},
    1: {10: 8, 20: 4, 30: 3},
    2: {10: 6, 20: 3, 30: 2},
    3: {10: 6, 20: 3, 30: 2},
}

CloseReason = Literal["silence", "max_length", "manual"]
"""Why a turn closed: `end_silence_ms` of silence, `max_turn_s`, or `close_now`."""


@dataclass(frozen=True, slots=True)
class TurnOpened:
    """A turn began: send the preroll first (clear the input buffer before)."""

    preroll: tuple[bytes, ...]
    """Payload chunks from before the opening, in order, the deciding frames included."""


@dataclass(frozen=True, slots=True)
class TurnAudio:
    """One payload chunk inside an open turn: send it."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class TurnClosed:
    """The turn ended with enough speech: commit it and ask for a response."""

    reason: CloseReason
    speech_ms: int


@dataclass(frozen=True, slots=True)
class TurnDropped:
    """The turn ended with under `MIN_COMMIT_MS` of speech: clear it, never commit."""

    speech_ms: int


VadEvent = TurnOpened | TurnAudio | TurnClosed | TurnDropped


class Endpointer:
    """Turns a stream of 16 kHz frames into turn events (see the module docstring)."""

    def __init__(self, config: VadConfig, frame_ms: int = 20) -> None:
        """Prepare for frames of `frame_ms` (10, 20 or 30) with the `vad:` settings."""
        if frame_ms not in FRAME_MS_CHOICES:
            raise ValueError(f"frame_ms must be one of {FRAME_MS_CHOICES}, got {frame_ms!r}")
        self._config = config
        self._frame_ms = frame_ms
        samples = VAD_RATE * frame_ms // 1000
        self._frame_bytes = 2 * samples
        hangover = _SHORT_HANGOVER_FRAMES[config.aggressiveness][frame_ms]
        self._hangover = hangover
        self._start_frames = _frames(config.start_ms, frame_ms) + hangover
        self._window_frames = self._start_frames + 1  # one non-speech frame tolerated
        self._window_mask = (1 << self._window_frames) - 1
        self._end_frames = _frames(config.end_silence_ms, frame_ms)
        self._max_frames = _frames(config.max_turn_s * 1000, frame_ms)
        self._preroll_frames = math.ceil(config.preroll_ms / frame_ms)
        self._warmup_frames = _frames(WARMUP_MS, frame_ms)
        # Compare the sum of squares with a precomputed bound: no sqrt per frame.
        self._min_energy = (config.min_level * _FULL_SCALE) ** 2 * samples
        self._ring: deque[bytes] = deque(maxlen=self._preroll_frames + self._window_frames)
        self.reset()

    def reset(self) -> None:
        """Forget everything, an open turn included (e.g. after the mic was muted)."""
        self._vad = webrtcvad.Vad(self._config.aggressiveness)  # its noise model too
        self._warmup_left = self._warmup_frames
        self._ring.clear()
        # Bit i set = the frame i frames ago was speech (bit 0 = the newest).
        self._window = 0
        self._open = False
        self._manual = False
        self._armed = False
        self._wait_left = 0
        self._hold_left = 0
        self._count_left = 0
        self._hold_explained = 0
        self._armed_speech = 0
        self._turn_frames = 0
        self._speech_frames = 0
        self._silent_run = 0
        self._peak_energy = 0.0

    @property
    def is_open(self) -> bool:
        """True while a turn is open."""
        return self._open

    @property
    def armed_speech_ms(self) -> int:
        """Speech frames the last armed turn heard before it started or was dropped
        (held off or too little to start it), in ms: why a wake word went unanswered."""
        return self._armed_speech * self._frame_ms

    @property
    def speech_ms(self) -> int:
        """Speech in the open turn so far (all of it for push-to-talk); 0 when idle."""
        frames = self._turn_frames if self._manual else self._speech_frames
        return frames * self._frame_ms if self._open else 0

    @property
    def frame_bytes(self) -> int:
        """Size of the 16 kHz PCM16 frame `process` expects."""
        return self._frame_bytes

    def process(self, pcm16k: bytes, payload: bytes) -> list[VadEvent]:
        """Decide on one frame of 16 kHz PCM16 mono; `payload` is what gets sent."""
        if len(pcm16k) != self._frame_bytes:
            raise ValueError(
                f"expected {self._frame_bytes} bytes ({self._frame_ms} ms at 16 kHz), "
                f"got {len(pcm16k)}"
            )
        speech = self._is_speech(pcm16k)
        if self._warmup_left:
            self._warmup_left -= 1
            speech = False
        if not self._open:
            self._ring.append(payload)
            self._window = ((self._window << 1) | speech) & self._window_mask
            if speech and self._window.bit_count() >= self._start_frames:
                return [self._open_from_window()]
            return []

        self._turn_frames += 1
        if self._armed:
            return self._armed_frame(speech, payload)
        if speech:
            self._speech_frames += 1
            self._silent_run = 0
        else:
            self._silent_run += 1
        if not self._manual and self._silent_run >= self._end_frames:
            return [TurnAudio(payload), self._close("silence")]
        if self._turn_frames >= self._max_frames:
            return [TurnAudio(payload), self._close("max_length")]
        return [TurnAudio(payload)]

    def open_now(self) -> list[VadEvent]:
        """Push-to-talk pressed: open a turn now with the last `preroll_ms` as preroll.

        Pressed while a VAD turn is open, that turn becomes a push-to-talk turn
        (it no longer closes on silence) and nothing is returned.
        """
        if self._open:
            self._manual = True
            return []
        recent = list(self._ring)
        preroll = tuple(recent[max(0, len(recent) - self._preroll_frames) :])
        self._start_turn(manual=True, turn_frames=0, speech_frames=0)
        return [TurnOpened(preroll)]

    def open_armed(self, wait_ms: float) -> list[VadEvent]:
        """A wake word was heard: open an armed turn now (see the module docstring),
        dropped unless speech starts within `wait_ms`; whatever was open before is
        forgotten."""
        self.reset()
        # The fresh VAD's first frames are held off rather than lost to a warm-up.
        self._warmup_left = 0
        self._hold_left = self._warmup_frames
        self._count_left = self._hold_left + self._window_frames
        self._hold_explained = 1 + self._hangover
        self._start_turn(manual=False, turn_frames=0, speech_frames=0)
        self._armed = True
        self._wait_left = _frames(wait_ms, self._frame_ms)
        return [TurnOpened(())]

    def hold_off(self, sound_ms: float, latency_ms: float) -> None:
        """While the turn is armed, a sound of the device's own, `sound_ms` long and
        heard within `latency_ms` of now, cannot start it (see the module docstring).
        Once speech started it changes nothing: the user talks."""
        if not self._armed:
            return
        # The sound must have left the opening window when the hold-off ends.
        heard_for = _frames(sound_ms + latency_ms, self._frame_ms) + self._window_frames
        self._hold_left = max(self._hold_left, heard_for)
        self._count_left = self._hold_left + self._window_frames
        self._hold_explained += _frames(sound_ms, self._frame_ms) + self._hangover

    def close_now(self) -> list[VadEvent]:
        """Push-to-talk released: close the open turn (nothing when none is open)."""
        if not self._open:
            return []
        return [self._close("manual")]

    def _armed_frame(self, speech: bool, payload: bytes) -> list[VadEvent]:
        self._window = ((self._window << 1) | speech) & self._window_mask
        self._armed_speech += speech
        started = 0
        if self._hold_left:
            self._hold_left -= 1
        # The device's own sounds explain at most `_hold_explained` speech frames:
        # beyond that, over them or in the window after, the user spoke. Counted no
        # further: sparse clicks over seconds are no opening.
        over = 0
        if self._count_left:
            self._count_left -= 1
            over = self._armed_speech - self._hold_explained
        if speech and over >= self._start_frames:
            started = over
        elif speech and not self._hold_left and self._window.bit_count() >= self._start_frames:
            started = self._window.bit_count()
        if started:
            self._armed = False  # speech started: from here on an ordinary turn
            self._speech_frames = started
            self._window = 0
            return [TurnAudio(payload)]
        self._wait_left -= 1
        if self._wait_left <= 0 or self._turn_frames >= self._max_frames:
            return [TurnAudio(payload), self._close("silence")]  # no speech: dropped
        return [TurnAudio(payload)]

    def _is_speech(self, pcm16k: bytes) -> bool:
        if not self._vad.is_speech(pcm16k, VAD_RATE):
            return False
        if not self._open and self._min_energy <= 0:
            return True  # between turns: no numpy on the idle path
        energy = _energy(pcm16k)
        if energy < self._min_energy:
            return False
        if not self._open:
            return True
        # Inside a turn, webrtcvad's hangover after the last word is far quieter
        # than the words: count it as silence so the close is not delayed by it.
        self._peak_energy = max(self._peak_energy, energy)
        return energy >= self._peak_energy * _TURN_RANGE

    def _open_from_window(self) -> TurnOpened:
        # bit_length = frames from the oldest speech frame in the window to now.
        onset = self._window.bit_length()
        recent = list(self._ring)
        preroll = tuple(recent[max(0, len(recent) - self._preroll_frames - onset) :])
        self._start_turn(manual=False, turn_frames=onset, speech_frames=self._window.bit_count())
        return TurnOpened(preroll)

    def _start_turn(self, *, manual: bool, turn_frames: int, speech_frames: int) -> None:
        self._open = True
        self._manual = manual
        self._turn_frames = turn_frames
        self._speech_frames = speech_frames
        self._silent_run = 0
        self._peak_energy = 0.0
        # The ring's audio now belongs to this turn; the window must refill afresh.
        self._ring.clear()
        self._window = 0

    def _close(self, reason: CloseReason) -> VadEvent:
        speech_ms = self.speech_ms
        self._open = False
        self._manual = self._armed = False
        self._turn_frames = self._speech_frames = self._silent_run = 0
        if speech_ms < MIN_COMMIT_MS:
            return TurnDropped(speech_ms)
        return TurnClosed(reason, speech_ms)


def _energy(pcm16k: bytes) -> float:
    # float32: int16 products would overflow; a 480-sample dot costs ~2 µs. numpy is
    # imported here, not with the module, so that server VAD never loads it.
    import numpy as np

    samples = np.frombuffer(pcm16k, dtype="<i2").astype(np.float32)
    return float(samples @ samples)


def _frames(ms: float, frame_ms: int) -> int:
    """Whole frames covering at least `ms` (never fewer than one)."""
    # The epsilon keeps float noise (0.3 s * 1000 = 300.00000000000006) from adding one.
    return max(1, math.ceil(ms / frame_ms - 1e-9))
