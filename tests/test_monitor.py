"""`harkd monitor`: the pure view (apply + render) and a short run against a broker."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections.abc import Callable

from harkd.config import MqttConfig
from harkd.monitor import DeviceView, apply, render, run_monitor
from mosquitto import Mosquitto, Recorder, mosquitto_fixture

broker = mosquitto_fixture()


def feed(
    devices: dict[str, DeviceView], topic: str, payload: object, now: float = 0.0
) -> str | None:
    data = payload if isinstance(payload, bytes) else str(payload).encode()
    if isinstance(payload, dict):
        data = json.dumps(payload).encode()
    return apply(devices, "harkd", topic, data, now)


def test_wake_words_and_claims_show_who_answered() -> None:
    devices: dict[str, DeviceView] = {}
    for device, level in (("kitchen", 0.02), ("hall", 0.11)):
        claim = {"device": device, "word": "okay_nabu", "score": 0.93, "level": level, "ts": 5}
        assert feed(devices, "harkd/_wake/claim", claim) == (
            f"{device} claims okay_nabu level {level:.3f} score 0.93"
        )
    wake = {"word": "okay_nabu", "score": 0.93, "level": 0.11, "ts": 5, "answered": True}
    line = feed(devices, "harkd/hall/wake", wake)
    assert line == "hall wake: okay_nabu score 0.93 level 0.110 (answered)"
    feed(devices, "harkd/kitchen/wake", {**wake, "level": 0.02, "answered": False})
    assert feed(devices, "harkd/_wake/claim", b"garbage") is None
    screen = render(devices, now=0.0)
    assert "claim     okay_nabu level 0.110 score 0.93" in screen
    assert "wake      okay_nabu score 0.93 level 0.020 (not answered)" in screen


def test_apply_folds_the_contract_topics_into_a_view() -> None:
    devices: dict[str, DeviceView] = {}
    assert feed(devices, "harkd/kitchen/status", "connected") == "kitchen status: connected"
    feed(devices, "harkd/kitchen/mode", "speaking")
    feed(devices, "harkd/kitchen/mic_mute", "ON")
    feed(devices, "harkd/kitchen/volume", "40")
    line = feed(
        devices, "harkd/kitchen/transcript/user/partial", {"text": "turn on", "message_id": "u"}
    )
    assert line == "kitchen user ...: turn on"
    final = {"text": "turn on the lights", "message_id": "u", "ts": 1.0}
    assert (
        feed(devices, "harkd/kitchen/transcript/user", final) == "kitchen user: turn on the lights"
    )
    tool = {"call_id": "c", "name": "clock", "arguments": "{}", "output": "12:00", "duration_ms": 1}
    assert feed(devices, "harkd/kitchen/tool_call", tool) == 'kitchen tool: clock({}) -> "12:00"'
    assert feed(devices, "harkd/kitchen/audio/level", {"input": 0.5, "output": 0.25}, 10.0) is None
    err = {"code": "rate_limited", "message": "slow down", "ts": 1}
    assert feed(devices, "harkd/kitchen/error", err) == "kitchen error: rate_limited: slow down"
    # Noise is ignored, never a crash.
    assert feed(devices, "harkd/kitchen/transcript/user", b"not json") is None
    assert feed(devices, "harkd/kitchen/message", {"id": "x"}) is None
    assert feed(devices, "other/kitchen/status", "idle") is None

    view = devices["kitchen"]
    assert (view.status, view.mode, view.mic_mute, view.volume) == (
        "connected",
        "speaking",
        "ON",
        "40",
    )
    assert view.final == {"user": "turn on the lights"} and view.partial == {}
    assert view.levels == (0.5, 0.25) and view.levels_at == 10.0
    assert feed(devices, "harkd/kitchen/error", b"") == "kitchen error cleared"
    assert devices["kitchen"].error is None


def test_render_shows_state_transcripts_tools_and_meters() -> None:
    devices: dict[str, DeviceView] = {}
    for topic, payload in [
        ("status", "connected"),
        ("mode", "listening"),
        ("mic_mute", "OFF"),
        ("volume", "80"),
        ("transcript/assistant", {"text": "It is noon.", "message_id": "a", "ts": 1}),
        ("transcript/user/partial", {"text": "and the wea", "message_id": "u"}),
    ]:
        feed(devices, f"harkd/kitchen/{topic}", payload)
    for i in range(5):
        call = {"call_id": f"c{i}", "name": f"tool{i}", "arguments": "{}", "output": i}
        feed(devices, "harkd/kitchen/tool_call", call)
    feed(devices, "harkd/kitchen/audio/level", {"input": 0.5, "output": 0.0}, now=100.0)
    feed(devices, "harkd/attic/availability", "offline")

    screen = render(devices, now=101.0)
    assert screen.index("== attic (offline) ==") < screen.index("== kitchen ==")
    assert "status connected   mode listening   mic on   volume 80" in screen
    assert "in  [##########----------] 0.50" in screen
    assert "out [--------------------] 0.00" in screen
    assert "assistant It is noon." in screen
    assert "user      ... and the wea" in screen
    assert "tool0" not in screen and "tool1" not in screen and "tool4({}) -> 4" in screen
    # The attic never sent levels; the kitchen's meters go stale after 3 s.
    assert screen.count("levels off") == 1
    assert render(devices, now=104.0).count("levels off") == 2
    assert render({}) == "waiting for harkd devices ...\n"


async def test_run_monitor_prints_a_line_per_event(broker: Mosquitto) -> None:
    out = io.StringIO()  # not a TTY: plain line-per-event output
    config = MqttConfig(host=broker.host, port=broker.port)
    with Recorder(broker, "harkd/#") as rec:
        rec.publish("harkd/kitchen/status", "connected", retain=True)
        rec.publish("harkd/attic/status", "idle", retain=True)
        task = asyncio.create_task(run_monitor(config, None, "kitchen", out))
        try:
            await _until(lambda: "kitchen status: connected" in out.getvalue())
            final = {"text": "turn on the lights", "message_id": "u1", "ts": 1.0}
            rec.publish("harkd/kitchen/transcript/user", json.dumps(final), retain=True)
            await _until(lambda: "kitchen user: turn on the lights" in out.getvalue())
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    assert f"connected to {broker.host}:{broker.port}" in out.getvalue()
    assert "attic" not in out.getvalue()  # one device asked for


async def _until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_run_monitor_redraws_the_screen_on_a_terminal(broker: Mosquitto) -> None:
    out = _Terminal()
    config = MqttConfig(host=broker.host, port=broker.port)
    with Recorder(broker, "harkd/#") as rec:
        rec.publish("harkd/kitchen/status", "connected", retain=True)
        rec.publish("harkd/kitchen/mode", "listening", retain=True)
        started = time.monotonic()
        task = asyncio.create_task(run_monitor(config, None, None, out))
        try:
            await _until(lambda: "mode listening" in out.getvalue())
            await asyncio.sleep(0.5)  # watching a quiet screen for a while
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        watched_s = time.monotonic() - started
    screens = out.getvalue().split("\x1b[H\x1b[2J")[1:]
    # At most ~10 redraws a second of watching (a slow machine only watches longer).
    assert 1 <= len(screens) <= watched_s * 10 + 1, (len(screens), watched_s)
    assert "== kitchen ==" in screens[-1] and "levels off" in screens[-1]
    assert screens[-1].startswith(f"harkd monitor: connected to {broker.host}:{broker.port}")
