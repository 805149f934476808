"""Plugins end to end (issue 6, "Done means"): each built-in plugin's tools go through
a full round trip with the fake realtime server over real websockets, with the
daemon's MQTT bridge on a private Mosquitto broker; a third-party plugin installed
as a real distribution offers its tools to the model the same way.

The model's side is scripted (`ToolRule`): a user message matching a rule makes the
fake model call the tool; the daemon runs it, sends one `function_call_output` per
call and a single `response.create`, and the model answers with what it got.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from e2e import assert_all_valid, sent_types, until
from harkd.adapters.openai import openai_realtime
from harkd.backoff import Backoff
from harkd.client import RealtimeClient
from harkd.config import DeviceConfig, MqttConfig
from harkd.messages import RealtimeStatus, ToolCallFinished
from harkd.mqtt import MqttBridge
from harkd.plugins import LoadedPlugins, PluginHost, load_plugins
from harkd.testing import FakeRealtimeServer, FakeScript, ToolRule
from harkd.tokens import static_token
from mosquitto import Mosquitto, Recorder, mosquitto_fixture
from test_plugins import acme  # noqa: F401 - pytest fixture: the installed third-party plugin

pytestmark = pytest.mark.timeout(30)

KEY = "sk-test-plugins-0123456789"
BASE = "harkd/kitchen"
LIGHT = "zigbee2mqtt/kitchen_light"

broker = mosquitto_fixture(scope="module")

RULES = [
    ToolRule(r"^what time is it", "get_time"),
    ToolRule(r"^set a tea timer", "set_timer", {"duration_s": 1, "label": "tea"}),
    ToolRule(
        r"^turn the kitchen light on",
        "mqtt_publish",
        {"topic": f"{LIGHT}/set", "payload": {"state": "ON"}},
    ),
    ToolRule(r"^is the kitchen light on", "mqtt_read_state", {"topic": LIGHT}),
    ToolRule(r"^open the garage", "mqtt_publish", {"topic": "garage/door/set", "payload": "OPEN"}),
    ToolRule(r"^greet (\w+)", "say_hello", lambda m: {"name": m.group(1)}),
]


@dataclass
class Daemon:
    """What the supervisor wires, minus audio: client, MQTT bridge, plugins."""

    server: FakeRealtimeServer
    client: RealtimeClient
    bridge: MqttBridge
    loaded: LoadedPlugins
    calls: list[ToolCallFinished]

    def outputs(self) -> list[dict[str, Any]]:
        """Every `function_call_output` the server received, its output parsed."""
        return [
            {"call_id": e["item"]["call_id"], **json.loads(e["item"]["output"])}
            for _, e in self.server.received
            if e["type"] == "conversation.item.create"
            and e["item"]["type"] == "function_call_output"
        ]

    async def ask(self, text: str) -> dict[str, Any]:
        """Say `text`; wait for the tool's output and the model's answer to it."""
        before = len(self.outputs())
        answers = self._answers()
        self.client.send_text(text)
        await until(lambda: len(self.outputs()) > before, what=f"tool output for {text!r}")
        await until(lambda: self._answers() > answers, what=f"answer to {text!r}")
        return self.outputs()[-1]

    def _answers(self) -> int:
        return sum(
            1 for m in self.client.messages if m.role == "assistant" and "returned" in m.text
        )


@contextlib.asynccontextmanager
async def daemon(
    broker: Mosquitto,
    tmp_path: Path,
    plugins: Mapping[str, Mapping[str, Any]],
    background: tuple[str, ...] = (),
) -> AsyncIterator[Daemon]:
    """Run client, bridge and the named plugins' background tasks, as the service does."""
    script = FakeScript(tool_rules=RULES, audio_ms_per_char=5)
    async with FakeRealtimeServer(script=script, api_keys={KEY}) as server:
        client = RealtimeClient(
            get_token=static_token(KEY),
            adapter=openai_realtime(url=server.url),
            instructions="Be brief.",
            reconnect=Backoff(0.05, 0.2),
        )
        mqtt = MqttConfig(host=broker.host, port=broker.port, discovery_prefix=None)
        bridge = MqttBridge(mqtt, DeviceConfig(id="kitchen"), None, client)
        host = PluginHost(
            "kitchen",
            tmp_path / "state",
            base_topic=BASE,
            say=client.say,
            publish=bridge.publish,
            subscribe=bridge.subscribe,
        )
        loaded = load_plugins(plugins, host)
        assert loaded.problems == (), loaded.problems
        client.update_settings(tools=loaded.tools)
        calls: list[ToolCallFinished] = []
        client.on_event(lambda e: calls.append(e) if isinstance(e, ToolCallFinished) else None)
        tasks = [
            asyncio.create_task(bridge.run()),
            asyncio.create_task(client.run()),
            *(
                asyncio.create_task(b.run())
                for b in loaded.background
                if b.name.split(":")[1] in background
            ),
        ]
        try:
            await until(lambda: bridge.connected, what="MQTT connected")
            await until(lambda: client.status is RealtimeStatus.CONNECTED, what="connected")
            yield Daemon(server, client, bridge, loaded, calls)
            assert_all_valid(server)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def declared_tools(server: FakeRealtimeServer) -> list[str]:
    [update] = [e for _, e in server.received if e["type"] == "session.update"]
    return [t["name"] for t in update["session"]["tools"]]


