"""The `mcp` plugin against real MCP servers (the official SDK's server side) over
Streamable HTTP on loopback and over stdio: tools listed and called through harkd's
tool runner, prompts, list changes, errors, a refused token, servers that are down,
go away and come back, timeouts, name clashes and bad options.

The plugin is loaded as the daemon loads it (`load_plugins` with a `PluginHost`
whose `offer` goes to `LiveTools`), and its background task runs as the daemon runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from e2e import until
from harkd.plugins import LiveTools, PluginHost, load_plugins
from harkd.tools import ToolCall, ToolOutcome, ToolRunner
from harkd_plugins.mcp import link
from harkd_process import run_harkd, write_config
from mcp_servers import PROMPT, HttpMcpServer, free_port, stdio_command

pytestmark = pytest.mark.timeout(60)

TOKEN = "hA-t0ken-9f3c1e77d2b84a6c"
BASE = "Answer briefly."


@dataclass
class Plugged:
    """The plugin loaded as the daemon loads it; `updates` counts merged changes."""

    live: LiveTools
    updates: list[tuple[tuple[str, ...], str]] = field(default_factory=list)

    @property
    def names(self) -> set[str]:
        return {t.name for t in self.live.tools}

    async def call(self, name: str, args: Mapping[str, Any] | str = "{}") -> ToolOutcome:
        text = args if isinstance(args, str) else json.dumps(args)
        return await ToolRunner(self.live.tools).run(ToolCall(f"call-{name}", name, text))


@contextlib.asynccontextmanager
async def plugged(
    tmp_path: Path, plugins: Mapping[str, Mapping[str, Any]]
) -> AsyncIterator[Plugged]:
    result: Plugged | None = None

    def changed() -> None:
        assert result is not None
        result.updates.append(
            (tuple(t.name for t in result.live.tools), result.live.instructions(BASE))
        )

    live = LiveTools(changed)
    result = Plugged(live)
    host = PluginHost(
        "kitchen",
        tmp_path / "state",
        base_topic="harkd/kitchen",
        say=lambda _: None,
        offer=live.offer,
    )
    loaded = load_plugins(plugins, host)
    assert loaded.problems == (), loaded.problems
    live.start(loaded)
    tasks = [asyncio.create_task(b.run(), name=b.name) for b in loaded.background]
    try:
        yield result
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def http_options(server: HttpMcpServer, **over: Any) -> dict[str, Any]:
    return {"servers": {"home": {"url": server.url, "token": TOKEN, **over}}}


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries within a test's patience (the defaults are 1 s rising to 60 s)."""
    monkeypatch.setattr(link, "RETRY_INITIAL_S", 0.1)
    monkeypatch.setattr(link, "RETRY_MAX_S", 0.3)


async def test_http_tools_are_offered_and_called_with_the_prompt_in_the_instructions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        HttpMcpServer(TOKEN) as server,
        plugged(tmp_path, {"mcp": http_options(server)}) as p,
    ):
        await until(lambda: "HassTurnOn" in p.names, what="the server's tools")
        assert p.names == {"HassTurnOn", "OpenGarage", "ponder", "add_porch_tool"}
        [turn_on] = [t for t in p.live.tools if t.name == "HassTurnOn"]
        assert turn_on.parameters["required"] == ["name"]
        assert turn_on.description == "Turn on a device or entity by name."
        instructions = p.live.instructions(BASE)
        assert instructions.startswith(BASE) and PROMPT in instructions
        assert len(p.updates) == 1  # one merged change: tools and prompt together
        # A prompt the server fails to give is left out; the rest still come.
        assert "server home: prompt status left out" in caplog.text

        outcome = await p.call("HassTurnOn", {"name": "kitchen light"})
        assert outcome.error is None, outcome.error
        assert "Turned on kitchen light" in outcome.output_text()
        assert server.home.calls == [("HassTurnOn", {"name": "kitchen light"})]


async def test_arguments_are_validated_before_the_server_sees_them(tmp_path: Path) -> None:
    async with (
        HttpMcpServer(TOKEN) as server,
        plugged(tmp_path, {"mcp": http_options(server)}) as p,
    ):
        await until(lambda: "HassTurnOn" in p.names, what="the server's tools")
        outcome = await p.call("HassTurnOn", {"nome": "kitchen"})
        assert outcome.error is not None and "invalid arguments" in outcome.error
        assert "'name' is a required property" in outcome.error
        assert server.home.calls == []


