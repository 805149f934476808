"""Waiting for a wake word: when the microphone's audio may leave the device.

With `wake.enabled` the device is asleep until it hears a wake word (or `cmd/listen`,
or a follow-up window after an answer opens). The `Ear` is that rule, free of I/O:

- asleep: nothing leaves the device (the capture pipeline stops every frame behind
  the wake word detector, and the client refuses to send any audio);
- waiting: woken, audio streams, and speech must start within the window (the wake
  word's `timeout_s`, or `follow_up_s` after an answer), else the turn is dropped;
- turn: speech started; audio streams until the turn ends (the local VAD closes it, or
  the server starts answering it), then the device is asleep again.
"""

from __future__ import annotations

from enum import StrEnum
from importlib.resources import as_file, files
from pathlib import Path

from harkd.audio.resample import StreamResampler
from harkd.audio.wav import read_wav

CHIME = "chime"
"""`wake.sound` of the built-in chime: two short rising notes (E6, A6) at -16 dBFS,
160 ms in all, so that it is over before most people have said their first word."""


class EarState(StrEnum):
    """Where the ear is (see the module docstring)."""

    ASLEEP = "asleep"
    WAITING = "waiting"
    TURN = "turn"


class Ear:
    """When audio may leave a device that waits for a wake word."""

    def __init__(self) -> None:
        self.state = EarState.ASLEEP
        self._window_s = 0.0
        self._deadline: float | None = None

    @property
    def listening(self) -> bool:
        """True while audio may leave the device."""
        return self.state is not EarState.ASLEEP

    def wake(self, window_s: float) -> None:
        """Woken: speech must start within `window_s` of the first audio sent."""
        self.state = EarState.WAITING
        self._window_s = window_s
        self._deadline = None

    def speech_started(self) -> None:
        """The user started talking: the window no longer applies."""
        if self.state is EarState.WAITING:
            self.state = EarState.TURN

    def sleep(self) -> None:
        """The turn ended, was dropped, or another device answers."""
        self.state = EarState.ASLEEP
        self._deadline = None

    def expired(self, now: float) -> bool:
        """Called as audio is sent: True (and asleep) when the window passed without
        speech. The window starts with the first audio sent, so that the time a
        session takes to open is not taken from the user."""
        if self.state is not EarState.WAITING:
            return False
        if self._deadline is None:
            self._deadline = now + self._window_s
            return False
        if now < self._deadline:
            return False
        self.sleep()
        return True


def load_sound(sound: str | None, rate: int) -> bytes:
    """PCM16 mono at `rate` of `wake.sound` (`chime`, `file:PATH.wav`), b"" for None.

    ValueError naming the file when it is not a PCM16 WAV.
    """
    if sound is None:
        return b""
    if sound == CHIME:
        with as_file(files("harkd") / "data" / "chime.wav") as path:
            pcm, source_rate = read_wav(Path(path))
    else:
        pcm, source_rate = read_wav(Path(sound.removeprefix("file:")))
    resampler = StreamResampler(source_rate, rate, quality="HQ")
    if resampler.passthrough:
        return pcm
    return resampler.process(pcm) + resampler.flush()
