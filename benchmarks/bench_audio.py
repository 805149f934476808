"""Audio edge latencies on paced, hardware-like audio (PulseAudio null sink via ALSA).

Standalone: `python benchmarks/bench_audio.py` prints one JSON object:

* capture_ms: ALSA read return -> frame on the event loop (median, p95), from the
  frames' monotonic stamps;
* first_write_ms: `play()` -> first audio written to ALSA (median, p95);
* barge_in: time from `stop_playback()` until the room is silent (the recorder's
  own ~5 ms latency included), and played_ms minus what the recording heard;
* cpu_percent: process CPU while playing (threads sleep between periods).

Needs pulseaudio + pulseaudio-utils; takes about 20 s.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harkd.audio.alsa import AlsaInput, AlsaOutput  # noqa: E402
from pulse_fixture import PulseServer  # noqa: E402

BLOCK = 120  # 5 ms at 24 kHz


class Listener:
    def device_failed(self, device: str, message: str) -> None:
        print(f"device failed: {device}: {message}", file=sys.stderr)

    def device_recovered(self, device: str) -> None:
        print(f"device recovered: {device}", file=sys.stderr)


class StampedOutput(AlsaOutput):
    """AlsaOutput that notes when audio (not padding) reaches the device."""

    first_write_at: float | None = None

    def _write(self, pcm: Any, data: bytes, *, meter: bool) -> int:
        written = super()._write(pcm, data, meter=meter)
        if meter and written and self.first_write_at is None:
            self.first_write_at = time.monotonic()
        return written


def tone(ms: int, freq: float = 440.0) -> bytes:
    t = np.arange(24 * ms) / 24000
    return np.rint(8000 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 3),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
        "max": round(ordered[-1], 3),
        "n": len(ordered),
    }


async def capture_latency(seconds: float = 3.0) -> dict[str, float]:
    mic = AlsaInput("pulse", rate=16000, period_ms=20)
    await mic.start(Listener())
    delays: list[float] = []
    deadline = time.monotonic() + seconds
    async for frame in mic.frames():
        delays.append((time.monotonic() - frame.captured_at) * 1000)
        if time.monotonic() > deadline:
            break
    await mic.stop()
    return summary(delays[5:])  # skip the stream's start-up


async def first_write_latency(rate: int, runs: int = 15) -> tuple[dict[str, float], float]:
    speaker = StampedOutput("pulse", rate=rate)
    await speaker.start(Listener())
    drained = asyncio.Event()
    speaker.on_drained(drained.set)
    delays: list[float] = []
    cpu_before, wall_before = time.process_time(), time.monotonic()
    for _ in range(runs):
        drained.clear()
        speaker.first_write_at = None
        started = time.monotonic()
        speaker.play("a", tone(120))
        await asyncio.wait_for(drained.wait(), 3)
        assert speaker.first_write_at is not None
        delays.append((speaker.first_write_at - started) * 1000)
        await asyncio.sleep(0.05)
    cpu = (time.process_time() - cpu_before) / (time.monotonic() - wall_before) * 100
    await speaker.stop()
    return summary(delays), round(cpu, 2)


async def barge_in(pulse: PulseServer, rate: int, runs: int = 5) -> dict[str, Any]:
    speaker = AlsaOutput("pulse", rate=rate)
    await speaker.start(Listener())
    silences: list[float] = []
    errors: list[float] = []
    for run in range(runs):
        recording = pulse.record(24000)
        await asyncio.sleep(0.15)
        speaker.play(f"item{run}", tone(1500))
        await asyncio.sleep(0.4 + 0.037 * run)  # stop at different phases of a period
        stopped_at = time.monotonic()
        played = speaker.stop_playback()[f"item{run}"]
        await asyncio.sleep(0.2)
        recording.stop()
        samples = recording.samples().astype(float)
        count = len(samples) // BLOCK
        rms = np.sqrt((samples[: count * BLOCK].reshape(count, BLOCK) ** 2).mean(axis=1))
        onset = int(np.nonzero(rms > 1000)[0][0])
        silent = onset + int(np.argmax(rms[onset:] < 100))
        silences.append((recording.arrival_of(silent * BLOCK) - stopped_at) * 1000)
        errors.append(played - (silent - onset) * BLOCK / 24)
    await speaker.stop()
    return {
        "silent_after_stop_ms": summary(silences),
        "played_minus_heard_ms": summary(errors),
        "abs_error_ms_max": round(max(abs(e) for e in errors), 1),
    }


async def main() -> None:
    started = time.monotonic()
    with PulseServer.start_new() as pulse:
        result: dict[str, Any] = {"capture_ms": await capture_latency()}
        for rate in (24000, 48000):
            first, cpu = await first_write_latency(rate)
            result[f"first_write_ms_{rate}"] = first
            result[f"cpu_percent_playing_{rate}"] = cpu
            result[f"barge_in_{rate}"] = await barge_in(pulse, rate)
    result["targets"] = {
        "capture_ms_median": 2,
        "first_write_ms_median": 5,
        "silent_after_stop_ms": "period (20) + 10",
        "played_error_ms": 40,
    }
    result["duration_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
