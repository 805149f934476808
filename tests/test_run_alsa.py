"""`harkd run` with real ALSA devices end to end: the PulseAudio null sink is the room.

Speech played into the room reaches the daemon through the ALSA `pulse` PCM, goes to
the fake realtime server, and the spoken answer comes back out through ALSA into the
same room, where a recorder hears it.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from e2e import assert_all_valid, until
from harkd.testing import FakeRealtimeServer, FakeScript
from pulse_fixture import PulseServer
from speech_fixtures import silence, speech_pcm, write_wav

pytestmark = pytest.mark.pulse
KEY = "sk-alsa-e2e-0123456789"


def write_config(path: Path, url: str, state_dir: Path) -> None:
    config = {
        "device": {"id": "alsa_e2e"},
        "realtime": {"url": url, "api_key": KEY, "transcription_model": "gpt-4o-mini-transcribe"},
        "audio": {
            "input": {"device": "pulse", "rate": 16000},
            "output": {"device": "pulse", "rate": 24000},
        },
        "mqtt": {"enabled": False},
        "plugins": {},
        "state_dir": str(state_dir),
        "log_level": "info",
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


async def test_harkd_run_hears_the_room_and_answers_into_it(
    pulse: PulseServer, tmp_path: Path
) -> None:
    speech = tmp_path / "question.wav"
    write_wav(speech, speech_pcm("turn on the kitchen lights") + silence(1500, 16000), 16000)
    script = FakeScript(user_transcripts=["turn on the kitchen lights"], pace=4.0)
    async with FakeRealtimeServer(script=script, api_keys={KEY}) as server:
        config = tmp_path / "config.yaml"
        write_config(config, server.url, tmp_path / "state")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "harkd.cli", "run", "-c", str(config)],
            env=pulse.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            await until(
                lambda: bool(server.sessions) and bool(server.sessions[0].config),
                timeout_s=15,
                what="session configured",
            )
            heard = pulse.record(rate=24000)
            # Speak into the room without blocking the fake server on this loop.
            player = await asyncio.create_subprocess_exec(
                "paplay", "-d", "room", str(speech), env=pulse.env
            )
            assert await asyncio.wait_for(player.wait(), 20) == 0
            session = server.sessions[0]
            await until(lambda: bool(session.responses), timeout_s=15, what="an answer")
            journal = tmp_path / "state" / "transcripts.jsonl"
            await until(
                lambda: journal.exists() and '"assistant"' in journal.read_text(),
                timeout_s=30,
                what="the answer played out and journaled",
            )
            heard.stop()
        finally:
            daemon.send_signal(signal.SIGTERM)
            output, _ = daemon.communicate(timeout=30)
            print(output)  # the daemon's log, shown when the test fails
    assert daemon.returncode == 0, output
    assert session.audio_ms_received > 1000  # the room's speech went up
    assert session.speech_segments, "server VAD heard speech"
    roles = [json.loads(line)["role"] for line in journal.read_text().splitlines()]
    assert roles[:2] == ["user", "assistant"]
    samples = np.frombuffer(b"".join(c for _, c in heard.chunks), dtype="<i2")
    loud = np.abs(samples.astype(np.int32)) > 3000
    assert loud.sum() > 24000 * 0.2, "the answer was played into the room"
    assert KEY not in output
    assert_all_valid(server)
