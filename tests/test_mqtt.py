"""The MQTT bridge against a real, private Mosquitto broker.

The bridge is the code under test; the broker is real; the realtime client is a small
stand-in (`FakeController`) that records the calls commands make.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.enums import MQTTErrorCode

import harkd.mqtt
from harkd.config import DeviceConfig, MqttConfig
from harkd.ha_discovery import discovery_config, discovery_topic
from harkd.messages import (
    AudioPart,
    AudioVisualization,
    ClientEvent,
    ImagePart,
    MessageFinalized,
    PartialTranscript,
    RealtimeError,
    RealtimeMessage,
    RealtimeMode,
    RealtimeState,
    RealtimeStatus,
    TextPart,
    ToolCallFinished,
    UsageReported,
)
from harkd.mqtt import MqttBridge, make_client, state_payloads
from mosquitto import Mosquitto, Recorder, free_port, mosquitto_fixture, read_retained

# Unlimited broker-side queue for persistent sessions: the queue tests count 1000.
broker = mosquitto_fixture(extra_config=("max_queued_messages 0",))
auth_broker = mosquitto_fixture(users={"harkd": "s3cret-pass"})

B = "harkd/kitchen"
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n fake").decode()


class FakeController:
    """Stands in for RealtimeClient: holds a state, records verbs, emits events."""

    def __init__(self, state: RealtimeState | None = None) -> None:
        self._state = state or RealtimeState()
        self.audio: AudioVisualization | None = None
        self.calls: list[tuple[Any, ...]] = []
        self.fail: set[str] = set()
        self._state_cbs: list[Callable[[RealtimeState], None]] = []
        self._event_cbs: list[Callable[[ClientEvent], None]] = []

    @property
    def state(self) -> RealtimeState:
        return self._state

    def on_state_change(self, cb: Callable[[RealtimeState], None]) -> Callable[[], None]:
        self._state_cbs.append(cb)
        return lambda: self._state_cbs.remove(cb)

    def on_event(self, cb: Callable[[ClientEvent], None]) -> Callable[[], None]:
        self._event_cbs.append(cb)
        return lambda: self._event_cbs.remove(cb)

    def set_state(self, **changes: Any) -> None:
        self._state = replace(self._state, **changes)
        for cb in list(self._state_cbs):
            cb(self._state)

    def emit(self, event: ClientEvent) -> None:
        for cb in list(self._event_cbs):
            cb(event)

    def _record(self, *call: Any) -> None:
        if call[0] in self.fail:
            raise RuntimeError(f"{call[0]} exploded")
        self.calls.append(call)

    def start_listening(self) -> None:
        self._record("start_listening")

    def stop_listening(self) -> None:
        self._record("stop_listening")

    def interrupt(self) -> None:
        self._record("interrupt")

    def send_text(self, text: str) -> None:
        self._record("send_text", text)

    def send_image(self, data: str, mime_type: str) -> None:
        self._record("send_image", data, mime_type)

    def announce(self, text: str, chime: bool = False) -> None:
        self._record("announce", text, chime)

    def set_mic_mute(self, muted: bool) -> None:
        self._record("set_mic_mute", muted)

    def set_volume(self, volume: int) -> None:
        self._record("set_volume", volume)

    async def connect(self) -> None:
        self._record("connect")

    async def disconnect(self) -> None:
        self._record("disconnect")


def make_bridge(
    broker: Mosquitto,
    controller: FakeController,
    device_id: str = "kitchen",
    password: str | None = None,
    **mqtt: Any,
) -> MqttBridge:
    config = MqttConfig(host=broker.host, port=broker.port, **mqtt)
    device = DeviceConfig(id=device_id, name=f"{device_id.title()} voice")
    return MqttBridge(config, device, password, controller, birth_delay_s=(0.05, 0.1))


@contextlib.asynccontextmanager
async def running(bridge: MqttBridge, connect: bool = True) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(bridge.run())
    try:
        if connect:
            await until(lambda: bridge.connected)
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def said(msg_id: str, role: Any, text: str, ts: float, **kw: Any) -> RealtimeMessage:
    return RealtimeMessage(id=msg_id, role=role, timestamp=ts, parts=(AudioPart(text),), **kw)


def busy_state() -> RealtimeState:
    error = RealtimeError("rate_limited", "slow down")
    error.ts = 1234.5
    return RealtimeState(
        status=RealtimeStatus.CONNECTED,
        mode=RealtimeMode.LISTENING,
        messages=(
            said("u1", "user", "turn on the lights", 1000.0),
            said("a1", "assistant", "Done, the lights are on.", 1001.0, interrupted=True),
            # Later messages without a transcript do not replace the last one.
            RealtimeMessage(id="u2", role="user", timestamp=1002.0, parts=(ImagePart(PNG, "i/p"),)),
        ),
        error=error,
        mic_muted=True,
        volume=40,
    )


async def initial_state(rec: Recorder, ctl: FakeController) -> None:
    """Wait until `rec` has the whole state a bridge publishes on connect (each topic
    once, in one batch): later messages are then answers to what the test does."""
    topics = {f"{B}/{sub}" for sub in state_payloads(ctl.state)} | {f"{B}/availability"}
    await until(lambda: topics <= {m.topic for m in rec.messages})


# -- state ---------------------------------------------------------------------------


async def test_every_state_topic_is_retained_and_correct_after_connect(broker: Mosquitto) -> None:
    ctl = FakeController(busy_state())
    ctl.audio = AudioVisualization(input_level=0.5)  # levels are off by default
    with Recorder(broker, f"{B}/#") as rec:
        async with running(make_bridge(broker, ctl)):
            await initial_state(rec, ctl)  # at the broker, so retained for a new reader
            got = await read_retained(broker, f"{B}/#")
    assert got[f"{B}/availability"] == b"online"
    assert got[f"{B}/status"] == b"connected"
    assert got[f"{B}/mode"] == b"listening"
    assert got[f"{B}/mic_mute"] == b"ON"
    assert got[f"{B}/volume"] == b"40"
    assert json.loads(got[f"{B}/transcript/user"]) == {
        "text": "turn on the lights",
        "message_id": "u1",
        "ts": 1000.0,
    }
    assert json.loads(got[f"{B}/transcript/assistant"]) == {
        "text": "Done, the lights are on.",
        "message_id": "a1",
        "ts": 1001.0,
        "interrupted": True,
    }
    assert json.loads(got[f"{B}/error"]) == {
        "code": "rate_limited",
        "message": "slow down",
        "ts": 1234.5,
    }
    assert not any(topic.startswith(f"{B}/audio") for topic in got)


async def test_a_state_change_republishes_only_what_changed(broker: Mosquitto) -> None:
    ctl = FakeController(busy_state())
    with Recorder(broker, f"{B}/#") as rec:
        async with running(make_bridge(broker, ctl)):
            await initial_state(rec, ctl)
            rec.clear()

            ctl.set_state(mode=RealtimeMode.SPEAKING)
            await rec.wait_for(f"{B}/mode", lambda m: m.text == "speaking")
            ctl.set_state(error=None)
            cleared = await rec.wait_for(f"{B}/error")
            new_user = said("u3", "user", "and the heating", 1003.0)
            ctl.set_state(messages=(*ctl.state.messages, new_user))
            user = await rec.wait_for(f"{B}/transcript/user")
            ctl.set_state(volume=40, mic_muted=True)  # unchanged: nothing to send
            # A change after it: what the bridge sends arrives in order, so anything
            # sent for the unchanged state would have come before this.
            ctl.set_state(mode=RealtimeMode.LISTENING)
            await rec.wait_for(f"{B}/mode", lambda m: m.text == "listening")

    assert cleared.payload == b"" and cleared.qos == 1
    assert json.loads(user.payload)["message_id"] == "u3"
    sent = [m.topic for m in rec.messages if m.topic != f"{B}/availability"]
    assert sent == [f"{B}/mode", f"{B}/error", f"{B}/transcript/user", f"{B}/mode"]


async def test_bad_topics_are_refused_and_disabled_mqtt_does_nothing(broker: Mosquitto) -> None:
    bridge = make_bridge(broker, FakeController())
    for bad in ("", "a/+", "a/#"):
        with pytest.raises(ValueError):
            bridge.publish(bad, "x")
    for bad in ("", "a/#/b", "a/b+", "a/#x"):
        with pytest.raises(ValueError):
            bridge.subscribe(bad, lambda *_: None)
    off = make_bridge(broker, FakeController(), enabled=False)
    off.publish(f"{B}/timer/finished", "{}")
    await asyncio.wait_for(off.run(), 1)  # returns at once: nothing to supervise
    assert off.status == "disabled" and not off.connected
    assert await read_retained(broker, "#") == {}


# -- commands ------------------------------------------------------------------------

VALID_COMMANDS: list[tuple[str, bytes, tuple[Any, ...]]] = [
    ("listen", b"", ("start_listening",)),
    ("listen", b"PRESS", ("start_listening",)),
    ("stop_listening", b"", ("stop_listening",)),
    ("interrupt", b"PRESS", ("interrupt",)),
    ("text", "Wie spät ist es?".encode(), ("send_text", "Wie spät ist es?")),
    ("text", b"x" * 4096, ("send_text", "x" * 4096)),
    (
        "image",
        json.dumps({"data": PNG, "mime_type": "image/png"}).encode(),
        ("send_image", PNG, "image/png"),
    ),
    (
        "image",
        json.dumps({"data": "https://cam.local/snap.jpg", "mime_type": "image/jpeg"}).encode(),
        ("send_image", "https://cam.local/snap.jpg", "image/jpeg"),
    ),
    (
        "image",
        json.dumps({"data": f"data:image/png;base64,{PNG}", "mime_type": "image/png"}).encode(),
        ("send_image", f"data:image/png;base64,{PNG}", "image/png"),
    ),
    (
        "announce",
        b"The washing machine is done.",
        ("announce", "The washing machine is done.", False),
    ),
    (
        "announce",
        json.dumps({"text": "Dinner is ready", "chime": True}).encode(),
        ("announce", "Dinner is ready", True),
    ),
    ("announce", json.dumps({"text": "No chime"}).encode(), ("announce", "No chime", False)),
    ("mic_mute", b"ON", ("set_mic_mute", True)),
    ("mic_mute", b"off", ("set_mic_mute", False)),
    ("volume", b"0", ("set_volume", 0)),
    ("volume", b"100", ("set_volume", 100)),
    ("volume", b" 42\n", ("set_volume", 42)),
    ("connect", b"", ("connect",)),
    ("disconnect", b"", ("disconnect",)),
]

BAD_COMMANDS: list[tuple[str, bytes, str]] = [
    ("text", b"", "empty"),
    ("text", b"  \n", "empty"),
    ("text", b"\xff\xfe", "UTF-8"),
    ("text", b"x" * 4097, "at most 4096"),
    ("image", b"not json", "not JSON"),
    ("image", b"[1, 2]", "JSON object"),
    ("image", json.dumps({"data": PNG, "mime_type": "text/plain"}).encode(), "mime_type"),
    ("image", json.dumps({"data": PNG}).encode(), "mime_type"),
    ("image", json.dumps({"data": "", "mime_type": "image/png"}).encode(), "data"),
    ("image", json.dumps({"data": 5, "mime_type": "image/png"}).encode(), "data"),
    ("image", json.dumps({"data": "no base64!", "mime_type": "image/png"}).encode(), "base64"),
    ("image", json.dumps({"data": "data:text/html,<b>", "mime_type": "image/png"}).encode(), "URL"),
    ("image", b'{"data": "' + b"A" * (1024 * 1024) + b'"}', "at most 1048576"),
    ("announce", b"", "empty"),
    ("announce", b'{"text": ""}', "empty"),
    ("announce", b'{"text": 5}', "empty"),
    ("announce", b'{"text": "hi", "chime": "yes"}', "chime must be true or false"),
    ("announce", b"{not json", "not JSON"),
    ("announce", b"x" * 4097, "at most 4096"),
    ("mic_mute", b"maybe", "ON or OFF"),
    ("mic_mute", b"true", "ON or OFF"),
    ("mic_mute", b"", "ON or OFF"),
    ("volume", b"101", "0..100"),
    ("volume", b"-1", "0..100"),
    ("volume", b"4.5", "integer"),
    ("volume", b"loud", "integer"),
    ("volume", b"", "integer"),
    ("reboot", b"now", "unknown command"),
]


async def test_every_command_with_a_valid_payload_reaches_the_controller(broker: Mosquitto) -> None:
    ctl = FakeController()
    with Recorder(broker, f"{B}/#") as rec:
        async with running(make_bridge(broker, ctl)):
            for name, payload, call in VALID_COMMANDS:
                ctl.calls.clear()
                rec.publish(f"{B}/cmd/{name}", payload)
                await until(lambda: bool(ctl.calls))
                assert ctl.calls == [call], name
    # No complaints: B/error only carried the client's (empty) error state.
    assert [m.payload for m in rec.on(f"{B}/error")] == [b""]


async def test_a_bad_command_is_answered_on_error_and_changes_nothing(broker: Mosquitto) -> None:
    ctl = FakeController()
    with Recorder(broker, f"{B}/#") as rec:
        async with running(make_bridge(broker, ctl)):
            await rec.wait_for(f"{B}/error")  # the (empty) retained error state
            for name, payload, why in BAD_COMMANDS:
                rec.clear()
                topic = f"{B}/cmd/{name}"
                rec.publish(topic, payload)
                answer = await rec.wait_for(f"{B}/error")
                body = json.loads(answer.payload)
                assert body["code"] == "bad_command", name
                assert body["message"].startswith(f"{topic}: "), body
                assert why in body["message"], (name, payload[:20], body["message"])
                assert isinstance(body["ts"], float)
                assert not answer.retain
        # A retained command is never acted on (it would replay on each reconnect).
        rec.publish(f"{B}/cmd/interrupt", b"PRESS", retain=True)
        rec.clear()
        async with running(make_bridge(broker, ctl)):
            # `online` is published after subscribing, so the retained command was on
            # its way by then; a live command sent now is handled after it.
            await rec.wait_for(f"{B}/availability", lambda m: m.text == "online")
            rec.publish(f"{B}/cmd/volume", b"7")
            await until(lambda: bool(ctl.calls))
        rec.publish(f"{B}/cmd/interrupt", b"", retain=True)  # clear it
        retained = await read_retained(broker, f"{B}/#")
    assert ctl.calls == [("set_volume", 7)]
    # The retained error state is still the client's (none: an empty retained payload
    # clears it), not a command's answer.
    assert f"{B}/error" not in retained
    assert retained[f"{B}/status"] == b"idle"


async def test_a_failing_handler_is_reported_and_the_bridge_goes_on(broker: Mosquitto) -> None:
    ctl = FakeController()
    ctl.fail = {"send_text", "connect"}
    with Recorder(broker, f"{B}/#") as rec:
        async with running(make_bridge(broker, ctl)) as task:
            await rec.wait_for(f"{B}/error")
            rec.clear()
            rec.publish(f"{B}/cmd/text", b"hello")
            text_err = await rec.wait_for(f"{B}/error")
            rec.clear()
            rec.publish(f"{B}/cmd/connect", b"")
            connect_err = await rec.wait_for(f"{B}/error")
            rec.publish(f"{B}/cmd/volume", b"7")
            await until(lambda: ctl.calls == [("set_volume", 7)])
            assert not task.done()
    assert json.loads(text_err.payload)["code"] == "command_failed"
    assert "send_text exploded" in json.loads(text_err.payload)["message"]
    assert json.loads(connect_err.payload)["message"].startswith(f"{B}/cmd/connect: ")


# -- events --------------------------------------------------------------------------


async def test_events_are_published_with_their_qos(broker: Mosquitto) -> None:
    ctl = FakeController()
    message = RealtimeMessage(id="a9", role="assistant", timestamp=5.0, parts=(TextPart("hi"),))
    tool = ToolCallFinished("c1", "clock", "{}", output={"time": "12:00"}, duration_ms=3.21)
    with Recorder(broker, f"{B}/#") as rec:
        async with running(make_bridge(broker, ctl)):
            ctl.emit(MessageFinalized(message))
            ctl.emit(tool)
            ctl.emit(UsageReported("r1", "completed", {"total_tokens": 42}))
            got_message = await rec.wait_for(f"{B}/message")
            got_tool = await rec.wait_for(f"{B}/tool_call")
            got_usage = await rec.wait_for(f"{B}/usage")
    assert json.loads(got_message.payload) == message.to_dict() and got_message.qos == 1
    assert json.loads(got_tool.payload) == {
        "call_id": "c1",
        "name": "clock",
        "arguments": "{}",
        "output": {"time": "12:00"},
        "duration_ms": 3.2,
    }
    assert got_tool.qos == 1 and not got_tool.retain
    assert json.loads(got_usage.payload)["usage"] == {"total_tokens": 42}
    assert got_usage.qos == 0


async def test_partial_transcripts_are_rate_limited_and_the_last_is_delivered(
    broker: Mosquitto,
) -> None:
    ctl = FakeController()
    words = [f"w{i}" for i in range(50)]
    with Recorder(broker, f"{B}/transcript/#") as rec:
        async with running(make_bridge(broker, ctl)):
            first_emit = time.monotonic()
            for i in range(50):  # 50 deltas per role, over at least 1 s
                text = " ".join(words[: i + 1])
                ctl.emit(PartialTranscript("assistant", "a1", text))
                ctl.emit(PartialTranscript("user", "u1", text.upper()))
                await asyncio.sleep(0.02)
            final = " ".join(words)
            await rec.wait_for(f"{B}/transcript/assistant/partial", lambda m: final in m.text)
            await rec.wait_for(f"{B}/transcript/user/partial", lambda m: final.upper() in m.text)
    for role in ("user", "assistant"):
        partials = rec.on(f"{B}/transcript/{role}/partial")
        # Every one was published between the first delta and its own arrival; at 10 a
        # second at most. A slow machine only widens that span, never narrows it.
        span_s = partials[-1].at - first_emit
        assert 3 <= len(partials) <= span_s * 10 + 2, (role, len(partials), span_s)
        assert all(m.qos == 0 and not m.retain for m in partials)
    last = json.loads(rec.on(f"{B}/transcript/assistant/partial")[-1].payload)
    assert last == {"text": final, "message_id": "a1"}


async def test_audio_levels_at_most_ten_a_second_when_enabled(broker: Mosquitto) -> None:
    ctl = FakeController()
    ctl.audio = AudioVisualization(input_level=0.5, output_level=0.25)
    with Recorder(broker, f"{B}/audio/level") as rec:
        started = time.monotonic()
        async with running(make_bridge(broker, ctl, publish_levels=True)):
            first = await rec.wait_for(f"{B}/audio/level")
            step = 0
            while len(rec.messages) < 8:  # levels change every 10 ms
                step += 1
                level = step % 100 / 100
                ctl.audio = AudioVisualization(input_level=level, output_level=1 - level)
                await asyncio.sleep(0.01)
                assert time.monotonic() - started < 30, "levels stopped coming"
        # All were published while the bridge ran: at most 10 a second of that (plus
        # the first at once). A slow machine only lengthens the run.
        ran_s = time.monotonic() - started
    assert json.loads(first.payload) == {"input": 0.5, "output": 0.25}
    assert first.qos == 0
    assert len(rec.messages) <= ran_s * 10 + 1, (len(rec.messages), ran_s)


# -- discovery -----------------------------------------------------------------------


def test_discovery_payload_describes_the_device_and_its_entities() -> None:
    device = DeviceConfig(id="kitchen", name="Kitchen voice")
    config = discovery_config(device, B, "1.2.3", "https://example.invalid/harkd")
    assert discovery_topic("homeassistant", "kitchen") == (
        "homeassistant/device/harkd_kitchen/config"
    )
    assert config["device"] == {
        "identifiers": ["harkd_kitchen"],
        "name": "Kitchen voice",
        "manufacturer": "harkd",
        "model": "harkd voice daemon",
        "sw_version": "1.2.3",
    }
    assert config["origin"] == {
        "name": "harkd",
        "sw_version": "1.2.3",
        "support_url": "https://example.invalid/harkd",
    }
    assert config["availability"] == [
        {
            "topic": f"{B}/availability",
            "payload_available": "online",
            "payload_not_available": "offline",
        }
    ]
    cmps = config["components"]
    assert {key: c["platform"] for key, c in cmps.items()} == {
        "status": "sensor",
        "mode": "sensor",
        "last_user_transcript": "sensor",
        "last_assistant_transcript": "sensor",
        "listen": "button",
        "interrupt": "button",
        "mic_mute": "switch",
        "volume": "number",
        "send_text": "text",
        "announce": "notify",
    }
    for key, c in cmps.items():
        assert c["unique_id"] == f"harkd_kitchen_{key}"
        assert c["object_id"] == f"kitchen_{key}"
        assert c["default_entity_id"] == f"{c['platform']}.kitchen_{key}"
    assert cmps["status"]["device_class"] == "enum"
    assert cmps["status"]["options"] == ["idle", "connecting", "connected", "reconnecting", "error"]
    assert cmps["status"]["state_topic"] == f"{B}/status"
    assert cmps["mode"]["options"] == ["idle", "listening", "thinking", "speaking"]
    for role in ("user", "assistant"):
        sensor = cmps[f"last_{role}_transcript"]
        assert sensor["state_topic"] == sensor["json_attributes_topic"] == f"{B}/transcript/{role}"
        assert sensor["value_template"] == "{{ value_json.text[:255] }}"
    assert cmps["listen"]["command_topic"] == f"{B}/cmd/listen"
    assert cmps["interrupt"]["command_topic"] == f"{B}/cmd/interrupt"
    mute = cmps["mic_mute"]
    assert (mute["state_topic"], mute["command_topic"]) == (f"{B}/mic_mute", f"{B}/cmd/mic_mute")
    assert (mute["payload_on"], mute["payload_off"]) == ("ON", "OFF")
    volume = cmps["volume"]
    assert (volume["min"], volume["max"], volume["step"]) == (0, 100, 1)
    assert (volume["state_topic"], volume["command_topic"]) == (f"{B}/volume", f"{B}/cmd/volume")
    assert cmps["send_text"]["command_topic"] == f"{B}/cmd/text"
    assert cmps["send_text"]["max"] == 255
    assert cmps["announce"]["command_topic"] == f"{B}/cmd/announce"
    # No origin URL when the package declares none.
    assert "support_url" not in discovery_config(device, B, "1.2.3")["origin"]


async def test_discovery_is_retained_and_republished_on_home_assistant_birth(
    broker: Mosquitto,
) -> None:
    ctl = FakeController()
    topic = discovery_topic("ha_test", "kitchen")
    with Recorder(broker, "#") as rec:
        async with running(make_bridge(broker, ctl, discovery_prefix="ha_test")):
            await rec.wait_for(topic)
            await initial_state(rec, ctl)
            retained = await read_retained(broker, topic)
            rec.clear()
            rec.publish("ha_test/status", b"offline")  # HA going away: nothing to do
            await birth_delay_passed(rec, ctl)
            rec.publish("ha_test/status", b"online")
            again = await rec.wait_for(topic)
            await rec.wait_for(f"{B}/status")  # the state comes with it
            await rec.wait_for(f"{B}/availability", lambda m: m.text == "online")
            # The bridge sends in order: a republish for `offline` would be here first.
            assert len(rec.on(topic)) == 1
    config = json.loads(retained[topic])
    assert config["components"]["status"]["unique_id"] == "harkd_kitchen_status"
    assert config["device"]["identifiers"] == ["harkd_kitchen"]
    assert config["origin"]["name"] == "harkd"
    assert json.loads(again.payload) == config and again.qos == 1
    assert "harkd-kitchen" in _subscribers_of(broker, "ha_test/status")


async def test_discovery_off_publishes_and_subscribes_nothing_outside_base(
    broker: Mosquitto,
) -> None:
    ctl = FakeController()
    with Recorder(broker, "#") as rec:
        async with running(make_bridge(broker, ctl, discovery_prefix=None)):
            await rec.wait_for(f"{B}/status")
            rec.publish("homeassistant/status", b"online")
            await birth_delay_passed(rec, ctl)
            # Sent after any republish the birth message could have caused.
            ctl.set_state(mode=RealtimeMode.SPEAKING)
            await rec.wait_for(f"{B}/mode", lambda m: m.text == "speaking")
    topics = {m.topic for m in rec.messages} - {"homeassistant/status"}
    assert topics and all(t.startswith(f"{B}/") for t in topics), topics
    assert "harkd-kitchen" not in _subscribers_of(broker, "homeassistant/status")


async def birth_delay_passed(rec: Recorder, ctl: FakeController) -> None:
    """The bridge has handled what `rec` published so far and any birth republish it
    scheduled for it is out: a command round trip (the bridge gets its messages in
    order), then the longest birth delay on this same loop, whose timers run in order."""
    before = len(ctl.calls)
    rec.publish(f"{B}/cmd/volume", b"33")
    await until(lambda: len(ctl.calls) > before)
    await asyncio.sleep(0.1 + 0.01)  # make_bridge's birth_delay_s is at most 0.1 s


def _subscribers_of(broker: Mosquitto, topic: str) -> str:
    # The test broker logs subscriptions (log_type subscribe): "<client> 1 <topic>".
    return "\n".join(line for line in broker.log_text().splitlines() if line.endswith(f" {topic}"))


# -- connection life -----------------------------------------------------------------


async def test_broker_restart_restores_state_and_delivers_queued_events(broker: Mosquitto) -> None:
    ctl = FakeController(busy_state())
    bridge = make_bridge(broker, ctl)
    lamp: list[tuple[str, bytes, bool]] = []
    bridge.subscribe("zigbee/+/state", lambda *m: lamp.append(m))
    message = said("a2", "assistant", "It is noon.", 2000.0)
    with Recorder(broker, f"{B}/#", session="rec-restart") as rec:
        rec.publish("zigbee/lamp/state", b"on", retain=True)
        async with running(bridge):
            await until(lambda: ("zigbee/lamp/state", b"on", True) in lamp)
            broker.stop()
            await until(lambda: not bridge.connected)
            assert "reconnecting" in bridge.status
            # While the broker is away: state moves on, events and plugin messages queue.
            ctl.set_state(mode=RealtimeMode.SPEAKING)
            ctl.emit(MessageFinalized(message))
            ctl.emit(ToolCallFinished("c2", "clock", "{}", output="12:00"))
            bridge.publish(f"{B}/timer/finished", '{"id": "t1"}')
            ctl.emit(PartialTranscript("user", "u9", "lost"))  # QoS 0: dropped
            lamp.clear()
            rec.clear()
            broker.start()
            await until(lambda: bridge.connected, timeout_s=10)
            got = await rec.wait_for(f"{B}/message", timeout_s=10)
            await rec.wait_for(f"{B}/tool_call")
            await rec.wait_for(f"{B}/timer/finished")
            await rec.wait_for(f"{B}/mode", lambda m: m.text == "speaking")
            await until(lambda: ("zigbee/lamp/state", b"on", True) in lamp)  # resubscribed
            state = await read_retained(broker, f"{B}/#")
    assert json.loads(got.payload)["id"] == "a2"
    assert rec.on(f"{B}/transcript/user/partial") == []
    assert state[f"{B}/mode"] == b"speaking"
    assert state[f"{B}/availability"] == b"online"


async def test_offline_queue_is_bounded_and_drops_the_oldest(
    broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="harkd")
    with Recorder(broker, "harkd/q/n", session="rec-queue"):
        pass  # leaves a persistent session on the broker that collects while we wait
    broker.stop()
    bridge = make_bridge(broker, FakeController(), device_id="q")
    async with running(bridge, connect=False):
        await until(lambda: "unreachable" in bridge.status)  # down at start: just a status
        for i in range(1005):
            bridge.publish("harkd/q/n", str(i))
        broker.start()
        await until(lambda: bridge.connected, timeout_s=10)
        with Recorder(broker, "harkd/q/n", session="rec-queue") as rec:
            await until(lambda: len(rec.messages) >= 1000)
            await rec.sync()  # nothing more is coming
    assert sorted(int(m.text) for m in rec.messages) == list(range(5, 1005))
    drops = [r for r in caplog.records if "dropping the oldest" in r.getMessage()]
    assert len(drops) == 1 and drops[0].levelno == logging.WARNING
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert unreachable[0].levelno == logging.WARNING
    assert all(r.levelno == logging.DEBUG for r in unreachable[1:])


def test_paho_queues_qos1_but_drops_qos0_while_not_yet_connected(broker: Mosquitto) -> None:
    # The library fact the bridge relies on for the moments before it learns of a
    # disconnect: paho keeps QoS 1 in memory and sends it after (re)connecting.
    broker.stop()
    client = make_client(MqttConfig(host=broker.host, port=broker.port), None, "paho-fact")
    client.connect_async(broker.host, broker.port)
    client.loop_start()
    try:
        qos1 = client.publish("fact/qos1", b"kept", qos=1, retain=True)
        qos0 = client.publish("fact/qos0", b"lost", qos=0, retain=True)
        # rc says "not connected" (and wait_for_publish would raise), yet QoS 1 is kept.
        assert qos1.rc == qos0.rc == MQTTErrorCode.MQTT_ERR_NO_CONN
        broker.start()
        with Recorder(broker, "fact/#") as rec:
            rec.wait_for_blocking("fact/qos1", timeout_s=20)
            # Sent after both on the same connection: a kept QoS 0 would come first.
            client.publish("fact/later", b"marker", qos=1)
            rec.wait_for_blocking("fact/later", timeout_s=20)
    finally:
        client.disconnect()
        client.loop_stop()
    assert {m.topic: m.payload for m in rec.messages} == {
        "fact/qos1": b"kept",
        "fact/later": b"marker",
    }


async def test_clean_shutdown_publishes_offline_quickly(
    broker: Mosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Quick means on the broker's acknowledgement, not at the end of a bounded wait:
    # with the bound made long, a shutdown that waited it out would take 30 s.
    monkeypatch.setattr(harkd.mqtt, "SHUTDOWN_TIMEOUT_S", 30.0)
    with Recorder(broker, f"{B}/availability") as rec:
        task = asyncio.create_task(make_bridge(broker, FakeController()).run())
        await rec.wait_for(f"{B}/availability", lambda m: m.text == "online")
        start = time.monotonic()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        took_s = time.monotonic() - start
        await rec.wait_for(f"{B}/availability", lambda m: m.text == "offline")
    assert task.cancelled()
    print(f"\ncancel to offline acknowledged: {took_s * 1000:.0f} ms")
    assert took_s < 10.0
    assert (await read_retained(broker, f"{B}/availability"))[f"{B}/availability"] == b"offline"


CHILD = """
import asyncio, logging, selectors, sys, time
sys.path.insert(0, sys.argv[1])
from test_mqtt import FakeController
from harkd.config import DeviceConfig, MqttConfig
from harkd.mqtt import MqttBridge, make_client

