"""Echo cancellation (harkd.audio.echo) in a PulseAudio room where the microphone hears
the speaker: the ALSA `pulse` PCM plays into the null sink and captures its monitor.

Per round, reported as medians over rounds (JSON on stdout when run alone):

- erle_db: echo removed once converged, over a second spoken answer (espeak-ng), as
  10 log10(mic energy / output energy) over the frames where the speaker plays; for
  AEC3 alone (`erle_aec3_db`) and for what the VAD gets, after the residual gate
  (`erle_db`);
- converge_s: seconds of speaker audio until the stage declared convergence;
- double_talk_share: webrtcvad's voiced 20 ms frames of the user's sentence while the
  assistant speaks, over the same sentence said in a quiet room (target >= 0.9); also
  for AEC3's output before the residual gate (`double_talk_share_aec3`). This counts
  voiced frames in a window, whatever they hold: echo that got through, and the VAD's
  hangover, count as the user's;
- double_talk_share_aligned: frame by frame instead. Of the user's voiced frames in
  the quiet room, the share still voiced at the same place in the double-talk output
  (the quiet take is found in the double-talk microphone by cross-correlation); also
  for AEC3's output (`double_talk_share_aec3_aligned`), which the stage replaces by its
  double-talk filter's while the user talks over the speaker;
- cpu_percent: CPU time of the stage (AEC3 and the residual gate) per second of
  audio, % of one core (offline, on the audio the room delivered);
- barge_in_ms: with the whole client (fake server, server VAD, barge_in + echo
  cancellation): onset of the user's speech in the room -> the daemon's speaker stream
  silent;
- wake_over_answer: with the whole client waiting for a wake word, whether "okay nabu,
  what time is it in tokyo" said 1.5 s into an answer is heard, with the echo as loud
  as the user (`full`: the speaker at full volume) and 6 dB under (`minus_6db`);
  counted over rounds, not a median.

Run: .venv/bin/python benchmarks/bench_echo.py [--rounds 3]   (about 90 s a round)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import webrtcvad

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from e2e import until  # noqa: E402
from echo_room import ANSWER, converged_room, record_speaker, speak  # noqa: E402
from harkd.audio.alsa import AlsaInput, AlsaOutput  # noqa: E402
from harkd.audio.base import AudioFrame  # noqa: E402
from harkd.audio.echo import AudioProcessing, ResidualGate, processing_stages  # noqa: E402
from harkd.config import ProcessingConfig, WakeConfig  # noqa: E402
from harkd.testing import FakeScript  # noqa: E402
from pulse_fixture import SINK, PulseServer, Recording  # noqa: E402
from speech_fixtures import silence, speech_pcm, write_wav  # noqa: E402

RATE = 16000
FRAME = 320
USER = "what time is it in tokyo"


class _Quiet:
    def device_failed(self, device: str, message: str) -> None:
        print(f"device {device} failed: {message}", file=sys.stderr)

    def device_recovered(self, device: str) -> None:
        pass


def _energy(x: npt.NDArray[np.int16]) -> float:
    return float(np.sum(x.astype(np.float64) ** 2))


class _Trace:
    """Audio through the stage, as streams: raw mic, reference, AEC3 output, gated
    output. The stage may hold audio back (a frame waiting for its reference) and hand
    it on with a later frame, so its output is lined up
    with the input by position in the stream, not by call."""

    def __init__(self, stage: AudioProcessing) -> None:
        self.stage = stage
        self.frames: list[tuple[float, int]] = []  # (capture stamp, samples) per frame
        self._streams: dict[str, list[Any]] = {"near": [], "far": [], "aec": [], "gated": []}
        gate = stage._gate  # noqa: SLF001 - the bench reads both sides of the gate
        original = gate.apply

        def apply(near: Any, far: Any, out: Any, level: float = 1.0) -> Any:
            gated = original(near, far, out, level)
            for name, chunk in (("near", near), ("far", far), ("aec", out), ("gated", gated)):
                self._streams[name].append(chunk.copy())
            return gated

        gate.apply = apply  # type: ignore[method-assign]

    def process(self, frame: AudioFrame) -> None:
        self.frames.append((frame.captured_at, len(frame.pcm) // 2))
        self.stage.process(frame)

    def stream(self, name: str) -> npt.NDArray[np.int16]:
        chunks = self._streams[name]
        return np.concatenate(chunks).astype(np.int16) if chunks else np.zeros(0, np.int16)

    def rows(self) -> list[tuple[float, Any, Any, Any, float]]:
        """Per input frame: (stamp, mic, AEC3 output, gated output, reference RMS);
        built from the streams on each call, so call it once the pass is over."""
        near, far, aec, gated = (self.stream(n) for n in ("near", "far", "aec", "gated"))
        rows = []
        offset = 0
        for stamp, count in self.frames:
            end = offset + count
            if end > len(gated):
                break  # still held in the stage when the pass ended
            part = slice(offset, end)
            rms = float(np.sqrt(np.mean(far[part].astype(float) ** 2)))
            rows.append((stamp, near[part], aec[part], gated[part], rms))
            offset = end
        return rows


async def _room_pass(
    pulse: PulseServer,
    stage: AudioProcessing,
    output: AlsaOutput,
    answers: int,
    user_wav: Path | None,
) -> tuple[_Trace, float | None, float]:
    """Play `answers` spoken answers (the user talks over the last one when given);
    returns the trace, when the user started (monotonic) and the user's length (s)."""
    mic = AlsaInput("pulse", rate=RATE)
    await mic.start(_Quiet())
    trace = _Trace(stage)

    async def capture() -> None:
        async for frame in mic.frames():
            await asyncio.to_thread(trace.process, frame)

    task = asyncio.create_task(capture())
    answer = speak(ANSWER)
    user_at = None
    user_s = 0.0
    try:
        await asyncio.sleep(0.3)
        for index in range(answers):
            output.play(f"a{index}", answer)
            if user_wav is not None and index == answers - 1:
                await asyncio.sleep(2.0)
                user_at = time.monotonic()
                user_s = len(speech_pcm(USER, rate=24000, voice="en-gb")) / 48000
                await asyncio.to_thread(
                    subprocess.run,
                    ["paplay", f"--server={pulse.server}", f"--device={SINK}", str(user_wav)],
                    check=True,
                    timeout=20,
                )
            await until(lambda: not output.is_playing, 30, "the answer played")
            await asyncio.sleep(0.4)
    finally:
        task.cancel()
        await mic.stop()
    return trace, user_at, user_s


