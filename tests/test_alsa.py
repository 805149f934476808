"""The real ALSA path through pyalsaaudio, on file PCMs (no sound card needed).

ALSA reads its configuration once per process, so each scenario runs in a
subprocess with ALSA_CONFIG_PATH pointing at PCMs that read capture data from a
raw file and write playback into one (see TESTING.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

RATE = 16000


@pytest.fixture(scope="module")
def alsa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("alsa")
    mono = (np.arange(RATE) % 30000).astype("<i2")
    stereo = np.stack([mono, -mono], axis=1).astype("<i2")
    (d / "mono.raw").write_bytes(mono.tobytes())
    (d / "stereo.raw").write_bytes(stereo.tobytes())
    (d / "asoundrc").write_text(
        textwrap.dedent(
            f"""
            pcm.testmic {{ type file slave.pcm null file "/dev/null"
                infile "{d}/mono.raw" format "raw"
                hint {{ show on description "test microphone" }} }}
            pcm.stereomic {{ type file slave.pcm null file "/dev/null"
                infile "{d}/stereo.raw" format "raw" }}
            # multi takes exactly 2 channels: a device that refuses mono.
            pcm.stereoonly {{ type multi slaves.a.pcm "stereomic" slaves.a.channels 2
                bindings.0.slave a bindings.0.channel 0
                bindings.1.slave a bindings.1.channel 1 }}
            pcm.testspk {{ type file slave.pcm null file "{d}/out.raw" format "raw"
                hint {{ show on description "test speaker" }} }}
            """
        )
    )
    return d


def run(alsa_dir: Path, body: str, timeout: float = 30) -> dict[str, Any]:
    """Run `body` (inside `async def main(result)`) in a fresh process on the file PCMs."""
    script = "\n".join(
        [
            "import asyncio, json, logging, sys, time",
            "from harkd.audio.alsa import AlsaInput, AlsaOutput, list_devices",
            "logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)",
            "class Listener:",
            "    def __init__(self): self.events = []",
            "    def device_failed(self, d, m): self.events.append(['failed', d, m])",
            "    def device_recovered(self, d): self.events.append(['recovered', d])",
            "async def main(result):",
            textwrap.indent(textwrap.dedent(body), "    "),
            "result = {}",
            "asyncio.run(main(result))",
            "print(json.dumps(result))",
        ]
    )
    env = dict(os.environ, ALSA_CONFIG_PATH=f"/usr/share/alsa/alsa.conf:{alsa_dir}/asoundrc")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["stderr"] = done.stderr
    return result


def test_capture_returns_the_device_samples(alsa_dir: Path) -> None:
    result = run(
        alsa_dir,
        """
        mic = AlsaInput("testmic", rate=16000, period_ms=20, max_queued_frames=1000)
        await mic.start(Listener())
        frames = []
        async for frame in mic.frames():
            frames.append(frame)
            if len(frames) == 25:
                break
        await mic.stop()
        result["pcm"] = b"".join(f.pcm for f in frames).hex()
        result["sizes"] = sorted({len(f.pcm) for f in frames})
        result["rates"] = sorted({f.sample_rate for f in frames})
        result["stamps"] = [f.captured_at for f in frames]
        """,
    )
    expected = (np.arange(25 * 320) % 30000).astype("<i2").tobytes()
    assert bytes.fromhex(result["pcm"]) == expected
    assert result["sizes"] == [640] and result["rates"] == [RATE]
    assert result["stamps"] == sorted(result["stamps"])


def test_capture_picks_a_channel_of_a_stereo_device(alsa_dir: Path) -> None:
    result = run(
        alsa_dir,
        """
        mic = AlsaInput("stereomic", rate=16000, period_ms=20, channel=1, max_queued_frames=1000)
        await mic.start(Listener())
        frames = []
        async for frame in mic.frames():
            frames.append(frame.pcm)
            if len(frames) == 10:
                break
        await mic.stop()
        result["pcm"] = b"".join(frames).hex()
        """,
    )
    right = -(np.arange(10 * 320) % 30000).astype("<i2")
    assert bytes.fromhex(result["pcm"]) == right.astype("<i2").tobytes()


def test_capture_from_a_device_that_refuses_mono(alsa_dir: Path) -> None:
    result = run(
        alsa_dir,
        """
        listener = Listener()
        mic = AlsaInput("stereoonly", rate=16000, period_ms=20, max_queued_frames=1000)
        await mic.start(listener)
        frames = []
        async for frame in mic.frames():
            frames.append(frame.pcm)
            if len(frames) == 5:
                break
        await mic.stop()
        result["sizes"] = [len(f) for f in frames]
        result["events"] = listener.events
        """,
    )
    assert result["sizes"] == [640] * 5
    assert result["events"] == []
    assert "2 channel(s)" in result["stderr"]


def test_playback_bytes_land_in_the_device(alsa_dir: Path) -> None:
    out = alsa_dir / "out.raw"
    out.unlink(missing_ok=True)
    audio = (np.arange(24000 // 2) * 7 % 20000).astype("<i2")  # 500 ms
    result = run(
        alsa_dir,
        f"""
        speaker = AlsaOutput("testspk", rate=24000)
        drained = asyncio.Event()
        speaker.on_drained(drained.set)
        await speaker.start(Listener())
        pcm = bytes.fromhex("{audio.tobytes().hex()}")
        started = time.monotonic()
        for i in range(0, len(pcm), 4800):  # 100 ms deltas
            speaker.play("item1", pcm[i : i + 4800])
        result["playing"] = speaker.is_playing
        await asyncio.wait_for(drained.wait(), 5)
        result["drained_after_s"] = time.monotonic() - started
        result["playing_after"] = speaker.is_playing
        result["played_ms"] = speaker.played_ms("item1")
        await speaker.stop()
        """,
    )
    assert result["playing"] and not result["playing_after"]
    assert result["played_ms"] == 500
    written = out.read_bytes()
    assert written[: len(audio.tobytes())] == audio.tobytes()
    tail = written[len(audio.tobytes()) :]
    assert tail == bytes(len(tail)) and len(tail) <= 2 * 960  # at most the silence padding


def test_playback_resamples_for_the_device_rate(alsa_dir: Path) -> None:
    out = alsa_dir / "out.raw"
    out.unlink(missing_ok=True)
    run(
        alsa_dir,
        """
        speaker = AlsaOutput("testspk", rate=48000)
        drained = asyncio.Event()
        speaker.on_drained(drained.set)
        await speaker.start(Listener())
        speaker.play("a", bytes(2) * 24000)
        await asyncio.wait_for(drained.wait(), 5)
        result["played_ms"] = speaker.played_ms("a")
        await speaker.stop()
        """,
    )
    frames = len(out.read_bytes()) // 2
    assert 48000 <= frames <= 48000 + 2 * 960


@pytest.mark.parametrize("kind", ["input", "output"])
def test_missing_device_is_reported_and_retried(alsa_dir: Path, kind: str) -> None:
    edge = (
        'AlsaInput("nosuchdevice", rate=16000)'
        if kind == "input"
        else 'AlsaOutput("nosuchdevice", rate=24000)'
    )
    result = run(
        alsa_dir,
        f"""
        listener = Listener()
        edge = {edge}
        started = time.monotonic()
        await edge.start(listener)
        result["start_s"] = time.monotonic() - started
        if hasattr(edge, "play"):
            edge.play("a", bytes(4800))  # held for the device (see test_audio_outage)
            result["playing"] = edge.is_playing
        await asyncio.sleep(1.8)
        started = time.monotonic()
        await edge.stop()
        result["stop_s"] = time.monotonic() - started
        result["events"] = listener.events
        """,
    )
    assert [e[:2] for e in result["events"]] == [["failed", "nosuchdevice"]]  # once per outage
    assert "nosuchdevice" in result["events"][0][2]
    assert result["stderr"].count("still failing") >= 1  # retried (0.5 s, 1 s, ...)
    assert result["start_s"] < 1 and result["stop_s"] < 1
    assert result.get("playing") is (True if kind == "output" else None)


def test_list_devices_names_pcms_and_hints(alsa_dir: Path) -> None:
    result = run(alsa_dir, 'result["text"] = list_devices()')
    text = result["text"]
    assert "Capture PCMs" in text and "Playback PCMs" in text
    assert "testspk" in text and "testmic" in text
    assert "plughw:N" in text and "pulse" in text
