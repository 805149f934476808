"""The capture pipeline: small stages between the microphone and the provider.

    (conditioning: echo cancel) -> meter -> [16 kHz -> wake word -> ear]
          -> gate -> resample to 16 kHz -> endpointer -> provider rate

Every stage is a plain object that takes an `AudioFrame` (which carries its own
sample rate) and hands one on, or None to stop it there; none does I/O or touches the
event loop, so each is unit-tested with arrays. The meter measures the conditioned
audio: with echo cancellation on, the level shown is what the assistant listens to.
The provider-rate stage converts the gated frame itself, not the 16 kHz analysis
copy, so the provider hears the full band.

The wake word detector hears every frame, before the half-duplex gate, so that the
wake word can stop an answer; with echo cancellation it hears the canceller's output
before the canceller's own residual-echo gate, which holds the start of a word said
over the speaker back until it is sure of it. Behind the detector the ear lets nothing
on while the device waits for a wake word (the privacy invariant: no audio from
before one ever leaves).

`CapturePipeline.push` returns what the client must do with one captured frame: PCM to
stream now (the server decides turns), the endpointer's turn events (the device
decides turns), and wake words heard. Stages marked `heavy` (inference, echo
cancellation) make the whole push run in a worker thread, off the event loop; numpy
and the models release the GIL.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from harkd.audio.base import VAD_RATE, AudioFrame
from harkd.audio.meter import LevelMeter
from harkd.audio.resample import StreamResampler
from harkd.audio.vad import Endpointer, VadEvent
from harkd.audio.wakeword import WakeDetection

VAD_FRAME_MS = 20
"""The endpointer's frame: webrtcvad takes whole 10, 20 or 30 ms frames."""

CaptureOutput = bytes | VadEvent | WakeDetection
"""PCM (at the provider's rate) to stream now, a turn event of the endpointer, or a
wake word heard."""


class Stage(Protocol):
    """One step of the pipeline."""

    heavy: bool
    """True when the stage costs more than a fraction of a millisecond per frame."""

    def process(self, frame: AudioFrame) -> AudioFrame | None:
        """The frame for the next stage, or None when nothing goes on."""


@runtime_checkable
class EchoCanceller(Protocol):
    """A conditioning stage that removes the speaker's echo from the microphone."""

    @property
    def echo_free(self) -> bool:
        """True once its output no longer carries the assistant's voice (converged)."""

    @property
    def ungated(self) -> AudioFrame | None:
        """The last frame as the canceller left it, before its residual-echo gate (None
        without a gate): what the wake word detector hears. The gate holds back the
        start of a word said over the speaker until it is sure of it, and the detector
        would miss the word."""


class WakeStage(Stage, Protocol):
    """A wake word detector: looks at every 16 kHz frame, reports what it heard."""

    def take(self) -> list[WakeDetection]:
        """The wake words heard since the last call."""


class Meter:
    """Feeds the input level meter (audio visualization) with every captured frame."""

    heavy = False

    def __init__(self, sample_rate: int) -> None:
        self.meter = LevelMeter(sample_rate)

    def process(self, frame: AudioFrame) -> AudioFrame:
        """Measure and pass on."""
        self.meter.feed(frame.pcm, frame.captured_at)
        return frame


class Gate:
    """Mute and half duplex: while `is_shut()` no audio goes on."""

    heavy = False

    def __init__(self, is_shut: Callable[[], bool]) -> None:
        self._is_shut = is_shut
        self.shut = False
        """Whether the last frame was held back."""

    def process(self, frame: AudioFrame) -> AudioFrame | None:
        """Pass the frame, or hold it back while shut."""
        self.shut = self._is_shut()
        return None if self.shut else frame


class Resample:
    """Converts frames to `rate` (a streaming resampler: no clicks at frame joins)."""

    heavy = False

    def __init__(self, in_rate: int, rate: int) -> None:
        self.rate = rate
        self._resampler = StreamResampler(in_rate, rate)
        self._passthrough = self._resampler.passthrough  # asked 50 times a second

    def process(self, frame: AudioFrame) -> AudioFrame:
        """The frame at `rate` (the same object when no conversion is needed)."""
        if self._passthrough:
            return frame
        return AudioFrame(self._resampler.process(frame.pcm), self.rate, frame.captured_at)


