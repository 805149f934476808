"""`LiveTools` and `PluginContext.set_tools`: plugins whose tools change while the
daemon runs (the `mcp` plugin) replace their share; the merged tools and
instructions reach the daemon in one change, clashes are left out naming both
plugins, and offers from plugin instances replaced by a reload are ignored."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from harkd.plugins import LiveTools, LoadedPlugins, PluginHost
from harkd.tools import Tool, ToolCall

BASE = "Answer briefly."


async def _handler(args: dict[str, Any], call: ToolCall) -> str:
    return "ok"


def tool(name: str) -> Tool:
    return Tool(name, f"the {name} tool", {"type": "object", "properties": {}}, _handler)


CLOCK = tool("get_time")
TURN_ON = tool("HassTurnOn")
TURN_OFF = tool("HassTurnOff")


@pytest.fixture
def changes() -> list[int]:
    return []


@pytest.fixture
def live(changes: list[int]) -> LiveTools:
    live = LiveTools(lambda: changes.append(len(changes)))
    live.start(LoadedPlugins(tools_of={"clock": (CLOCK,), "mcp": ()}))
    return live


def names(live: LiveTools) -> list[str]:
    return [t.name for t in live.tools]


def test_an_offer_replaces_the_plugins_share_in_one_change(
    live: LiveTools, changes: list[int]
) -> None:
    assert names(live) == ["get_time"] and live.instructions(BASE) == BASE
    live.offer("mcp", [TURN_ON], "Exposed: kitchen light.")
    assert names(live) == ["get_time", "HassTurnOn"]
    assert live.instructions(BASE) == f"{BASE}\n\nExposed: kitchen light."
    assert len(changes) == 1

    live.offer("mcp", [TURN_ON], "Exposed: kitchen light.")  # nothing new: no update
    assert len(changes) == 1

    live.offer("mcp", [TURN_OFF], "")
    assert names(live) == ["get_time", "HassTurnOff"]
    assert live.instructions(BASE) == BASE
    assert len(changes) == 2


def test_a_clashing_tool_is_left_out_naming_both_plugins_once(
    live: LiveTools, changes: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    live.offer("mcp", [TURN_ON, tool("get_time")], "")
    live.offer("mcp", [TURN_ON, tool("get_time"), TURN_OFF], "")
    assert names(live) == ["get_time", "HassTurnOn", "HassTurnOff"]
    assert live.tools[0] is CLOCK  # the clock keeps its tool
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "plugins.mcp: tool 'get_time' is also provided by plugin 'clock'; "
        "left out (enable only one of clock and mcp)"
    ]
    assert len(changes) == 2


def test_an_invalid_tool_is_left_out_and_the_rest_offered(
    live: LiveTools, caplog: pytest.LogCaptureFixture
) -> None:
    bad = Tool("turn on!", "spaces", {"type": "object"}, _handler)
    live.offer("mcp", [bad, TURN_ON], "")
    assert names(live) == ["get_time", "HassTurnOn"]
    assert "invalid tool left out: tool 'turn on!': name must match" in caplog.text


def test_offers_of_unknown_or_replaced_plugins_are_ignored(
    live: LiveTools, changes: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    live.offer("weather", [tool("forecast")], "")
    assert "plugin weather offered tools but is not loaded" in caplog.text
    live.close()  # a reload replaced these plugin instances
    live.offer("mcp", [TURN_ON], "")
    assert names(live) == ["get_time"] and changes == []


def test_the_context_offers_through_the_host(tmp_path: Path, live: LiveTools) -> None:
    host = PluginHost("kitchen", tmp_path, base_topic="harkd/kitchen", say=print)
    host.context("mcp").set_tools([TURN_ON])  # a dry run (`harkd plugins`): nothing
    assert names(live) == ["get_time"]

    host.offer = live.offer
    host.context("mcp").set_tools(iter([TURN_ON]), "Exposed: porch.")
    assert names(live) == ["get_time", "HassTurnOn"]
    assert live.instructions("") == "Exposed: porch."