class CountingSelector(selectors.DefaultSelector):
    wakeups = 0  # one per event-loop iteration

    def select(self, timeout=None):
        CountingSelector.wakeups += 1
        return super().select(timeout)

class Attempts(logging.Handler):
    count = 0  # one "unreachable" record per failed connection attempt

    def emit(self, record):
        if "unreachable" in record.getMessage():
            Attempts.count += 1

async def main(port: int, device: str, measure: bool) -> None:
    config = MqttConfig(host="127.0.0.1", port=port)
    bridge = MqttBridge(config, DeviceConfig(id=device), None, FakeController())
    task = asyncio.create_task(bridge.run())
    await asyncio.sleep(0.5)
    if measure:
        wall, cpu = time.monotonic(), time.process_time()
        wakeups, attempts = CountingSelector.wakeups, Attempts.count
        await asyncio.sleep(2.0)
        window = time.monotonic() - wall
        share = (time.process_time() - cpu) / window
        print(
            f"wakeups={CountingSelector.wakeups - wakeups} attempts={Attempts.count - attempts}"
            f" window={window:.2f} cpu={share:.4f} status={bridge.status}",
            flush=True,
        )
        task.cancel()
    else:
        print("running", flush=True)
    await asyncio.gather(task, return_exceptions=True)