def responses_after_output(server: FakeRealtimeServer) -> list[str]:
    """Client events after the last function_call_output (expect one response.create)."""
    types = sent_types(server)
    last = max(
        i
        for i, (_, e) in enumerate(server.received)
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"
    )
    return types[last + 1 :]


async def test_clock_tells_the_time(broker: Mosquitto, tmp_path: Path) -> None:
    async with daemon(broker, tmp_path, {"clock": {"timezone": "Europe/Berlin"}}) as d:
        assert declared_tools(d.server) == ["get_time"]
        output = await d.ask("what time is it?")
        assert output["timezone"] == "Europe/Berlin"
        assert len(output["time"]) == 5 and output["weekday"]
        assert responses_after_output(d.server) == ["response.create"]
        [call] = d.calls
        assert (call.name, call.error) == ("get_time", None)
        answer = d.client.messages[-1]
        assert answer.role == "assistant" and output["time"] in answer.text


async def test_timer_finishes_announces_and_publishes(broker: Mosquitto, tmp_path: Path) -> None:
    with Recorder(broker, f"{BASE}/timer/#") as recorder:
        async with daemon(broker, tmp_path, {"timers": {}}, background=("timers",)) as d:
            assert declared_tools(d.server) == ["set_timer", "list_timers", "cancel_timer"]
            output = await d.ask("set a tea timer for one second")
            assert (output["id"], output["label"], output["duration_s"]) == ("1", "tea", 1)
            assert recorder.on(f"{BASE}/timer/finished") == []

            # A second later the assistant is made to speak, unprompted.
            finished = await recorder.wait_for(f"{BASE}/timer/finished", timeout_s=3)
            assert json.loads(finished.payload) == {"id": "1", "label": "tea", "duration_s": 1}
            assert finished.qos == 1 and not finished.retain

            def announced() -> list[int]:
                return [
                    i
                    for i, (_, e) in enumerate(d.server.received)
                    if e["type"] == "conversation.item.create"
                    and e["item"].get("role") == "system"
                    and "Your tea timer is done." in e["item"]["content"][0]["text"]
                ]

            await until(lambda: announced() != [], what="the announcement item")
            [at] = announced()
            await until(
                lambda: "response.create" in sent_types(d.server)[at + 1 :],
                what="a response for the announcement",
            )
            assert sent_types(d.server)[at + 1 :].count("response.create") == 1
            # The model answers it (its item is in the conversation, then spoken).
            await until(
                lambda: len(d.server.sessions[0].responses) == 3, what="the announcement answer"
            )
            assert d.server.sessions[0].responses[-1]["status"] == "completed"
            # The timer is gone from the persisted state.
            saved = json.loads((tmp_path / "state/plugins/timers/timers.json").read_text())
            assert saved["timers"] == []


async def test_mqtt_plugin_drives_devices_on_the_broker(broker: Mosquitto, tmp_path: Path) -> None:
    options = {"allow": [f"{LIGHT}/set", LIGHT], "read_timeout_s": 1}
    with Recorder(broker, "#") as recorder:
        # A device's retained state, there before the daemon starts.
        recorder.publish(LIGHT, json.dumps({"state": "OFF", "brightness": 80}), retain=True)
        async with daemon(broker, tmp_path, {"mqtt": options}) as d:
            assert declared_tools(d.server) == ["mqtt_publish", "mqtt_read_state"]

            output = await d.ask("turn the kitchen light on")
            assert output["published"] == f"{LIGHT}/set" and "error" not in output
            message = await recorder.wait_for(f"{LIGHT}/set")
            assert json.loads(message.payload) == {"state": "ON"}
            assert not message.retain

            output = await d.ask("is the kitchen light on?")
            assert output["payload"] == {"state": "OFF", "brightness": 80}
            assert output["retained"] is True

            output = await d.ask("open the garage door")
            assert output["error"].startswith("topic not allowed: garage/door/set")
            refused = d.calls[-1]
            assert refused.name == "mqtt_publish" and refused.error is not None
            # The session goes on: the model was answered and answered back.
            assert responses_after_output(d.server) == ["response.create"]
            assert d.client.error is None
            # A publish after it, through the same bridge, arrives after anything the
            # refused call could have sent.
            await d.ask("turn the kitchen light on")
            await until(lambda: len(recorder.on(f"{LIGHT}/set")) == 2, what="the light again")
            assert recorder.on("garage/door/set") == []


@pytest.mark.usefixtures("acme")
async def test_third_party_plugin_tools_reach_the_model(broker: Mosquitto, tmp_path: Path) -> None:
    plugins = {"hello": {"greeting": "Hi"}, "clock": {}}
    async with daemon(broker, tmp_path, plugins) as d:
        assert d.loaded.plugins == ("hello", "clock")
        [update] = [e for _, e in d.server.received if e["type"] == "session.update"]
        tools = {t["name"]: t for t in update["session"]["tools"]}
        assert list(tools) == ["say_hello", "get_time"]
        assert tools["say_hello"] == {
            "type": "function",
            "name": "say_hello",
            "description": "Greet someone by name.",
            "parameters": {
                "type": "object",
                "properties": {"name": {"type": "string"}},
                "required": ["name"],
            },
        }
        output = await d.ask("greet Ada please")
        assert output == {
            "call_id": output["call_id"],
            "text": "Hi, Ada!",
            "device": "kitchen",
        }
