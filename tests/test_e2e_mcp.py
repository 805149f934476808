"""`harkd run` with the `mcp` plugin, end to end: "turn on the kitchen light" reaches an
MCP server (shaped like Home Assistant's) and the light's tool runs.

The daemon is a subprocess with its config file and a token file; the fake realtime
server and the MCP server (Streamable HTTP, bearer token) run in the test process, so
the test sees every `session.update` the daemon sends and every tool call the MCP
server gets. The user's words come over MQTT (`B/cmd/text`) once the session has the
server's tools: the fake model calls `HassTurnOn` when it hears them.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from e2e import assert_all_valid, until
from harkd.testing import FakeRealtimeServer, FakeScript, ToolRule
from harkd_process import Harkd, daemon_config, write_config
from mcp_servers import PROMPT, HttpMcpServer
from mosquitto import Mosquitto, Recorder, mosquitto_fixture
from speech_fixtures import silence, write_wav

pytestmark = pytest.mark.timeout(90)

KEY = f"sk-proj-mcptest{uuid.uuid4().hex}"
TOKEN = f"Ha{uuid.uuid4().hex}Tok"
BASE = "harkd/testroom"

broker = mosquitto_fixture()


def session_updates(server: FakeRealtimeServer) -> list[dict[str, Any]]:
    return [e["session"] for _, e in server.received if e["type"] == "session.update"]


def tool_names(session: dict[str, Any]) -> set[str]:
    return {t["name"] for t in session.get("tools", [])}


def outputs(server: FakeRealtimeServer) -> list[dict[str, Any]]:
    return [
        json.loads(e["item"]["output"])
        for _, e in server.received
        if e["type"] == "conversation.item.create" and e["item"]["type"] == "function_call_output"
    ]


async def test_a_typed_request_turns_the_light_on_through_the_mcp_server(
    tmp_path: Path, broker: Mosquitto
) -> None:
    script = FakeScript(
        tool_rules=[ToolRule(r"turn on the kitchen light", "HassTurnOn", {"name": "kitchen"})],
        audio_ms_per_char=5,
    )
    mic = tmp_path / "silence.wav"
    write_wav(mic, silence(2000), 16000)
    token_file = tmp_path / "ha_token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")

    async with (
        FakeRealtimeServer(script=script, api_keys={KEY}) as server,
        HttpMcpServer(TOKEN) as home,
    ):
        config = daemon_config(
            tmp_path,
            server.url,
            KEY,
            audio={"input": {"device": f"file:{mic}"}},
            mqtt={"enabled": True, "host": broker.host, "port": broker.port},
            plugins={
                "clock": {},
                "mcp": {"servers": {"home": {"url": home.url, "token_file": str(token_file)}}},
            },
        )
        async with Harkd(write_config(tmp_path, config)) as daemon:
            # The server's tools and its prompt reach the session in one update.
            await until(
                lambda: any("HassTurnOn" in tool_names(s) for s in session_updates(server)),
                30,
                "a session.update with the MCP tools",
            )
            [update] = [s for s in session_updates(server) if "HassTurnOn" in tool_names(s)]
            assert {"get_time", "HassTurnOn", "OpenGarage", "ponder"} <= tool_names(update)
            assert update["instructions"].startswith("Answer briefly.")
            assert PROMPT in update["instructions"]

            with Recorder(broker, f"{BASE}/#") as mqtt:
                await mqtt.sync()
                mqtt.publish(f"{BASE}/cmd/text", "turn on the kitchen light")
                await until(lambda: outputs(server), 30, "the tool's output")
            assert home.home.calls == [("HassTurnOn", {"name": "kitchen"})]
            assert outputs(server) == [{"result": "Turned on kitchen"}]

            # The server adds a tool and says so: the session gets it.
            def HassTurnOff(name: str) -> str:  # noqa: N802 - Home Assistant's tool name
                return f"Turned off {name}"

            updates = len(session_updates(server))
            await home.add_tool("HassTurnOff", HassTurnOff)
            await until(
                lambda: any("HassTurnOff" in tool_names(s) for s in session_updates(server)),
                30,
                "a session.update with the new tool",
            )
            assert len(session_updates(server)) == updates + 1
            assert await daemon.stop() == 0

        assert TOKEN not in daemon.output
        assert "server home" in daemon.output
        assert_all_valid(server)