def _voiced(rows: list[Any], start: float, end: float, column: int) -> int:
    vad = webrtcvad.Vad(2)
    return sum(
        vad.is_speech(row[column].astype("<i2").tobytes(), RATE)
        for row in rows
        if start <= row[0] <= end and len(row[column]) == FRAME
    )


def _stream_index(trace: _Trace, at: float) -> int:
    """Where in the trace's streams the frame captured at `at` starts."""
    index = 0
    for stamp, count in trace.frames:
        if stamp >= at:
            return index
        index += count
    return index


def _aligned_shares(
    talk: _Trace, talk_at: float, alone: _Trace, alone_at: float, user_s: float
) -> dict[str, float]:
    """Of the user's voiced frames in the quiet room, the share voiced at the same place
    in the double-talk pass, per output stream ("aec", "gated")."""
    start = _stream_index(alone, alone_at)
    said = alone.stream("near")[start : start + int((user_s + 0.5) * RATE)]
    heard_at = _stream_index(talk, talk_at)
    mic = talk.stream("near")[heard_at : heard_at + len(said) + RATE].astype(np.float64)
    # Plain cross-correlation: the echo is as loud as the user, and a whitened one
    # (GCC-PHAT) locked onto it in half the replayed rounds.
    size = 1 << (len(mic) + len(said)).bit_length()
    spectrum = np.fft.rfft(mic, size) * np.conj(np.fft.rfft(said.astype(np.float64), size))
    offset = heard_at + int(np.argmax(np.fft.irfft(spectrum, size)[: RATE + 1]))
    # A fresh VAD per frame: webrtcvad keeps state (its hangover) from call to call,
    # and each frame is to be judged on its own.
    voiced = [
        i
        for i in range(0, len(said) - FRAME + 1, FRAME)
        if webrtcvad.Vad(2).is_speech(said[i : i + FRAME].tobytes(), RATE)
    ]
    shares = {}
    for name in ("aec", "gated"):
        out = talk.stream(name)
        kept = sum(
            webrtcvad.Vad(2).is_speech(out[offset + i : offset + i + FRAME].tobytes(), RATE)
            for i in voiced
            if offset + i + FRAME <= len(out)
        )
        shares[name] = kept / len(voiced) if voiced else 0.0
    return shares


