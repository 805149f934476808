"""What arbitration costs: from a wake word's detection to the verdict that releases the
audio held since, with 1, 2 and 5 devices on one private Mosquitto.

Each device is a real `MqttBridge` with its `MqttArbiter`, as the daemon wires them;
in every round all devices claim the same word at once with distinct levels (the
loudest wins). The cost is measured on the winner, from its `claim()` call to its
verdict; the held audio goes out with the next captured frame (at most one period,
20 ms, later). Target: the window (300 ms) plus less than 30 ms.

    python benchmarks/bench_arbitration.py      # prints JSON
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from harkd.arbitration import WINDOW_S, MqttArbiter  # noqa: E402
from harkd.config import DeviceConfig, MqttConfig  # noqa: E402
from harkd.mqtt import MqttBridge  # noqa: E402
from mosquitto import Mosquitto  # noqa: E402
from test_mqtt import FakeController  # noqa: E402

DEVICE_COUNTS = (1, 2, 5)
ROUNDS = 15
TARGET_OVERHEAD_MS = 30.0


async def _devices(
    broker: Mosquitto, count: int
) -> tuple[list[MqttArbiter], list[asyncio.Task[None]]]:
    arbiters: list[MqttArbiter] = []
    tasks: list[asyncio.Task[None]] = []
    bridges: list[MqttBridge] = []
    for index in range(count):
        device = f"device{index}"
        config = MqttConfig(host=broker.host, port=broker.port, discovery_prefix=None)
        bridge = MqttBridge(config, DeviceConfig(id=device), None, FakeController())
        arbiter = MqttArbiter(
            device,
            config.base_topic,
            publish=lambda t, p, b=bridge: b.publish(t, p, qos=1),
            connected=lambda b=bridge: b.connected,
        )
        bridge.subscribe(arbiter.topic, arbiter.received)
        tasks.append(asyncio.create_task(bridge.run()))
        arbiters.append(arbiter)
        bridges.append(bridge)
    deadline = time.monotonic() + 10
    while not all(b.connected for b in bridges):
        if time.monotonic() > deadline:
            raise RuntimeError("bridges did not connect")
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # subscriptions acknowledged
    return arbiters, tasks


async def _timed_claim(arbiter: MqttArbiter, level: float) -> tuple[bool, float]:
    started = time.perf_counter()
    won = await arbiter.claim("okay_nabu", 0.95, level, time.time())
    return won, (time.perf_counter() - started) * 1000


async def measure_count(broker: Mosquitto, count: int) -> dict[str, Any]:
    """Median verdict time of the winner over `ROUNDS`, for `count` devices."""
    arbiters, tasks = await _devices(broker, count)
    winner_ms: list[float] = []
    wrong = 0
    try:
        for round_index in range(ROUNDS):
            loudest = round_index % count
            levels = [0.1 if i == loudest else 0.01 * (i + 1) for i in range(count)]
            outcomes = await asyncio.gather(
                *(_timed_claim(a, level) for a, level in zip(arbiters, levels, strict=True))
            )
            winners = [i for i, (won, _) in enumerate(outcomes) if won]
            wrong += winners != [loudest]
            winner_ms.append(outcomes[loudest][1])
            await asyncio.sleep(WINDOW_S * 1.5)  # the next round's claims stand alone
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    median_ms = statistics.median(winner_ms)
    return {
        "devices": count,
        "verdict_ms_median": round(median_ms, 1),
        "overhead_ms_median": round(median_ms - WINDOW_S * 1000, 1),
        "verdict_ms_max": round(max(winner_ms), 1),
        "rounds": ROUNDS,
        "wrong_verdicts": wrong,
    }


async def measure() -> dict[str, Any]:
    """Every device count against one private broker."""
    with tempfile.TemporaryDirectory(prefix="harkd-bench-arb-") as directory:
        broker = Mosquitto(Path(directory))
        broker.start()
        try:
            results = [await measure_count(broker, count) for count in DEVICE_COUNTS]
        finally:
            broker.stop()
    return {
        "window_ms": WINDOW_S * 1000,
        "target_overhead_ms": TARGET_OVERHEAD_MS,
        "by_devices": results,
    }


def rows(result: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """Table rows: name, figure, detail, target, verdict."""
    out: list[tuple[str, str, str, str, bool | None]] = []
    for entry in result["by_devices"]:
        overhead = entry["overhead_ms_median"]
        out.append(
            (
                f"Arbitration, {entry['devices']} device(s): wake word -> verdict",
                f"{entry['verdict_ms_median']:.1f} ms",
                f"window {result['window_ms']:.0f} ms + {overhead:.1f} ms; "
                f"max {entry['verdict_ms_max']:.1f} ms; wrong verdicts {entry['wrong_verdicts']}"
                f"/{entry['rounds']}",
                f"window + < {TARGET_OVERHEAD_MS:g} ms",
                overhead < TARGET_OVERHEAD_MS and entry["wrong_verdicts"] == 0,
            )
        )
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure()), indent=2))
