"""The wake word in a room: a real `harkd run` whose microphone and speaker are the
PulseAudio room (the microphone hears the chime and the answer), a real Mosquitto, and
the fake server counting what reaches it.

What a user notices: talk without the wake word goes nowhere; "okay nabu, what time is
it" is answered once; the chime the device plays does not open a turn of its own;
Home Assistant learns of the wake word (`B/wake`, and the "Wake word" event entity).
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import pytest

from e2e import sent_types, until
from harkd.testing import FakeRealtimeServer, FakeScript
from harkd_process import Harkd, daemon_config, harkd_env, write_config
from mosquitto import Mosquitto, Recorder, mosquitto_fixture
from pulse_fixture import PulseServer
from speech_fixtures import len_ms, silence, speech_pcm

pytestmark = [pytest.mark.pulse, pytest.mark.timeout(90)]

KEY = "sk-test-wake-room"
BASE = "harkd/testroom"
QUESTION = "what time is it"

broker = mosquitto_fixture()


def appended_ms(server: FakeRealtimeServer) -> float:
    total = sum(
        len(base64.b64decode(e["audio"]))
        for _, e in server.received
        if e["type"] == "input_audio_buffer.append"
    )
    return total / 48  # 24 kHz PCM16


def commits(server: FakeRealtimeServer) -> int:
    return sum(1 for _, e in server.received if e["type"] == "input_audio_buffer.commit")


def room_harkd(
    tmp_path: Path, server: FakeRealtimeServer, pulse: PulseServer, broker: Mosquitto
) -> Harkd:
    """`harkd run` on the room's microphone and speaker (half duplex), the local VAD
    ending turns, the wake word armed, on the test's Mosquitto."""
    config = daemon_config(
        tmp_path,
        server.url,
        KEY,
        realtime={"turn_detection": "manual"},
        audio={"input": {"device": "pulse"}, "output": {"device": "pulse"}},
        wake={"enabled": True},
        mqtt={"enabled": True, "host": broker.host, "port": broker.port},
    )
    return Harkd(write_config(tmp_path, config), env=harkd_env(PULSE_SERVER=pulse.server))


async def test_okay_nabu_in_the_room_is_answered_once_and_told_to_home_assistant(
    tmp_path: Path, pulse: PulseServer, broker: Mosquitto
) -> None:
    script = FakeScript(user_transcripts=[QUESTION], reply="It is noon.")
    async with FakeRealtimeServer(script, api_keys={KEY}) as server:
        with Recorder(broker, "#") as rec:
            async with room_harkd(tmp_path, server, pulse, broker) as daemon:
                await daemon.wait_log("harkd ready")
                await until(lambda: bool(server.sessions), what="a session")

                # Home Assistant learns of a "Wake word" event entity.
                discovery = await rec.wait_for("homeassistant/device/harkd_testroom/config")
                event = json.loads(discovery.payload)["components"]["wake_word"]
                assert event["platform"] == "event"
                assert event["event_types"] == ["okay_nabu", "command"]
                assert event["state_topic"] == f"{BASE}/wake"

                # Talk without the wake word: not a byte leaves the house.
                await pulse.play(speech_pcm("turn on the kitchen lights"))
                await asyncio.sleep(1.0)
                assert appended_ms(server) == 0 and rec.on(f"{BASE}/wake") == []

                await pulse.play(speech_pcm(f"okay nabu, {QUESTION}") + silence(200))
                wake = await rec.wait_for(f"{BASE}/wake")
                payload = json.loads(wake.payload)
                assert payload["word"] == "okay_nabu" and payload["answered"] is True
                assert 0.5 < payload["score"] <= 1 and 0 < payload["level"] < 1
                assert set(payload) == {"word", "score", "level", "ts", "answered"}

                answer = await rec.wait_for(f"{BASE}/transcript/assistant", timeout_s=20)
                assert json.loads(answer.payload)["text"] == "It is noon."
                # The chime and the answer played in the room; neither made a turn.
                await asyncio.sleep(2.0)
                assert commits(server) == 1
                assert appended_ms(server) >= len_ms(speech_pcm(QUESTION))
                user = await rec.wait_for(f"{BASE}/transcript/user")
                assert json.loads(user.payload)["text"] == QUESTION
                await rec.sync()
                assert len(rec.on(f"{BASE}/wake")) == 1


def mode(rec: Recorder) -> bytes | None:
    last = rec.last(f"{BASE}/mode")
    return last.payload if last is not None else None


async def test_an_answer_that_says_the_wake_word_does_not_interrupt_itself(
    tmp_path: Path, pulse: PulseServer, broker: Mosquitto
) -> None:
    """Half duplex, no echo cancellation: the detector hears the speaker (it listens
    before the gate so that the user can stop an answer), and this answer says the
    wake word twice. A second detector, on what the speaker played, tells it apart
    from the user's."""
    naming = "My wake word? Okay nabu. That is all it takes: okay nabu."
    script = FakeScript(
        user_transcripts=["how do I wake you", QUESTION],
        reply=lambda text: naming if text == "how do I wake you" else "It is noon.",
        speak=lambda text: speech_pcm(text, rate=24000, voice="en-gb"),
    )
    async with FakeRealtimeServer(script, api_keys={KEY}) as server:
        with Recorder(broker, f"{BASE}/#") as rec:
            async with room_harkd(tmp_path, server, pulse, broker) as daemon:
                await daemon.wait_log("harkd ready")
                await until(lambda: bool(server.sessions), what="a session")
                await pulse.play(speech_pcm("okay nabu, how do I wake you") + silence(200))
                answer = await rec.wait_for(f"{BASE}/transcript/assistant", timeout_s=20)
                assert json.loads(answer.payload)["text"] == naming
                await until(lambda: mode(rec) == b"idle", what="the answer's end")
                sent = sent_types(server)
                assert "conversation.item.truncate" not in sent  # played to its end
                assert "response.cancel" not in sent
                await rec.sync()
                assert len(rec.on(f"{BASE}/wake")) == 1
                # The microphone did hear the wake word in the answer, and let it be.
                await daemon.wait_log("wake word okay_nabu in the assistant's own voice")

                # The user saying it afterwards is the user. (Said on the answer's
                # heels the model misses it: it still hears the answer's last words.)
                await asyncio.sleep(1.5)
                await pulse.play(speech_pcm(f"okay nabu, {QUESTION}") + silence(200))
                await until(lambda: len(rec.on(f"{BASE}/wake")) == 2, what="the user's wake")
                assert json.loads(rec.on(f"{BASE}/wake")[1].payload)["answered"] is True
                await until(
                    lambda: len(rec.on(f"{BASE}/transcript/assistant")) == 2, what="an answer"
                )
                assert json.loads(rec.on(f"{BASE}/transcript/assistant")[1].payload)["text"] == (
                    "It is noon."
                )
