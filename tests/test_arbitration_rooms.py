"""Three `harkd run` daemons, each in its own PulseAudio room, on one real Mosquitto,
hear the same wake phrase at three loudness levels.

What a user notices: only the nearest device (the loudest) answers; the others say
so on `B/wake` (`answered: false`); devices that hear it equally loud still agree on
one; and with the broker gone, a lone device answers on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from e2e import until
from harkd.testing import FakeRealtimeServer, FakeScript
from harkd_process import Harkd, daemon_config, harkd_env, write_config
from mosquitto import Mosquitto, Recorder, mosquitto_fixture
from pulse_fixture import PulseServer, PulseUnavailable
from speech_fixtures import scale, silence, speech_pcm

pytestmark = [pytest.mark.pulse, pytest.mark.timeout(120)]

KEY = "sk-test-arbitration"
QUESTION = "what time is it"
PHRASE = f"okay nabu, {QUESTION}"

broker = mosquitto_fixture()


@pytest.fixture(scope="module")
def rooms() -> Iterator[list[PulseServer]]:
    """Three rooms: one PulseAudio server (null sink) each."""
    made: list[PulseServer] = []
    try:
        for _ in range(3):
            made.append(PulseServer.start_new())
    except PulseUnavailable as exc:
        pytest.skip(f"PulseAudio cannot start here: {exc}")
    try:
        yield made
    finally:
        for room in reversed(made):  # each restores the PULSE_SERVER it found
            room.close()


@contextlib.asynccontextmanager
async def devices(
    tmp_path: Path, server: FakeRealtimeServer, b: Mosquitto, placed: dict[str, PulseServer]
) -> AsyncIterator[dict[str, Harkd]]:
    """A daemon per device id, listening in its room, all on one broker."""
    async with contextlib.AsyncExitStack() as stack:
        running: dict[str, Harkd] = {}
        for device, room in placed.items():
            home = tmp_path / device
            home.mkdir()
            config = daemon_config(
                home,
                server.url,
                KEY,
                device={"id": device, "name": device},
                realtime={"turn_detection": "manual"},
                audio={"input": {"device": "pulse"}, "output": {"device": None}},
                wake={"enabled": True, "sound": None},
                mqtt={"enabled": True, "host": b.host, "port": b.port, "discovery_prefix": None},
            )
            env = harkd_env(PULSE_SERVER=room.server)
            running[device] = await stack.enter_async_context(
                Harkd(write_config(home, config), env=env)
            )
        for daemon in running.values():
            await daemon.wait_log("harkd ready")
        await until(lambda: len(server.sessions) >= len(placed), what="every session")
        yield running


def wakes(rec: Recorder, device: str) -> list[dict[str, object]]:
    return [json.loads(m.payload) for m in rec.on(f"harkd/{device}/wake")]


def commits(server: FakeRealtimeServer) -> int:
    return sum(1 for _, e in server.received if e["type"] == "input_audio_buffer.commit")


async def test_only_the_loudest_of_three_answers(
    tmp_path: Path, rooms: list[PulseServer], broker: Mosquitto
) -> None:
    placed = dict(zip(["kitchen", "hall", "den"], rooms, strict=True))
    gains = {"kitchen": 0.35, "hall": 1.0, "den": 0.15}  # the user stands in the hall
    phrase = speech_pcm(PHRASE) + silence(300)
    async with FakeRealtimeServer(FakeScript(user_transcripts=[QUESTION])) as server:
        with Recorder(broker, "harkd/#") as rec:
            async with devices(tmp_path, server, broker, placed):
                await asyncio.gather(
                    *(placed[d].play(scale(phrase, gain)) for d, gain in gains.items())
                )
                await until(
                    lambda: all(wakes(rec, d) for d in placed), what="every device's B/wake"
                )
                answer = await rec.wait_for("harkd/hall/transcript/assistant", timeout_s=20)
                assert json.loads(answer.payload)["text"]
                await asyncio.sleep(1.0)
                await rec.sync()
                claims = [json.loads(m.payload) for m in rec.on("harkd/_wake/claim")]
    answered = {d: [w["answered"] for w in wakes(rec, d)] for d in placed}
    assert answered == {"kitchen": [False], "hall": [True], "den": [False]}
    levels = {c["device"]: c["level"] for c in claims}
    assert levels["hall"] > levels["kitchen"] > levels["den"] > 0
    assert commits(server) == 1  # one turn in the whole home
    for device in ("kitchen", "den"):
        assert rec.on(f"harkd/{device}/transcript/user") == []


async def test_devices_that_hear_it_equally_loud_agree_on_one(
    tmp_path: Path, rooms: list[PulseServer], broker: Mosquitto
) -> None:
    placed = {"b-room": rooms[0], "a-room": rooms[1]}
    phrase = scale(speech_pcm(PHRASE) + silence(300), 0.5)
    async with FakeRealtimeServer(FakeScript(user_transcripts=[QUESTION])) as server:
        with Recorder(broker, "harkd/#") as rec:
            async with devices(tmp_path, server, broker, placed):
                await asyncio.gather(*(room.play(phrase) for room in placed.values()))
                await until(lambda: all(wakes(rec, d) for d in placed), what="both B/wake")
                await until(lambda: commits(server) == 1, what="the one turn")
                await asyncio.sleep(1.0)
                await rec.sync()
    verdicts = [w["answered"] for d in placed for w in wakes(rec, d)]
    assert sorted(verdicts) == [False, True]  # exactly one answers, whichever ranks first
    assert commits(server) == 1


async def test_with_the_broker_gone_a_lone_device_answers_on_its_own(
    tmp_path: Path, rooms: list[PulseServer], broker: Mosquitto
) -> None:
    server = FakeRealtimeServer(FakeScript(user_transcripts=[QUESTION]))
    async with server, devices(tmp_path, server, broker, {"kitchen": rooms[0]}) as running:
        # Connected first: a broker gone during the handshake is "unreachable", not "lost".
        await running["kitchen"].wait_log("MQTT connected")
        broker.stop()
        await running["kitchen"].wait_log("MQTT connection to .* lost")
        await rooms[0].play(speech_pcm(PHRASE) + silence(300))
        await running["kitchen"].wait_log("answering without arbitration")
        await until(lambda: commits(server) == 1, what="the turn, answered alone")
        broker.start()
