"""Capture: the microphone's frames through the pipeline to the connection.

It owns the mic gate's rules (mute; half duplex while the assistant speaks, plus an
echo tail; full duplex with `barge_in`, and with an echo canceller only once it has
converged), runs the capture pipeline on every frame, streams audio (the server decides
turns) or acts on the local VAD's turn events (the device decides turns), and counts
what it sends into the session's open turn.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Sequence

from harkd.adapters.base import RealtimeConnection
from harkd.audio.base import AudioInput, MeterReading
from harkd.audio.pipeline import (
    CapturePipeline,
    EchoCanceller,
    Endpoint,
    Stage,
    capture_pipeline,
)
from harkd.audio.vad import Endpointer, TurnAudio, TurnClosed, TurnDropped, TurnOpened, VadEvent
from harkd.config import VadConfig
from harkd.events import AppendAudio
from harkd.session import Effect, Session


class Capture:
    """The microphone side of one client."""

    def __init__(
        self,
        session: Session,
        apply: Callable[[Iterable[Effect]], None],
        connection: Callable[[], RealtimeConnection | None],
        *,
        provider_rate: int,
        barge_in: bool = False,
        echo_tail_ms: int = 300,
        vad: VadConfig | None = None,
        analysis: Sequence[Stage] = (),
        conditioning: Sequence[Stage] = (),
    ) -> None:
        """`vad` set: the local VAD decides turns (manual mode); `analysis` stages
        look at the 16 kHz audio before the VAD (a wake word); `conditioning` stages
        clean the microphone's audio first (echo cancellation)."""
        self._session = session
        self._apply = apply
        self._connection = connection
        self._provider_rate = provider_rate
        self._barge_in = barge_in
        self._echo_tail_s = echo_tail_ms / 1000
        self._endpoint = Endpoint(Endpointer(vad)) if vad is not None else None
        self._analysis = analysis
        self._conditioning = conditioning
        self._cancellers = [s for s in conditioning if isinstance(s, EchoCanceller)]
        self._pipeline: CapturePipeline | None = None
        self._quiet_since = 0.0
        self.muted = False
        """True while no microphone audio leaves the device."""

    def reading(self) -> MeterReading:
        """The input level and spectrum (audio visualization)."""
        return self._pipeline.meter.meter.reading() if self._pipeline else MeterReading()

    def speaker_quiet(self) -> None:
        """The assistant stopped talking: the echo tail starts now."""
        self._quiet_since = time.monotonic()

    def open_turn(self) -> bool:
        """Push-to-talk: open a local-VAD turn now; False without a local VAD."""
        if self._endpoint is None or self._pipeline is None:
            return False
        self._turn_events(self._endpoint.endpointer.open_now())
        return True

    def close_turn(self) -> bool:
        """Close an open local-VAD turn now; False when there is none."""
        if self._endpoint is None or not self._endpoint.endpointer.is_open:
            return False
        self._turn_events(self._endpoint.endpointer.close_now())
        return True

    def mute(self, muted: bool) -> bool:
        """Mute or unmute; muting forgets what the local VAD heard (True then)."""
        self.muted = muted
        if muted and self._endpoint is not None:
            self._endpoint.endpointer.reset()
            return True
        return False

    def _shut(self) -> bool:
        if self.muted:
            return True
        if self._barge_in and all(c.echo_free for c in self._cancellers):
            return False
        # Until a canceller has converged the mic would hear the assistant: half duplex.
        # Half duplex: while the assistant talks (and a tail after) the mic is shut.
        if self._session.speaking:
            return True
        return time.monotonic() - self._quiet_since < self._echo_tail_s

    async def run(self, source: AudioInput) -> None:
        """Capture until the source ends (or the task is cancelled)."""
        pipeline = self._pipeline = capture_pipeline(
            source.sample_rate,
            self._provider_rate,
            is_shut=self._shut,
            endpoint=self._endpoint,
            analysis=self._analysis,
            conditioning=self._conditioning,
        )
        off_loop = pipeline.off_loop  # the stages are fixed: decided once, not per frame
        async for frame in source.frames():
            if off_loop:
                outputs = await asyncio.to_thread(pipeline.push, frame)
            else:
                outputs = pipeline.push(frame)
            for output in outputs:
                if isinstance(output, bytes):
                    await self._send(output)
                elif isinstance(output, TurnAudio):
                    await self._send(output.payload)
                else:
                    self._turn_events((output,))

    async def _send(self, pcm: bytes) -> None:
        # Streaming audio is awaited straight onto the socket (see `send_audio`).
        conn = self._connection()
        if self._session.append_audio(pcm) and conn is not None:
            await conn.send_audio(pcm)

    def _queue(self, pcm: bytes) -> None:
        # From synchronous paths (a turn opened by push-to-talk): behind the queue.
        conn = self._connection()
        if self._session.append_audio(pcm) and conn is not None:
            conn.send(AppendAudio(pcm))

    def _turn_events(self, events: Iterable[VadEvent]) -> None:
        for event in events:
            match event:
                case TurnOpened(preroll=preroll):
                    self._apply(self._session.start_listening())
                    for chunk in preroll:
                        self._queue(chunk)
                case TurnAudio(payload=payload):
                    self._queue(payload)
                case TurnClosed():
                    self._apply(self._session.stop_listening())
                case TurnDropped():
                    self._apply(self._session.drop_turn())