class Endpoint:
    """The local VAD deciding turns, fed whole 16 kHz frames.

    Frames arrive in the microphone's period; webrtcvad wants exactly 20 ms, so the
    stage regroups them, and the provider-rate payload rides along with the VAD frame
    it ends in.
    """

    def __init__(self, endpointer: Endpointer) -> None:
        self.endpointer = endpointer
        self._frame_bytes = VAD_RATE * VAD_FRAME_MS // 1000 * 2
        self._pending = b""
        self._payload = b""

    def process(self, frame16k: AudioFrame, payload: bytes) -> list[VadEvent]:
        """Turn events for this frame (often none)."""
        self._pending += frame16k.pcm
        self._payload += payload
        events: list[VadEvent] = []
        while len(self._pending) >= self._frame_bytes:
            chunk = self._pending[: self._frame_bytes]
            self._pending = self._pending[self._frame_bytes :]
            payload, self._payload = self._payload, b""
            events += self.endpointer.process(chunk, payload)
        return events

    def gate_shut(self) -> None:
        """The gate closed: what the VAD heard before the assistant spoke is no
        preroll for what the user says after it."""
        if not self.endpointer.is_open:
            self.endpointer.reset()


@dataclass
class CapturePipeline:
    """The stages, in order, for one microphone."""

    meter: Meter
    gate: Gate
    to_analysis: Resample
    to_provider: Resample
    endpoint: Endpoint | None = None
    conditioning: Sequence[Stage] = ()
    """Before the meter and the gate (echo cancellation)."""
    wake: WakeStage | None = None
    """Hears every conditioned frame at 16 kHz (an echo canceller's before its own
    gate), before the half-duplex gate."""
    to_wake: Resample | None = None
    """What the wake word hears at 16 kHz, when that is not the conditioned frame."""
    listening: Callable[[], bool] = lambda: True
    """The ear: False while waiting for a wake word (nothing goes on)."""

    def __post_init__(self) -> None:
        self._canceller = next(
            (stage for stage in self.conditioning if isinstance(stage, EchoCanceller)), None
        )

    @property
    def off_loop(self) -> bool:
        """Whether `push` should run in a worker thread."""
        stages = (*self.conditioning, *((self.wake,) if self.wake is not None else ()))
        return any(stage.heavy for stage in stages)

    def push(self, frame: AudioFrame) -> list[CaptureOutput]:
        """Everything one captured frame leads to, in order."""
        conditioned = frame
        for stage in self.conditioning:
            processed = stage.process(conditioned)
            if processed is None:
                return []
            conditioned = processed
        self.meter.process(conditioned)
        outputs: list[CaptureOutput] = []
        frame16k: AudioFrame | None = None
        if self.wake is not None:
            ungated = self._canceller.ungated if self._canceller is not None else None
            if ungated is not None and self.to_wake is not None:
                # The canceller's output before its gate; the endpointer resamples
                # the gated frame itself, below.
                self.wake.process(self.to_wake.process(ungated))
            else:
                # Fed every frame (the resampler keeps state): the endpointer reuses it.
                frame16k = self.to_analysis.process(conditioned)
                self.wake.process(frame16k)
            outputs += self.wake.take()
            if not self.listening():
                return outputs
        was_shut = self.gate.shut
        gated = self.gate.process(conditioned)
        if gated is None:
            if self.gate.shut and not was_shut and self.endpoint is not None:
                self.endpoint.gate_shut()
            return outputs
        payload = self.to_provider.process(gated).pcm
        if self.endpoint is None:
            if payload:
                outputs.append(payload)
            return outputs
        if frame16k is None:
            frame16k = self.to_analysis.process(gated)
        outputs += self.endpoint.process(frame16k, payload)
        return outputs


def capture_pipeline(
    input_rate: int,
    provider_rate: int,
    *,
    is_shut: Callable[[], bool],
    endpoint: Endpoint | None = None,
    conditioning: Sequence[Stage] = (),
    wake: WakeStage | None = None,
    listening: Callable[[], bool] = lambda: True,
) -> CapturePipeline:
    """The pipeline for a microphone at `input_rate`, assembled in one place."""
    return CapturePipeline(
        meter=Meter(input_rate),
        gate=Gate(is_shut),
        to_analysis=Resample(input_rate, VAD_RATE),
        to_provider=Resample(input_rate, provider_rate),
        to_wake=Resample(input_rate, VAD_RATE) if wake is not None and conditioning else None,
        endpoint=endpoint,
        conditioning=conditioning,
        wake=wake,
        listening=listening,
    )