async def test_an_mcp_error_result_is_a_tool_error(tmp_path: Path) -> None:
    async with (
        HttpMcpServer(TOKEN) as server,
        plugged(tmp_path, {"mcp": http_options(server)}) as p,
    ):
        await until(lambda: "OpenGarage" in p.names, what="the server's tools")
        outcome = await p.call("OpenGarage")
        message = "Error executing tool OpenGarage: the garage door is jammed"
        assert outcome.error == message  # the server's own words
        assert json.loads(outcome.output_text()) == {"error": message}


async def test_a_slow_tool_times_out_after_the_servers_timeout(tmp_path: Path) -> None:
    async with (
        HttpMcpServer(TOKEN) as server,
        plugged(tmp_path, {"mcp": http_options(server, timeout_s=0.5)}) as p,
    ):
        await until(lambda: "ponder" in p.names, what="the server's tools")
        started = time.monotonic()
        outcome = await p.call("ponder", {"seconds": 30})
        assert outcome.error == "timed out after 0.5 s"
        assert time.monotonic() - started < 5
        # The connection is still good for the next call.
        assert (await p.call("HassTurnOn", {"name": "porch"})).error is None


async def test_a_refused_token_is_logged_once_naming_the_server_never_the_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link, "UNAUTHORIZED_RETRY_S", 0.1)
    caplog.set_level(logging.DEBUG)
    async with (
        HttpMcpServer("the-right-token-0000") as server,
        plugged(tmp_path, {"mcp": http_options(server)}) as p,
    ):
        await until(lambda: server.refused >= 6, what="three refused attempts")
        assert p.names == set()
        refusals = [
            r for r in caplog.records if r.name.startswith("harkd") and "401" in r.getMessage()
        ]
        assert len(refusals) == 1
        assert refusals[0].levelno == logging.ERROR
        assert "server home refused the token" in refusals[0].getMessage()
        assert TOKEN not in caplog.text


async def test_a_server_down_at_start_is_retried_and_its_tools_appear(
    tmp_path: Path, fast_retries: None, caplog: pytest.LogCaptureFixture
) -> None:
    server = HttpMcpServer(TOKEN)
    async with plugged(tmp_path, {"mcp": http_options(server)}) as p:
        await until(lambda: "server home" in caplog.text, what="the outage reported")
        assert p.names == set()
        outages = [r for r in caplog.records if "unavailable" in r.getMessage()]
        assert [r.levelno for r in outages][:1] == [logging.WARNING]
        async with server:
            await until(lambda: "HassTurnOn" in p.names, what="the tools after the server came")
            assert (await p.call("HassTurnOn", {"name": "hall"})).error is None


async def test_a_call_while_the_server_is_away_fails_at_once_and_tools_come_back(
    tmp_path: Path, fast_retries: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        HttpMcpServer(TOKEN) as server,
        plugged(tmp_path, {"mcp": http_options(server, timeout_s=10)}) as p,
    ):
        await until(lambda: "HassTurnOn" in p.names, what="the server's tools")
        await server.stop()
        await until(lambda: f"{server.url}) unavailable" in caplog.text, what="the link noticing")

        started = time.monotonic()
        outcome = await p.call("HassTurnOn", {"name": "hall"})
        assert time.monotonic() - started < 1.0  # not after the 10 s timeout
        assert outcome.error == "MCP server home is not reachable now (retrying)"
        assert "HassTurnOn" in p.names  # still offered while away

        await server.start()
        connected = f"server home ({server.url}) connected"
        await until(lambda: caplog.text.count(connected) == 2, what="the link back")
        outcome = await p.call("HassTurnOn", {"name": "hall"})
        assert outcome.error is None, outcome.error


async def test_list_changed_offers_the_new_tool(tmp_path: Path) -> None:
    async with (
        HttpMcpServer(TOKEN) as server,
        plugged(tmp_path, {"mcp": http_options(server)}) as p,
    ):
        await until(lambda: "HassTurnOn" in p.names, what="the server's tools")
        before = len(p.updates)

        def HassTurnOff(name: str) -> str:  # noqa: N802
            """Turn off a device or entity by name."""
            return f"Turned off {name}"

        await server.add_tool("HassTurnOff", HassTurnOff)
        await until(lambda: "HassTurnOff" in p.names, what="the new tool")
        assert len(p.updates) == before + 1
        assert "HassTurnOff" in p.updates[-1][0]
        outcome = await p.call("HassTurnOff", {"name": "porch"})
        assert outcome.output_text() == json.dumps({"result": "Turned off porch"})


