"""A room where the microphone hears the daemon's own speaker (PulseAudio null sink):
the client plays through the ALSA `pulse` PCM into the sink and captures its monitor,
with echo cancellation on; "the user" talks by playing speech into the same sink.

Shared by tests/test_echo_room.py and benchmarks/bench_echo.py (no pytest here).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from e2e import Running, fake_client, until
from harkd.audio.alsa import AlsaInput, AlsaOutput
from harkd.audio.echo import AudioProcessing, processing_stages
from harkd.client import RealtimeClient
from harkd.config import ProcessingConfig, VadConfig, WakeConfig
from harkd.events import VadMode
from harkd.messages import MessageFinalized, RealtimeMessage, RealtimeMode, WakeHeard
from harkd.testing import FakeRealtimeServer, FakeScript
from pulse_fixture import SINK, PulseServer, Recording
from speech_fixtures import speech_pcm

KEY = "sk-test-echo-0123456789"
MIC_RATE = 16000
ANSWER = (
    "Here is the weather for the rest of the week: sunny on Monday, clouds on Tuesday, "
    "rain from Wednesday on, and a dry, warm weekend."
)
"""About 7 s of espeak-ng speech: the assistant's voice."""


def speak(text: str) -> bytes:
    """The assistant's voice (FakeScript.speak): espeak-ng at 24 kHz."""
    return speech_pcm(text, rate=24000)