async def canceller_round(pulse: PulseServer, user_wav: Path) -> dict[str, Any]:
    """ERLE, convergence and double talk with the stage alone on the room."""
    output = AlsaOutput("pulse", rate=24000)
    await output.start(_Quiet())
    try:
        [stage] = processing_stages(ProcessingConfig(echo_cancellation=True), RATE, output)
        trace, _, _ = await _room_pass(pulse, stage, output, 2, None)
        assert stage.convergence is not None
        converge_s = stage.convergence.converged_after_s
        # The second answer: the canceller has converged.
        rows = trace.rows()
        speaking = [r for r in rows[len(rows) // 2 :] if r[4] > 0.003]
        mic = sum(_energy(r[1]) for r in speaking)
        erle_aec3 = 10 * np.log10(mic / max(1.0, sum(_energy(r[2]) for r in speaking)))
        erle = 10 * np.log10(mic / max(1.0, sum(_energy(r[3]) for r in speaking)))
        # Double talk: the user over a third answer, then alone in a quiet room.
        talk, user_at, user_s = await _room_pass(pulse, stage, output, 1, user_wav)
        assert user_at is not None
        talk_rows = talk.rows()
        over = _voiced(talk_rows, user_at, user_at + user_s + 0.5, 3)
        over_aec3 = _voiced(talk_rows, user_at, user_at + user_s + 0.5, 2)
        quiet_stage = processing_stages(ProcessingConfig(echo_cancellation=True), RATE, output)[0]
        alone, alone_at, _ = await _alone(pulse, quiet_stage, user_wav)
        alone_voiced = _voiced(alone.rows(), alone_at, alone_at + user_s + 0.5, 3)
        aligned = _aligned_shares(talk, user_at, alone, alone_at, user_s)
        # CPU: the stage again, offline, over the audio the room delivered.
        cpu = _cpu_percent(trace)
    finally:
        await output.stop()
    return {
        "erle_db": round(float(erle), 1),
        "erle_aec3_db": round(float(erle_aec3), 1),
        "converge_s": converge_s,
        "delay_ms": stage.convergence.delay_ms,
        "double_talk_share": round(over / alone_voiced, 3) if alone_voiced else None,
        "double_talk_share_aec3": round(over_aec3 / alone_voiced, 3) if alone_voiced else None,
        "double_talk_share_aligned": round(aligned["gated"], 3),
        "double_talk_share_aec3_aligned": round(aligned["aec"], 3),
        "voiced_frames": [over, alone_voiced],
        "cpu_percent": round(cpu, 3),
    }


async def _alone(
    pulse: PulseServer, stage: AudioProcessing, user_wav: Path
) -> tuple[_Trace, float, float]:
    mic = AlsaInput("pulse", rate=RATE)
    await mic.start(_Quiet())
    trace = _Trace(stage)

    async def capture() -> None:
        async for frame in mic.frames():
            await asyncio.to_thread(trace.process, frame)

    task = asyncio.create_task(capture())
    try:
        await asyncio.sleep(0.3)
        at = time.monotonic()
        await asyncio.to_thread(
            subprocess.run,
            ["paplay", f"--server={pulse.server}", f"--device={SINK}", str(user_wav)],
            check=True,
            timeout=20,
        )
        await asyncio.sleep(0.4)
    finally:
        task.cancel()
        await mic.stop()
    return trace, at, 0.0


def _cpu_percent(trace: _Trace) -> float:
    """Process the recorded mic and reference again through a fresh canceller and
    residual gate, 20 ms at a time."""
    from pywebrtc_audio import AudioProcessor

    apm = AudioProcessor(RATE, echo_cancellation=True)
    gate = ResidualGate(RATE)
    near, far = trace.stream("near"), trace.stream("far")
    usable = len(near) - len(near) % FRAME
    started = time.thread_time()
    for start in range(0, usable, FRAME):
        n, f = near[start : start + FRAME], far[start : start + FRAME]
        gate.apply(n, f, apm.process(n, f))
    used = time.thread_time() - started
    return 100 * used / (usable / RATE)


def _asked_over_an_answer() -> FakeScript:
    """Answers the user's question shortly, anything else with the long ANSWER."""
    return FakeScript(
        user_transcripts=[USER], reply=lambda t: "It is nine." if t == USER else ANSWER, speak=speak
    )


async def barge_in_round(pulse: PulseServer, user_wav: Path) -> float | None:
    """The whole client: user speech onset -> the daemon's speaker stream silent (ms)."""
    async with converged_room(pulse, _asked_over_an_answer()) as (room, _):
        speaker = record_speaker(pulse)
        await room.answer_playing("and next week?")
        user = _record_user(pulse, room.say(user_wav))
        await until(lambda: any(m.interrupted for m in room.finals), 20, "the barge-in")
        await asyncio.sleep(0.5)
        speaker.stop()
        user.stop()
    onset = _first_loud(user, after=0.0)
    if onset is None:
        return None
    quiet = _silent_from(speaker, onset)
    return None if quiet is None else round((quiet - onset) * 1000, 1)


WAKE_VOLUMES = {"full": 100, "minus_6db": 71}
"""Speaker volumes of the wake word rounds (the volume is a square law: 71 is -6 dB)."""


async def wake_over_answer_round(pulse: PulseServer, wake_wav: Path, volume: int) -> bool:
    """The whole client waiting for a wake word: is the user's, said over an answer,
    heard (within 6 s)?"""
    wake = WakeConfig(enabled=True)
    async with converged_room(pulse, _asked_over_an_answer(), wake=wake, volume=volume) as (
        room,
        _,
    ):
        await room.answer_playing("and next week?")
        speaker = room.say(wake_wav)
        with contextlib.suppress(AssertionError):  # not heard in time: a miss
            await until(lambda: bool(room.wakes), 6, "the wake word")
        await asyncio.to_thread(speaker.wait, 10)
        return bool(room.wakes)


def _record_user(pulse: PulseServer, player: subprocess.Popen[bytes]) -> Recording:
    """Record the user's stream (the newest sink input) while its leading silence plays."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        listing = subprocess.run(
            ["pactl", f"--server={pulse.server}", "list", "short", "sink-inputs"],
            capture_output=True,
            check=True,
            timeout=10,
        ).stdout.decode()
        indexes = [int(line.split()[0]) for line in listing.splitlines() if line.strip()]
        if len(indexes) >= 2:
            process = subprocess.Popen(
                [
                    "pacat",
                    "--record",
                    f"--server={pulse.server}",
                    f"--monitor-stream={max(indexes)}",
                    "--raw",
                    "--format=s16le",
                    "--rate=24000",
                    "--channels=1",
                    "--latency-msec=5",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            recording = Recording(24000, process)
            recording._thread = threading.Thread(target=recording._pump, daemon=True)  # noqa: SLF001
            recording._thread.start()  # noqa: SLF001
            return recording
        time.sleep(0.01)
    raise RuntimeError("the user's stream did not appear")


def _blocks(recording: Recording) -> npt.NDArray[np.float64]:
    samples = recording.samples().astype(np.float64)
    count = len(samples) // 120
    return np.sqrt((samples[: count * 120].reshape(count, 120) ** 2).mean(axis=1))


def _first_loud(recording: Recording, after: float) -> float | None:
    loud = np.nonzero(_blocks(recording) > 1000)[0]
    return recording.arrival_of(int(loud[0]) * 120) if len(loud) else None


def _silent_from(recording: Recording, after: float) -> float | None:
    """When the speaker went silent for good after `after`: the block after its last
    loud one (the recording runs on after the barge-in; pauses between words do not
    count)."""
    loud = np.nonzero(_blocks(recording) > 100)[0]
    if not len(loud):
        return None
    at = recording.arrival_of((int(loud[-1]) + 1) * 120)
    return at if at >= after else None


async def measure(pulse: PulseServer, rounds: int, workdir: Path) -> dict[str, Any]:
    """Every figure, `rounds` times; medians plus the per-round values."""
    user_wav = workdir / "user.wav"
    write_wav(user_wav, silence(300, 24000) + speech_pcm(USER, rate=24000, voice="en-gb"), 24000)
    wake_wav = workdir / "okay_nabu.wav"
    spoken = speech_pcm(f"okay nabu, {USER}", rate=24000, voice="en-gb")
    write_wav(wake_wav, spoken + silence(300, 24000), 24000)
    per_round = []
    for _ in range(rounds):
        figures = await canceller_round(pulse, user_wav)
        figures["barge_in_ms"] = await barge_in_round(pulse, user_wav)
        figures["wake_over_answer"] = {
            level: await wake_over_answer_round(pulse, wake_wav, volume)
            for level, volume in WAKE_VOLUMES.items()
        }
        per_round.append(figures)

    def median(key: str) -> float | None:
        values = [r[key] for r in per_round if r.get(key) is not None]
        return round(statistics.median(values), 3) if values else None

    keys = (
        "erle_db",
        "erle_aec3_db",
        "converge_s",
        "double_talk_share",
        "double_talk_share_aec3",
        "double_talk_share_aligned",
        "double_talk_share_aec3_aligned",
        "cpu_percent",
        "barge_in_ms",
    )
    heard = {level: sum(r["wake_over_answer"][level] for r in per_round) for level in WAKE_VOLUMES}
    return {**{key: median(key) for key in keys}, "wake_over_answer": heard, "rounds": per_round}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="harkd-echo-") as tmp, PulseServer.start_new() as pulse:
        result = asyncio.run(measure(pulse, args.rounds, Path(tmp)))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