async def test_a_server_before_the_2026_protocol_works_like_home_assistant(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The handshake of older servers, change notices sent unasked, and a ping that
    notices the server left (no change stream shows it)."""
    monkeypatch.setattr(link, "PING_INTERVAL_S", 0.2)
    monkeypatch.setattr(link, "RETRY_INITIAL_S", 0.1)
    caplog.set_level(logging.INFO)
    async with (
        HttpMcpServer(TOKEN, legacy=True) as server,
        plugged(tmp_path, {"mcp": http_options(server)}) as p,
    ):
        await until(lambda: "HassTurnOn" in p.names, what="the server's tools")
        assert PROMPT in p.live.instructions(BASE)
        assert "sends no change notices" not in caplog.text  # no stream was asked for

        assert (await p.call("add_porch_tool")).error is None
        await until(lambda: "PorchLightOn" in p.names, what="the tool announced unasked")
        assert (await p.call("PorchLightOn")).output == {"result": "porch light on"}

        await server.stop()
        await until(lambda: f"{server.url}) unavailable" in caplog.text, what="the ping noticing")
        started = time.monotonic()
        outcome = await p.call("HassTurnOn", {"name": "hall"})
        assert time.monotonic() - started < 1.0
        assert outcome.error == "MCP server home is not reachable now (retrying)"


async def test_allowlist_and_prompt_off(tmp_path: Path) -> None:
    async with HttpMcpServer(TOKEN) as server:
        options = http_options(server, tools=["HassTurnOn"], prompt=False)
        async with plugged(tmp_path, {"mcp": options}) as p:
            await until(lambda: p.names, what="the server's tools")
            assert p.names == {"HassTurnOn"}
            assert p.live.instructions(BASE) == BASE


async def test_a_stdio_server_is_started_and_restarted_when_it_dies(
    tmp_path: Path, fast_retries: None
) -> None:
    options = {"servers": {"notes": {"command": stdio_command()}}}
    async with plugged(tmp_path, {"mcp": options}) as p:
        await until(lambda: "server_pid" in p.names, what="the stdio server's tools")
        assert p.names == {"add_note", "server_pid"}
        outcome = await p.call("add_note", {"text": "buy milk"})
        assert outcome.output_text() == json.dumps({"result": "1 notes kept"})

        first = (await p.call("server_pid")).output["result"]
        os.kill(first, signal.SIGKILL)

        async def restarted() -> int:
            while True:
                outcome = await p.call("server_pid")
                if outcome.error is None and outcome.output["result"] != first:
                    return int(outcome.output["result"])
                await asyncio.sleep(0.05)

        second = await asyncio.wait_for(restarted(), 20)
        assert second != first
        # A new process: its notes start again.
        outcome = await p.call("add_note", {"text": "eggs"})
        assert outcome.output_text() == json.dumps({"result": "1 notes kept"})


async def test_two_servers_offering_one_tool_is_an_error_naming_both(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with HttpMcpServer(TOKEN) as server:
        options = {
            "servers": {
                "home": {"url": server.url, "token": TOKEN},
                "notes": {"command": stdio_command("--clashing")},
            }
        }
        async with plugged(tmp_path, {"mcp": options}) as p:
            await until(lambda: {"HassTurnOn", "add_note"} <= p.names, what="both servers' tools")
            await until(lambda: "offered by servers" in caplog.text, what="the clash reported")
            [clash] = [r for r in caplog.records if "offered by servers" in r.getMessage()]
            assert clash.levelno == logging.ERROR
            assert "'HassTurnOn' is offered by servers home and notes" in clash.getMessage()
            # The first server listed keeps it.
            outcome = await p.call("HassTurnOn", {"name": "kitchen"})
            assert "Turned on kitchen" in outcome.output_text()


async def test_a_tool_another_plugin_offers_is_left_out_naming_both(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    options = {"servers": {"notes": {"command": stdio_command("--clashing")}}}
    async with plugged(tmp_path, {"clock": {}, "mcp": options}) as p:
        await until(lambda: "add_note" in p.names, what="the stdio server's tools")
        problems = [r for r in caplog.records if "also provided by plugin" in r.getMessage()]
        assert len(problems) == 1 and problems[0].levelno == logging.ERROR
        message = problems[0].getMessage()
        assert "plugins.mcp: tool 'get_time' is also provided by plugin 'clock'" in message
        assert [t.name for t in p.live.tools].count("get_time") == 1
        outcome = await p.call("get_time")
        assert "weekday" in outcome.output  # the clock's, not the server's


@pytest.mark.parametrize(
    ("options", "path", "words"),
    [
        ({}, "plugins.mcp.servers", "mapping of server names"),
        ({"servers": {"home": {}}}, "plugins.mcp.servers.home", "give url"),
        ({"servers": {"home": {"url": "ftp://x"}}}, "plugins.mcp.servers.home.url", "http"),
        (
            {"servers": {"home": {"url": "http://h/mcp", "tokn": "x"}}},
            "plugins.mcp.servers.home.tokn",
            "unknown key",
        ),
        (
            {"servers": {"home": {"url": "http://h/mcp", "timeout_s": 0}}},
            "plugins.mcp.servers.home.timeout_s",
            "positive",
        ),
        (
            {"servers": {"home": {"url": "http://h/mcp", "tools": "HassTurnOn"}}},
            "plugins.mcp.servers.home.tools",
            "list of tool names",
        ),
        (
            {"servers": {"home": {"url": "http://h/mcp", "prompt": "yes"}}},
            "plugins.mcp.servers.home.prompt",
            "true or false",
        ),
        (
            {"servers": {"notes": {"command": [], "prompt": True}}},
            "plugins.mcp.servers.notes.command",
            "[program, argument, ...]",
        ),
        (
            {"servers": {"notes": {"command": ["x"], "token": TOKEN}}},
            "plugins.mcp.servers.notes.token",
            "url servers only",
        ),
        (
            {"servers": {"home": {"url": "http://h/mcp", "token": TOKEN, "token_file": "/x"}}},
            "plugins.mcp.servers.home",
            "not both",
        ),
        (
            {"servers": {"home": {"url": "http://h/mcp", "token_file": "/nonexistent/tok"}}},
            "plugins.mcp.servers.home.token_file",
            "cannot read /nonexistent/tok",
        ),
    ],
)
def test_bad_options_name_the_key(
    tmp_path: Path, options: dict[str, Any], path: str, words: str
) -> None:
    host = PluginHost("kitchen", tmp_path, base_topic="harkd/kitchen", say=lambda _: None)
    loaded = load_plugins({"mcp": options}, host)
    [problem] = loaded.problems
    assert problem.path == path, problem
    assert words in problem.reason
    assert TOKEN not in str(problem)


async def test_the_token_file_is_read_at_start(tmp_path: Path) -> None:
    token_file = tmp_path / "ha_token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    async with HttpMcpServer(TOKEN) as server:
        options = {"servers": {"home": {"url": server.url, "token_file": str(token_file)}}}
        async with plugged(tmp_path, {"mcp": options}) as p:
            token_file.unlink()  # read once, at start
            await until(lambda: "HassTurnOn" in p.names, what="the server's tools")
            assert server.refused == 0


def test_check_config_shows_no_token(tmp_path: Path) -> None:
    home = {"url": "http://ha:8123/api/mcp", "token": TOKEN}
    config = {
        "realtime": {"api_key": "sk-test-0123456789abcdef"},
        "plugins": {"mcp": {"servers": {"home": home}}},
    }
    result = run_harkd("check-config", "-c", str(write_config(tmp_path, config)))
    assert result.returncode == 0, result.stderr
    assert TOKEN not in result.stdout + result.stderr
    assert "token: '***'" in result.stdout


async def test_stopping_the_plugin_while_it_connects_never_hangs(
    tmp_path: Path, fast_retries: None
) -> None:
    """The SDK's task groups can swallow a cancellation that lands mid-connect; the
    daemon's shutdown must not wait on a link that goes on retrying."""
    options = {"servers": {"home": {"url": f"http://127.0.0.1:{free_port()}/mcp"}}}
    host = PluginHost("kitchen", tmp_path, base_topic="harkd/kitchen", say=lambda _: None)
    [background] = load_plugins({"mcp": options}, host).background
    for attempt in range(40):
        task = asyncio.create_task(background.run())
        await asyncio.sleep(attempt % 8 * 0.005)  # land at different points of a connect
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5)
        assert done == {task}, f"attempt {attempt}: still running after cancel"
        assert task.cancelled()
