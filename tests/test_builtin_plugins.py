"""The built-in plugins clock, timers and mqtt, at unit level with recording callables."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from harkd.plugins import BackgroundTask, LoadedPlugins, PluginHost, load_plugins
from harkd.tools import ToolCall, ToolOutcome, ToolRunner
from harkd_plugins.mqtt_devices import filter_problem, topic_matches

MessageCallback = Callable[[str, bytes, bool], None]
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


class Daemon:
    """What a plugin sees of the daemon: records say/publish/subscribe."""

    def __init__(self, state_dir: Path) -> None:
        self.said: list[str] = []
        self.published: list[tuple[str, str | bytes, int, bool]] = []
        self.subscriptions: list[tuple[str, MessageCallback]] = []
        self.host = PluginHost(
            "kitchen",
            state_dir,
            base_topic="harkd/kitchen",
            say=self.said.append,
            publish=lambda *args: self.published.append(args),
            subscribe=lambda f, cb: self.subscriptions.append((f, cb)),
        )
        self.runner = ToolRunner([])
        self._tasks: list[asyncio.Task[None]] = []

    def load(self, config: dict[str, dict[str, Any]]) -> LoadedPlugins:
        loaded = load_plugins(config, self.host)
        assert loaded.problems == (), loaded.problems
        self.runner = ToolRunner(loaded.tools)
        return loaded

    def start(self, background: tuple[BackgroundTask, ...]) -> None:
        self._tasks += [asyncio.create_task(b.run(), name=b.name) for b in background]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def call(self, name: str, **args: Any) -> ToolOutcome:
        [outcome] = await self.runner.run_all([ToolCall(f"call_{name}", name, json.dumps(args))])
        return outcome

    def deliver(self, topic: str, payload: bytes, retained: bool = False) -> None:
        """A message from the broker, to every subscription whose filter matches."""
        for topic_filter, callback in self.subscriptions:
            if topic_matches(topic_filter, topic):
                callback(topic, payload, retained)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = Daemon(tmp_path)
    yield d
    await d.stop()


async def wait_for(condition: Callable[[], bool], timeout_s: float = 20.0) -> None:
    """Poll: what we wait for happens in the plugin, which offers no event to await."""
    async with asyncio.timeout(timeout_s):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- clock


async def test_clock_reports_time_date_weekday_in_the_configured_zone(daemon: Daemon) -> None:
    daemon.load({"clock": {"timezone": "America/New_York"}})
    before = datetime.now(ZoneInfo("America/New_York"))
    out = (await daemon.call("get_time")).output
    now = datetime.fromisoformat(out["iso"])
    assert abs((now - before).total_seconds()) < 5
    assert now.utcoffset() == before.utcoffset()
    assert out["timezone"] == "America/New_York"
    assert out["time"] == now.strftime("%H:%M")
    assert out["date"] == now.date().isoformat()
    assert out["weekday"] == WEEKDAYS[now.weekday()]


async def test_clock_defaults_to_the_system_zone(
    daemon: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        daemon.load({"clock": {}})
        out = (await daemon.call("get_time")).output
    finally:
        monkeypatch.undo()
        time.tzset()
    assert out["timezone"] == "Asia/Tokyo"
    assert out["iso"].endswith("+09:00")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"timezone": "Nowhere/Town"}, "plugins.clock.timezone: unknown time zone 'Nowhere/Town'"),
        ({"timezone": 5}, "plugins.clock.timezone: expected an IANA time zone name, got 5"),
        ({"tz": "UTC"}, "plugins.clock.tz: unknown key (expected: timezone)"),
    ],
)
def test_clock_bad_options(tmp_path: Path, options: dict[str, Any], expected: str) -> None:
    loaded = load_plugins({"clock": options}, Daemon(tmp_path).host)
    assert str(loaded.problems[0]).startswith(expected)


# --------------------------------------------------------------------------- timers


async def test_timer_fires_say_and_publish(daemon: Daemon) -> None:
    loaded = daemon.load({"timers": {}})
    daemon.start(loaded.background)
    set_out = (await daemon.call("set_timer", duration_s=0.1, label="pasta")).output
    assert set_out["id"] == "1" and set_out["label"] == "pasta"
    await wait_for(lambda: bool(daemon.said))
    assert daemon.said == ["Your pasta timer is done."]
    assert daemon.published == [
        (
            "harkd/kitchen/timer/finished",
            json.dumps({"id": "1", "label": "pasta", "duration_s": 0.1}),
            1,
            False,
        )
    ]
    assert (await daemon.call("list_timers")).output == {"timers": []}


async def test_timers_take_no_options(tmp_path: Path) -> None:
    loaded = load_plugins({"timers": {"max": 3}}, Daemon(tmp_path).host)
    assert str(loaded.problems[0]) == "plugins.timers.max: unknown key (no options taken)"


async def test_timer_without_label_is_named_by_its_duration(daemon: Daemon) -> None:
    daemon.load({"timers": {}})
    out = (await daemon.call("set_timer", duration_s=330)).output
    assert out["label"] == "5 minute 30 second"


async def test_list_and_cancel_timers(daemon: Daemon) -> None:
    loaded = daemon.load({"timers": {}})
    daemon.start(loaded.background)
    await daemon.call("set_timer", duration_s=600, label="eggs")
    await daemon.call("set_timer", duration_s=60, label="tea")
    await daemon.call("set_timer", duration_s=0.2, label="toast")
    listed = (await daemon.call("list_timers")).output["timers"]
    assert [t["label"] for t in listed] == ["toast", "tea", "eggs"]  # soonest first
    assert 50 < listed[1]["remaining_s"] <= 60  # set moments ago, even on a slow machine

    cancelled = (await daemon.call("cancel_timer", label="Toast")).output["cancelled"]
    assert [t["id"] for t in cancelled] == ["3"]
    assert (await daemon.call("cancel_timer", id="2")).output["cancelled"][0]["label"] == "tea"
    missing = await daemon.call("cancel_timer", id="9")
    assert missing.error == "no running timer with id '9' (running: 1 (eggs))"
    neither = await daemon.call("cancel_timer")
    assert neither.error is not None and neither.error.startswith("invalid arguments")

    # A timer due after the cancelled toast one: once it fired, toast would have too.
    await daemon.call("set_timer", duration_s=0.3, label="kettle")
    await wait_for(lambda: bool(daemon.said))
    assert daemon.said == ["Your kettle timer is done."]
    assert [t["label"] for t in (await daemon.call("list_timers")).output["timers"]] == ["eggs"]


@pytest.mark.parametrize("duration_s", [0, -5, 86401])
async def test_timer_duration_is_bounded(daemon: Daemon, duration_s: float) -> None:
    daemon.load({"timers": {}})
    outcome = await daemon.call("set_timer", duration_s=duration_s)
    assert outcome.error is not None and "at $.duration_s" in outcome.error


async def test_timers_survive_a_restart(tmp_path: Path) -> None:
    first = Daemon(tmp_path)
    first.start(first.load({"timers": {}}).background)
    # Due in 2 s: time enough for this daemon to stop first, on any machine.
    await first.call("set_timer", duration_s=2, label="bread")
    await first.call("set_timer", duration_s=3600, label="roast")
    await first.stop()  # the daemon goes down before the bread timer is due
    stored = json.loads((tmp_path / "plugins" / "timers" / "timers.json").read_text())
    assert [t["label"] for t in stored["timers"]] == ["bread", "roast"]

    second = Daemon(tmp_path)
    loaded = second.load({"timers": {}})
    labels = [t["label"] for t in (await second.call("list_timers")).output["timers"]]
    assert labels == ["bread", "roast"]
    second.start(loaded.background)
    try:
        await wait_for(lambda: bool(second.said))
        assert second.said == ["Your bread timer is done."]
        assert first.said == []
        # Ids keep counting: no clash with an id the user heard before the restart.
        assert (await second.call("set_timer", duration_s=60)).output["id"] == "3"
    finally:
        await second.stop()


async def test_timer_due_while_down_fires_on_start_and_says_when(tmp_path: Path) -> None:
    state = tmp_path / "plugins" / "timers"
    state.mkdir(parents=True)
    due = time.time() - 600
    (state / "timers.json").write_text(
        json.dumps(
            {
                "next_id": 2,
                "timers": [{"id": "1", "label": "laundry", "duration_s": 900, "due": due}],
            }
        )
    )
    daemon = Daemon(tmp_path)
    daemon.start(daemon.load({"timers": {}}).background)
    try:
        await wait_for(lambda: bool(daemon.said))
    finally:
        await daemon.stop()
    when = datetime.fromtimestamp(due).astimezone().strftime("%H:%M")
    assert daemon.said == [f"Your laundry timer finished at {when}, while I was not running."]
    assert json.loads((state / "timers.json").read_text())["timers"] == []


async def test_unreadable_timer_file_is_ignored(tmp_path: Path) -> None:
    state = tmp_path / "plugins" / "timers"
    state.mkdir(parents=True)
    (state / "timers.json").write_text("{not json")
    daemon = Daemon(tmp_path)
    daemon.load({"timers": {}})
    assert (await daemon.call("list_timers")).output == {"timers": []}


async def test_timers_without_mqtt_still_announce(tmp_path: Path) -> None:
    said: list[str] = []
    host = PluginHost("kitchen", tmp_path, base_topic="harkd/kitchen", say=said.append)
    loaded = load_plugins({"timers": {}}, host)
    runner = ToolRunner(loaded.tools)
    task = asyncio.create_task(loaded.background[0].run())
    try:
        await runner.run_all([ToolCall("c", "set_timer", '{"duration_s": 0.05}')])
        await wait_for(lambda: bool(said))
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert said == ["Your 0.05 second timer is done."]


# --------------------------------------------------------------------------- mqtt


@pytest.mark.parametrize(
    ("topic_filter", "topic", "matches"),
    [
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
        ("a/b", "a/b/c", False),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/+", "a", False),
        ("a/+", "a/", True),  # + matches an empty level
        ("+/+", "/finance", True),
        ("+", "/finance", False),
        ("a/+/c", "a/b/c", True),
        ("a/#", "a", True),  # # includes the parent level
        ("a/#", "a/b/c/d", True),
        ("a/#", "ab/c", False),
        ("#", "a/b", True),
        ("#", "/", True),
        ("#", "$SYS/broker/uptime", False),  # $-topics are not matched at the first level
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("$SYS/+/uptime", "$SYS/broker/uptime", True),
        ("zigbee2mqtt/+/set", "zigbee2mqtt/kitchen_light/set", True),
        ("zigbee2mqtt/+/set", "zigbee2mqtt/bridge/request/permit_join", False),
        ("A/b", "a/b", False),  # case-sensitive
    ],
)
def test_topic_matches(topic_filter: str, topic: str, matches: bool) -> None:
    assert topic_matches(topic_filter, topic) is matches


@pytest.mark.parametrize(
    ("topic_filter", "problem"),
    [
        ("a/#", None),
        ("+/+/#", None),
        ("#", None),
        ("", "must not be empty"),
        ("a/#/b", "'#' must be a whole level, and the last one"),
        ("a#", "'#' must be a whole level, and the last one"),
        ("a/b+", "'+' must be a whole level"),
    ],
)
def test_filter_problem(topic_filter: str, problem: str | None) -> None:
    assert filter_problem(topic_filter) == problem


ALLOW = ["zigbee2mqtt/+/set", "zigbee2mqtt/+", "tasmota/#"]


async def test_mqtt_subscribes_to_the_allowlist(daemon: Daemon) -> None:
    daemon.load({"mqtt": {"allow": ALLOW}})
    assert [f for f, _ in daemon.subscriptions] == ALLOW


async def test_mqtt_publish_to_allowed_topic(daemon: Daemon) -> None:
    daemon.load({"mqtt": {"allow": ALLOW}})
    out = await daemon.call(
        "mqtt_publish", topic="zigbee2mqtt/kitchen_light/set", payload={"state": "ON"}
    )
    assert out.output == {"published": "zigbee2mqtt/kitchen_light/set", "retain": False}
    await daemon.call("mqtt_publish", topic="tasmota/plug/cmnd/POWER", payload="OFF", retain=True)
    assert daemon.published == [
        ("zigbee2mqtt/kitchen_light/set", '{"state": "ON"}', 1, False),
        ("tasmota/plug/cmnd/POWER", "OFF", 1, True),
    ]


@pytest.mark.parametrize(
    ("topic", "error"),
    [
        (
            "zigbee2mqtt/bridge/request/restart",
            "topic not allowed: zigbee2mqtt/bridge/request/restart",
        ),
        ("harkd/kitchen/cmd/volume", "topic not allowed: harkd/kitchen/cmd/volume"),
        ("tasmota/#", "invalid topic 'tasmota/#': must not contain wildcards (+ or #)"),
    ],
)
async def test_mqtt_publish_outside_allowlist_is_refused(
    daemon: Daemon, topic: str, error: str
) -> None:
    daemon.load({"mqtt": {"allow": ALLOW}})
    outcome = await daemon.call("mqtt_publish", topic=topic, payload="x")
    assert outcome.error is not None and outcome.error.startswith(error)
    assert json.loads(outcome.output_text())["error"] == outcome.error
    assert daemon.published == []


async def test_mqtt_read_state_from_a_retained_message(daemon: Daemon) -> None:
    daemon.load({"mqtt": {"allow": ALLOW}})
    daemon.deliver(
        "zigbee2mqtt/kitchen_light", b'{"state": "ON", "brightness": 200}', retained=True
    )
    daemon.deliver("tasmota/plug/stat/POWER", b"OFF")
    out = (await daemon.call("mqtt_read_state", topic="zigbee2mqtt/kitchen_light")).output
    assert out == {
        "topic": "zigbee2mqtt/kitchen_light",
        "payload": {"state": "ON", "brightness": 200},
        "retained": True,
    }
    plug = (await daemon.call("mqtt_read_state", topic="tasmota/plug/stat/POWER")).output
    assert plug["payload"] == "OFF" and plug["retained"] is False

    daemon.deliver("zigbee2mqtt/kitchen_light", b"", retained=True)  # retained state cleared
    cleared = await daemon.call("mqtt_read_state", topic="zigbee2mqtt/kitchen_light")
    assert cleared.error is not None and cleared.error.startswith("no state known")


async def test_mqtt_read_state_waits_for_a_late_message(daemon: Daemon) -> None:
    daemon.load({"mqtt": {"allow": ALLOW, "read_timeout_s": 30}})
    reading = asyncio.create_task(daemon.call("mqtt_read_state", topic="zigbee2mqtt/hall"))
    await asyncio.sleep(0.05)
    assert not reading.done()  # waiting: the message is late
    daemon.deliver("zigbee2mqtt/hall", b'{"occupancy": true}', retained=True)
    out = (await reading).output
    assert out["payload"] == {"occupancy": True}


async def test_mqtt_read_state_gives_up_after_read_timeout(daemon: Daemon) -> None:
    daemon.load({"mqtt": {"allow": ALLOW, "read_timeout_s": 0.1}})
    outcome = await daemon.call("mqtt_read_state", topic="zigbee2mqtt/cellar")
    assert outcome.error == "no state known for zigbee2mqtt/cellar (nothing received in 0.1 s)"
    refused = await daemon.call("mqtt_read_state", topic="other/topic")
    assert refused.error is not None and refused.error.startswith("topic not allowed: other/topic")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "plugins.mqtt.allow: required"),
        ({"allow": []}, "plugins.mqtt.allow: expected a non-empty list"),
        ({"allow": "a/#"}, "plugins.mqtt.allow: expected a non-empty list"),
        ({"allow": ["a/b", "a/#/c"]}, "plugins.mqtt.allow.1: 'a/#/c': '#' must be"),
        ({"allow": ["a/b", 3]}, "plugins.mqtt.allow.1: expected a topic filter string"),
        ({"allow": ["a"], "read_timeout_s": 0}, "plugins.mqtt.read_timeout_s: must be in"),
        ({"allow": ["a"], "read_timeout_s": "2"}, "plugins.mqtt.read_timeout_s: expected a number"),
        ({"allow": ["a"], "allowed": ["b"]}, "plugins.mqtt.allowed: unknown key"),
    ],
)
def test_mqtt_bad_options(tmp_path: Path, options: dict[str, Any], expected: str) -> None:
    loaded = load_plugins({"mqtt": options}, Daemon(tmp_path).host)
    assert str(loaded.problems[0]).startswith(expected)
