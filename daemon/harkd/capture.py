"""Capture: the microphone's frames through the pipeline to the connection.

It owns the mic gate's rules (mute; half duplex while the assistant speaks, plus an
echo tail; full duplex with `barge_in`, and with an echo canceller only once it has
converged), runs the capture pipeline on every frame, streams audio (the server decides
turns) or acts on the local VAD's turn events (the device decides turns), and counts
what it sends into the session's open turn.

With a wake word it also owns the ear (harkd.wake): it reports wake words heard, opens
when told to listen, and holds what it would send while no session is open yet (or
while the devices of a home decide which one answers), so nothing said after a wake
word is lost; it refuses to send any audio while the ear is asleep.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from harkd import events as ev
from harkd.adapters.base import RealtimeConnection
from harkd.audio.base import AudioInput, MeterReading
from harkd.audio.pipeline import (
    CaptureOutput,
    CapturePipeline,
    EchoCanceller,
    Endpoint,
    Stage,
    WakeStage,
    capture_pipeline,
)
from harkd.audio.vad import Endpointer, TurnAudio, TurnClosed, TurnDropped, TurnOpened, VadEvent
from harkd.audio.wakeword import WakeDetection
from harkd.config import VadConfig
from harkd.session import Effect, Session
from harkd.wake import Ear

log = logging.getLogger(__name__)

MAX_HELD_S = 30.0
"""Audio held while a session opens is bounded: past this the oldest is let go."""

ASLEEP_BATCH = 5
"""Frames the microphone hands over at a time while the ear is asleep and the speaker
silent: only the wake word detector hears that audio, up to 80 ms later (measured: the
wake word's end to `B/wake` went from 213 to 246 ms), and the capture thread and the
event loop wake a fifth as often (a daemon waiting for its word: 4.1 -> 1.9 % of a
core here). Awake, or while an answer plays, frames come one by one."""


def reads_in_batches(wake: bool, echo_cancellation: bool) -> bool:
    """Whether the microphone is read in batches while the ear sleeps: with a wake word,
    and not with echo cancellation (the canceller's timing was tuned on frames read one
    by one through a shallow capture buffer; a deeper one moved the echo's timing)."""
    return wake and not echo_cancellation


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
        conditioning: Sequence[Stage] = (),
        wake: WakeStage | None = None,
    ) -> None:
        """`vad` set: the local VAD decides turns (manual mode); `conditioning` stages
        clean the audio up first (echo cancellation); `wake` set: audio leaves only
        after a wake word (`listen`)."""
        self._session = session
        self._apply = apply
        self._connection = connection
        self._provider_rate = provider_rate
        self._barge_in = barge_in
        self._echo_tail_s = echo_tail_ms / 1000
        self._endpoint = Endpoint(Endpointer(vad)) if vad is not None else None
        self._conditioning = conditioning
        self._cancellers = [s for s in conditioning if isinstance(s, EchoCanceller)]
        self._wake = wake
        self._pipeline: CapturePipeline | None = None
        self._quiet_since = 0.0
        self.muted = False
        """True while no microphone audio leaves the device."""
        self.ear = Ear() if wake is not None else None
        """With a wake word: whether audio may leave now."""
        self.on_wake: Callable[[WakeDetection], None] = lambda detection: None
        """Told of every wake word heard (on the event loop)."""
        self.on_dropped: Callable[[], None] = lambda: None
        """Told when a woken turn ends without speech (nothing is answered)."""
        self.holding = False
        """True while audio after a wake word is kept back (the home decides who
        answers); it is sent when this turns False, or forgotten by `forget_held`."""
        self._held: deque[CaptureOutput] = deque()
        self._held_ms = 0.0
        self._in_bytes_per_ms = provider_rate * 2 / 1000

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
        if self.ear is not None and self._endpoint is None:
            self.ear.sleep()  # the server decides turns: just stop streaming
        if self._endpoint is None or not self._endpoint.endpointer.is_open:
            return False
        self._turn_events(self._endpoint.endpointer.close_now())
        return True

    def listen(self, window_s: float) -> None:
        """Woken (a wake word, `cmd/listen`, a follow-up): audio leaves from now on,
        and speech must start within `window_s`. Raises without a wake word."""
        if self.ear is None:
            raise RuntimeError("listen() needs a wake word detector")
        self.ear.wake(window_s)
        self.waive_echo_tail()
        if self._endpoint is not None:
            self._route(self._endpoint.endpointer.open_armed(window_s * 1000))

    def sound_playing(self, sound_ms: float, latency_ms: float) -> None:
        """The device plays a sound of its own (the chime), `sound_ms` long, that the
        microphone hears within `latency_ms`: it must not start a turn by itself."""
        if self._endpoint is not None:
            self._endpoint.endpointer.hold_off(sound_ms, latency_ms)

    def forget_held(self) -> None:
        """Another device answers: what was kept back is forgotten, and the ear sleeps."""
        self._held.clear()
        self._held_ms = 0.0
        self.holding = False
        if self.ear is not None:
            self.ear.sleep()
        if self._endpoint is not None:
            self._endpoint.endpointer.reset()

    def server_event(self, event: ev.ServerEvent) -> None:
        """What the server decided about the user's turn (server VAD)."""
        if self.ear is None:
            return
        if isinstance(event, ev.SpeechStarted):
            self.ear.speech_started()
        elif isinstance(event, ev.ResponseCreated) and self._endpoint is None:
            # The server took the turn and answers it: stop streaming. (Not at its
            # commit: some providers report the user's item before the turn ends.)
            self.ear.sleep()

    def mute(self, muted: bool) -> bool:
        """Mute or unmute; muting forgets what the local VAD heard (True then)."""
        self.muted = muted
        if muted and self.ear is not None:
            self.forget_held()
        if muted and self._endpoint is not None:
            self._endpoint.endpointer.reset()
            return True
        return False

    def waive_echo_tail(self) -> None:
        """The user spoke up (a wake word): what they say next is no echo."""
        self._quiet_since = 0.0

    def _shut(self) -> bool:
        if self.muted:
            return True
        if self.holding:
            # Held audio goes nowhere until the home decided; if this device answers,
            # the answer playing now stops and the words said over it count.
            return False
        if self._barge_in and all(c.echo_free for c in self._cancellers):
            return False
        # Until a canceller has converged the mic would hear the assistant: half duplex.
        # Half duplex: while the assistant talks (and a tail after) the mic is shut.
        if self._session.speaking:
            return True
        return time.monotonic() - self._quiet_since < self._echo_tail_s

    async def run(self, source: AudioInput) -> None:
        """Capture until the source ends (or the task is cancelled)."""
        ear = self.ear
        pipeline = self._pipeline = capture_pipeline(
            source.sample_rate,
            self._provider_rate,
            is_shut=self._shut,
            endpoint=self._endpoint,
            conditioning=self._conditioning,
            wake=self._wake,
            listening=(lambda: ear.listening) if ear is not None else (lambda: True),
        )
        off_loop = pipeline.off_loop  # the stages are fixed: decided once, not per frame
        may_batch = reads_in_batches(ear is not None, bool(self._cancellers))
        batched = 1
        async for frame in source.frames():
            if off_loop:
                outputs = await asyncio.to_thread(pipeline.push, frame)
            else:
                outputs = pipeline.push(frame)
            if self._held and not self._must_hold():
                await self._release_held()
            for output in outputs:
                if isinstance(output, WakeDetection):
                    self.on_wake(output)
                elif self._must_hold():
                    self._hold(output)
                else:
                    await self._deliver(output)
            if may_batch and ear is not None and (batch := self._batch_size(ear)) != batched:
                source.batch(batch)
                batched = batch

    def _batch_size(self, ear: Ear) -> int:
        dozing = not ear.listening and not self.holding and not self._session.speaking
        return ASLEEP_BATCH if dozing else 1

    def _must_hold(self) -> bool:
        # Only a woken device keeps audio back; without a wake word nothing changes.
        return self.ear is not None and (self.holding or self._connection() is None)

    def _hold(self, output: CaptureOutput) -> None:
        self._held.append(output)
        self._held_ms += self._output_ms(output)
        while self._held_ms > MAX_HELD_S * 1000 and len(self._held) > 1:
            self._held_ms -= self._output_ms(self._held.popleft())

    def _output_ms(self, output: CaptureOutput) -> float:
        pcm = output if isinstance(output, bytes) else getattr(output, "payload", b"")
        return len(pcm) / self._in_bytes_per_ms

    async def _release_held(self) -> None:
        held, self._held = self._held, deque()
        log.debug("sending %.0f ms of audio kept since the wake word", self._held_ms)
        self._held_ms = 0.0
        for output in held:
            await self._deliver(output)

    async def _deliver(self, output: CaptureOutput) -> None:
        if isinstance(output, bytes):
            await self._stream(output)
        elif isinstance(output, TurnAudio):
            await self._send(output.payload)
        elif not isinstance(output, WakeDetection):
            self._turn_events((output,))

    async def _stream(self, pcm: bytes) -> None:
        # The server decides turns; a woken ear gives up when no speech starts in time.
        if self.ear is not None and self.ear.expired(time.monotonic()):
            log.info("woken, but nobody spoke: the turn is dropped")
            self._apply(self._session.discard_input())
            self.on_dropped()
            return
        await self._send(pcm)

    def _may_send(self) -> bool:
        # The privacy invariant, enforced where audio leaves: asleep, nothing does.
        return self.ear is None or self.ear.listening

    async def _send(self, pcm: bytes) -> None:
        # Streaming audio is awaited straight onto the socket (see `send_audio`).
        conn = self._connection()
        if self._may_send() and self._session.append_audio(pcm) and conn is not None:
            await conn.send_audio(pcm)

    def _queue(self, pcm: bytes) -> None:
        # From synchronous paths (a turn opened by push-to-talk): behind the queue.
        conn = self._connection()
        if self._may_send() and self._session.append_audio(pcm) and conn is not None:
            conn.send(ev.AppendAudio(pcm))

    def _route(self, events: Iterable[VadEvent]) -> None:
        # Turn events of a push-to-talk or a wake word: kept back like audio if need be.
        for event in events:
            if self._must_hold():
                self._hold(event)
            else:
                self._turn_events((event,))

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
                    if self.ear is not None:
                        self.ear.sleep()
                case TurnDropped():
                    self._apply(self._session.drop_turn())
                    if self.ear is not None and self.ear.listening:
                        heard_ms = (
                            self._endpoint.endpointer.armed_speech_ms if self._endpoint else 0
                        )
                        log.info(
                            "woken, but no speech started: the turn is dropped "
                            "(%d ms of speech heard, too little or held off)",
                            heard_ms,
                        )
                        self.ear.sleep()
                        self.on_dropped()