class TappedOutput(AlsaOutput):
    """The ALSA speaker, keeping a copy of each item's audio (what the server sent)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: dict[str, bytearray] = {}

    def play(self, item_id: str, pcm: bytes) -> None:
        self.sent.setdefault(item_id, bytearray()).extend(pcm)
        super().play(item_id, pcm)


@dataclass
class EchoRoom:
    """One client in the room, and what it did."""

    pulse: PulseServer
    client: RealtimeClient
    output: TappedOutput
    stage: AudioProcessing
    finals: list[RealtimeMessage] = field(default_factory=list)
    wakes: list[WakeHeard] = field(default_factory=list)
    modes: list[tuple[float, RealtimeMode]] = field(default_factory=list)
    mic_open_while_speaking: list[bool] = field(default_factory=list)
    learning: list[RealtimeMessage] = field(default_factory=list)
    """The answers that taught the canceller the room (`converge`)."""

    @classmethod
    def build(
        cls,
        pulse: PulseServer,
        server: FakeRealtimeServer,
        vad_mode: VadMode = "server",
        wake: WakeConfig | None = None,
    ) -> EchoRoom:
        """A full-duplex client (barge_in + echo cancellation) on the fake server;
        `wake`: waiting for a wake word."""
        output = TappedOutput("pulse", rate=24000)
        [stage] = processing_stages(ProcessingConfig(echo_cancellation=True), MIC_RATE, output)
        room: EchoRoom
        client = fake_client(
            server,
            KEY,
            audio_input=AlsaInput("pulse", rate=MIC_RATE),
            audio_output=output,
            barge_in=True,
            vad_mode=vad_mode,
            # Residual echo is faint: a level floor keeps webrtcvad (which hears
            # whispers) from taking it for speech, as the README advises.
            vad=VadConfig(min_level=0.01),
            conditioning=[stage],
            wake=wake,
            on_mode_change=lambda m: room.modes.append((time.monotonic(), m)),
        )
        room = cls(pulse, client, output, stage)
        client.on_event(
            lambda e: room.finals.append(e.message) if isinstance(e, MessageFinalized) else None
        )
        client.on_event(lambda e: room.wakes.append(e) if isinstance(e, WakeHeard) else None)
        return room

    def assistant_answers(self) -> list[RealtimeMessage]:
        return [m for m in self.finals if m.role == "assistant"]

    async def answer(self, prompt: str, *, timeout_s: float = 40.0) -> RealtimeMessage:
        """Ask by text and wait for the answer to be played (or cut) to its end, noting
        meanwhile whether the microphone's gate stayed open."""
        count = len(self.assistant_answers())
        self.client.send_text(prompt)
        watch = asyncio.create_task(self._watch_gate())
        try:
            await until(
                lambda: len(self.assistant_answers()) > count, timeout_s, "the assistant's answer"
            )
        finally:
            watch.cancel()
        return self.assistant_answers()[count]

    async def answer_playing(self, prompt: str, played_ms: float = 1500) -> str:
        """Ask by text and wait until `played_ms` of the answer has played; returns the
        answer's item id (it goes on playing)."""
        outputs = len(self.output.sent)
        self.client.send_text(prompt)
        await until(lambda: len(self.output.sent) > outputs, what="the answer")
        item = list(self.output.sent)[-1]
        await until(lambda: self.output.played_ms(item) >= played_ms, what=f"{played_ms} ms")
        return item

    async def converge(self, most: int = 3) -> None:
        """Answers until the canceller has converged (the mic is gated until then),
        kept in `learning`."""
        while not self.stage.echo_free:
            assert len(self.learning) < most, "the canceller did not converge"
            self.learning.append(await self.answer("what is the weather"))

    async def _watch_gate(self) -> None:
        pipeline = self.client._capture._pipeline  # noqa: SLF001 - what the gate did
        while True:
            if pipeline is not None and self.client.mode is RealtimeMode.SPEAKING:
                self.mic_open_while_speaking.append(not pipeline.gate.shut)
            await asyncio.sleep(0.05)

    def say(self, wav: Path) -> subprocess.Popen[bytes]:
        """The user speaks into the room (as the speaker does: the mic hears both)."""
        return subprocess.Popen(
            ["paplay", f"--server={self.pulse.server}", f"--device={SINK}", str(wav)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def record_speaker(pulse: PulseServer, rate: int = 24000) -> Recording:
    """Record what the daemon's speaker alone puts into the room (its sink input, the
    one playback stream there), without the user's voice."""
    listing = subprocess.run(
        ["pactl", f"--server={pulse.server}", "list", "short", "sink-inputs"],
        capture_output=True,
        check=True,
        timeout=10,
    ).stdout.decode()
    [index] = [line.split()[0] for line in listing.splitlines() if line.strip()]
    process = subprocess.Popen(
        [
            "pacat",
            "--record",
            f"--server={pulse.server}",
            f"--monitor-stream={index}",
            "--raw",
            "--format=s16le",
            f"--rate={rate}",
            "--channels=1",
            "--latency-msec=5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    recording = Recording(rate, process)
    recording._thread = threading.Thread(target=recording._pump, daemon=True)  # noqa: SLF001
    recording._thread.start()  # noqa: SLF001
    return recording


def heard_ms(
    recording: npt.NDArray[np.int16], played: bytes, rate: int = 24000
) -> tuple[float, float]:
    """How much of `played` (24 kHz) a recording of the speaker alone holds: from its
    first to its last loud 20 ms block. Returns (heard, slack): the answer is quiet for
    `slack` ms after that point, so a cut anywhere in there sounds the same."""
    block = rate // 50

    def loud(signal: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        count = len(signal) // block
        rms = np.sqrt((signal[: count * block].reshape(count, block) ** 2).mean(axis=1))
        return np.asarray(rms >= 300)

    room = loud(recording.astype(np.float64))
    answer = loud(np.frombuffer(played, dtype="<i2").astype(np.float64))
    [heard_blocks] = np.nonzero(room)
    first, last = int(heard_blocks[0]), int(heard_blocks[-1]) + 1
    start = int(np.argmax(answer))  # the answer's own leading quiet
    heard = start + last - first
    quiet = int(np.argmax(answer[heard:])) if answer[heard:].any() else len(answer) - heard
    return heard * 1000 / (rate / block), quiet * 1000 / (rate / block)


@contextlib.asynccontextmanager
async def converged_room(
    pulse: PulseServer,
    script: FakeScript,
    vad_mode: VadMode = "server",
    wake: WakeConfig | None = None,
    volume: int = 100,
) -> AsyncIterator[tuple[EchoRoom, FakeRealtimeServer]]:
    """A client running in the room against a fake server playing `script`, connected,
    its canceller converged; the speaker at `volume`."""
    async with FakeRealtimeServer(script=script, api_keys={KEY}) as server:
        room = EchoRoom.build(pulse, server, vad_mode, wake)
        room.client.set_volume(volume)
        async with Running(room.client):
            await until(lambda: room.client.status.value == "connected", 20, "connected")
            await room.converge()
            yield room, server