logger = logging.getLogger("harkd")
logger.setLevel(logging.DEBUG)
logger.addHandler(Attempts())
loop = asyncio.SelectorEventLoop(CountingSelector())
loop.run_until_complete(main(int(sys.argv[2]), sys.argv[3], sys.argv[4] == "cpu"))
"""


def _child(port: int, device: str, mode: str) -> subprocess.Popen[str]:
    tests_dir = str(Path(__file__).parent)
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, tests_dir, str(port), device, mode],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": tests_dir},
    )


def test_a_killed_daemon_is_reported_offline_by_its_last_will(broker: Mosquitto) -> None:
    topic = "harkd/victim/availability"
    with Recorder(broker, topic) as rec:
        child = _child(broker.port, "victim", "run")
        try:
            rec.wait_for_blocking(topic, lambda m: m.text == "online", timeout_s=10)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        rec.wait_for_blocking(topic, lambda m: m.text == "offline")


def test_idle_with_the_broker_down_wakes_rarely() -> None:
    """Counts, not a CPU share (which would depend on the machine): while the broker
    is down, the event loop wakes a few times a second at most and connection attempts
    back off. A busy loop or a retry storm would be hundreds or thousands."""
    child = _child(free_port(), "idle", "cpu")
    out, _ = child.communicate(timeout=60)
    line = out.strip().splitlines()[-1]
    print(f"\n{line}")
    fields = dict(part.split("=", 1) for part in line.split()[:4])
    window_s = float(fields["window"])
    assert "unreachable" in line
    assert int(fields["wakeups"]) <= 5 * window_s + 2, line
    assert int(fields["attempts"]) <= window_s + 1, line


async def test_username_and_password(
    auth_broker: Mosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="harkd")
    good = make_bridge(auth_broker, FakeController(), "good", "s3cret-pass", username="harkd")
    async with running(good):
        retained = await _read_retained_as(auth_broker, "harkd/good/availability")
    assert retained == b"online"

    bad = make_bridge(auth_broker, FakeController(), "bad", "wrong-pass", username="harkd")

    def refusals() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "refused" in r.getMessage()]

    started = time.monotonic()
    async with running(bad, connect=False) as task:
        # Two refusals: the bridge retried, and logs a repeat differently.
        await until(lambda: len(refusals()) >= 2)
        retried_after_s = time.monotonic() - started
        assert not bad.connected and not task.done()
        assert "refused" in bad.status
    attempts = auth_broker.log_text().count("not authorised")
    # Backoff 1 s, 2 s, ...: at most one attempt a second, not a busy loop (a slow
    # machine only makes the wait longer, which allows more).
    assert 2 <= attempts <= retried_after_s + 2, (attempts, retried_after_s)
    first, *repeats = refusals()
    assert first.levelno == logging.WARNING
    assert all(r.levelno == logging.DEBUG for r in repeats)
    assert "s3cret-pass" not in caplog.text and "wrong-pass" not in caplog.text


async def _read_retained_as(broker: Mosquitto, topic: str) -> bytes | None:
    # The auth broker refuses anonymous readers: read with the same credentials.
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    got: list[bytes] = []
    client = paho.Client(CallbackAPIVersion.VERSION2)
    client.username_pw_set("harkd", "s3cret-pass")
    client.on_connect = lambda c, *_: c.subscribe(topic, 1)
    client.on_message = lambda _c, _u, msg: got.append(bytes(msg.payload))
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        await until(lambda: bool(got))
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0]
