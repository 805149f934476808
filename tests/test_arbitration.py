"""Arbitration: of several devices that hear one wake word, the nearest answers.

The ranking (pure), then arbiters on real MQTT bridges on one real Mosquitto: the
loudest claim wins on every device alike, ties resolve the same way everywhere, claims
for another word or from long ago do not count, a skewed clock does not matter, and
without a broker a device answers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator

import pytest

from harkd.arbitration import WINDOW_S, Claim, MqttArbiter, wins
from harkd.config import DeviceConfig, MqttConfig
from harkd.mqtt import MqttBridge
from mosquitto import Mosquitto, Recorder, mosquitto_fixture
from test_mqtt import FakeController

broker = mosquitto_fixture()

BASE = "harkd"


def claim(device: str, level: float, score: float = 0.95, word: str = "okay_nabu") -> Claim:
    return Claim(device, word, score, level, ts=1_765_000_000.0)


def test_the_loudest_claim_wins_then_the_surest_then_the_lowest_id() -> None:
    kitchen, hall, den = claim("kitchen", 0.12), claim("hall", 0.05), claim("den", 0.02)
    assert wins(kitchen, [hall, den]) and not wins(hall, [kitchen, den])
    assert wins(claim("a", 0.1, score=0.99), [claim("b", 0.1, score=0.9)])
    assert wins(claim("a", 0.1), [claim("b", 0.1)]) and not wins(claim("b", 0.1), [claim("a", 0.1)])


def test_every_device_reaches_the_same_verdict_from_the_same_claims() -> None:
    claims = [claim("a", 0.1), claim("b", 0.1), claim("c", 0.1, score=0.97), claim("d", 0.08)]
    for order in itertools.permutations(claims):
        winners = [c.device for c in order if wins(c, [o for o in order if o is not c])]
        assert winners == ["c"]


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[]",
        b'{"device": "", "word": "x", "score": 1, "level": 1, "ts": 1}',
        b'{"device": "a", "word": "x", "score": "high", "level": 1, "ts": 1}',
        b'{"device": "a", "word": "x", "score": true, "level": 1, "ts": 1}',
        b'{"device": "a", "word": "x", "score": 1, "level": NaN, "ts": 1}',
    ],
)
def test_a_malformed_claim_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError):
        Claim.from_json(payload)


def test_a_claim_survives_its_own_payload() -> None:
    mine = claim("kitchen", 0.0731)
    assert Claim.from_json(mine.to_json().encode()) == mine
    assert set(json.loads(mine.to_json())) == {"device", "word", "score", "level", "ts"}


def bridge_for(b: Mosquitto, device: str) -> MqttBridge:
    config = MqttConfig(host=b.host, port=b.port, base_topic=BASE, discovery_prefix=None)
    return MqttBridge(config, DeviceConfig(id=device), None, FakeController())


@contextlib.asynccontextmanager
async def arbiters(b: Mosquitto, *devices: str) -> AsyncIterator[dict[str, MqttArbiter]]:
    """One MQTT bridge and arbiter per device, connected and subscribed."""
    made: dict[str, MqttArbiter] = {}
    tasks: list[asyncio.Task[None]] = []
    with Recorder(b, f"{BASE}/_wake/claim") as rec:
        for device in devices:
            bridge = bridge_for(b, device)
            arbiter = MqttArbiter(
                device,
                BASE,
                publish=lambda t, p, bridge=bridge: bridge.publish(t, p, qos=1),
                connected=lambda bridge=bridge: bridge.connected,
            )
            bridge.subscribe(arbiter.topic, arbiter.received)
            tasks.append(asyncio.create_task(bridge.run()))
            made[device] = arbiter
        deadline = time.monotonic() + 10
        # Connected and subscribed: a probe claim reaches every bridge's callback.
        while not all(a._connected() for a in made.values()):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        await rec.sync()
        await asyncio.sleep(0.2)
        try:
            yield made
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_of_three_devices_only_the_loudest_answers(broker: Mosquitto) -> None:
    async with arbiters(broker, "kitchen", "hall", "den") as a:
        levels = {"kitchen": 0.04, "hall": 0.11, "den": 0.02}
        verdicts = await asyncio.gather(
            *(a[d].claim("okay_nabu", 0.95, levels[d], time.time()) for d in levels)
        )
    assert dict(zip(levels, verdicts, strict=True)) == {
        "kitchen": False,
        "hall": True,
        "den": False,
    }


async def test_identical_claims_resolve_the_same_way_everywhere(broker: Mosquitto) -> None:
    async with arbiters(broker, "b-room", "a-room", "c-room") as a:
        verdicts = await asyncio.gather(
            *(arb.claim("okay_nabu", 0.95, 0.05, time.time()) for arb in a.values())
        )
    assert dict(zip(a, verdicts, strict=True)) == {"b-room": False, "a-room": True, "c-room": False}


async def test_a_skewed_clock_still_takes_part(broker: Mosquitto) -> None:
    async with arbiters(broker, "kitchen", "hall") as a:
        kitchen = a["kitchen"].claim("okay_nabu", 0.95, 0.03, time.time() - 7200)
        hall = a["hall"].claim("okay_nabu", 0.95, 0.08, time.time() + 3600)
        assert await asyncio.gather(kitchen, hall) == [False, True]


async def test_claims_for_another_word_or_from_before_the_window_do_not_count(
    broker: Mosquitto,
) -> None:
    async with arbiters(broker, "kitchen", "hall") as a:
        # The hall's loud claim is heard, then the window passes.
        assert await a["hall"].claim("okay_nabu", 0.95, 0.2, time.time())
        await asyncio.sleep(WINDOW_S * 1.5)
        assert await a["kitchen"].claim("okay_nabu", 0.95, 0.01, time.time())
        # At the same moment, but for another word: no contest.
        verdicts = await asyncio.gather(
            a["kitchen"].claim("okay_nabu", 0.95, 0.01, time.time()),
            a["hall"].claim("alexa", 0.95, 0.2, time.time()),
        )
        assert verdicts == [True, True]


async def test_without_a_broker_a_device_answers_at_once(broker: Mosquitto) -> None:
    async with arbiters(broker, "kitchen") as a:
        broker.stop()
        await asyncio.sleep(0.5)
        started = time.monotonic()
        assert await a["kitchen"].claim("okay_nabu", 0.9, 0.01, time.time())
        assert time.monotonic() - started < WINDOW_S / 3  # no waiting for nobody
        broker.start()
