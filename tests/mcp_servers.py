"""Real MCP servers for the tests, built with the official `mcp` SDK's server side.

`home_server()` imitates what matters of Home Assistant's MCP server: Assist-like
tools, a prompt listing the exposed entities. `HttpMcpServer` serves one over
Streamable HTTP on a loopback port with a bearer-token check (401 otherwise), and
can be stopped and started again on the same port. `STDIO_SERVER` is a script that
serves over stdio (the daemon runs it as a subprocess).
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.subscriptions import InMemorySubscriptionBus, ToolsListChanged

STDIO_SERVER = Path(__file__).with_name("mcp_stdio_server.py")
PROMPT = "Exposed entities: kitchen light (light.kitchen, area Kitchen); porch light."


@dataclass
class Home:
    """What the test server's tools did, for the test to check."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    extra_tools: list[tuple[str, Callable[..., Any]]] = field(default_factory=list)
    """Tools added at runtime: every (re)started server offers them too."""


def home_server(home: Home, name: str = "home") -> tuple[MCPServer, InMemorySubscriptionBus]:
    """A fresh server (a session manager runs once, so every start needs one)."""
    bus = InMemorySubscriptionBus()
    server = MCPServer(name, subscriptions=bus, log_level="WARNING")

    @server.tool(description="Turn on a device or entity by name.")
    def HassTurnOn(name: str) -> str:  # noqa: N802 - Home Assistant's tool name
        home.calls.append(("HassTurnOn", {"name": name}))
        return f"Turned on {name}"

    @server.tool(description="Open the garage (always fails).")
    def OpenGarage() -> str:  # noqa: N802
        home.calls.append(("OpenGarage", {}))
        raise ToolError("the garage door is jammed")

    @server.tool(description="Think for a while.")
    async def ponder(seconds: float) -> str:
        home.calls.append(("ponder", {"seconds": seconds}))
        await asyncio.sleep(seconds)
        return "done"

    @server.tool(description="Offer one more tool, announced the pre-2026 way.")
    async def add_porch_tool(ctx: Context) -> str:
        def PorchLightOn() -> str:  # noqa: N802
            return "porch light on"

        home.extra_tools.append(("PorchLightOn", PorchLightOn))
        server.add_tool(PorchLightOn, name="PorchLightOn")
        await ctx.session.send_tool_list_changed()
        return "added"

    @server.prompt(description="What the assistant may control.")
    def assist() -> str:
        return PROMPT

    @server.prompt(description="A prompt whose server side is broken.")
    def status() -> str:
        raise RuntimeError("no status today")

    for tool_name, fn in home.extra_tools:
        server.add_tool(fn, name=tool_name)
    return server, bus


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HttpMcpServer:
    """`home_server()` over Streamable HTTP at `url`, requiring `Bearer <token>`.

    With `legacy`, it answers `server/discover` with "method not found", as servers
    before the 2026-07-28 protocol do (Home Assistant's): clients fall back to the
    `initialize` handshake and get change notices unasked.
    """

    def __init__(
        self, token: str, home: Home | None = None, name: str = "home", *, legacy: bool = False
    ) -> None:
        self.token = token
        self.legacy = legacy
        self.home = home if home is not None else Home()
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.refused = 0
        """Requests answered 401."""
        self.bus: InMemorySubscriptionBus | None = None
        self._server: MCPServer | None = None
        self._uvicorn: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._server, self.bus = home_server(self.home, self.name)
        app = self._server.streamable_http_app()
        expected = f"Bearer {self.token}".encode()

        async def guarded(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http" and dict(scope["headers"]).get(b"authorization") != expected:
                self.refused += 1
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b"unauthorized"})
                return
            if self.legacy and scope["type"] == "http" and scope["method"] == "POST":
                body = await _body(receive)
                request = json.loads(body) if body else {}
                if isinstance(request, dict) and request.get("method") == "server/discover":
                    await _json_reply(send, _method_not_found(request.get("id")))
                    return
                receive = _replay(body, receive)
            await app(scope, receive, send)

        config = uvicorn.Config(
            guarded,
            host="127.0.0.1",
            port=self.port,
            log_level="critical",  # its "cancelled the open streams" is what we ask for
            lifespan="on",
            timeout_graceful_shutdown=0.3,  # open change streams are cut, not awaited
        )
        self._uvicorn = uvicorn.Server(config)
        self._task = asyncio.create_task(self._uvicorn.serve())
        while not self._uvicorn.started:
            if self._task.done():
                self._task.result()  # raises why it could not start
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop serving; open streams are cut (as when the server goes away)."""
        if self._uvicorn is None or self._task is None:
            return
        self._uvicorn.should_exit = True
        await self._task
        self._uvicorn = self._task = None

    async def add_tool(self, name: str, fn: Callable[..., Any]) -> None:
        """Offer one more tool and tell listening clients the list changed."""
        assert self._server is not None and self.bus is not None
        self.home.extra_tools.append((name, fn))
        self._server.add_tool(fn, name=name)
        await self.bus.publish(ToolsListChanged())

    async def __aenter__(self) -> HttpMcpServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()


def stdio_command(*args: str) -> list[str]:
    """The `command:` option that runs the stdio test server."""
    return [sys.executable, str(STDIO_SERVER), *args]


async def _body(receive: Any) -> bytes:
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


def _replay(body: bytes, receive: Any) -> Any:
    """`receive` as it was before `_body` read the request body."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Any:
        return pending.pop() if pending else await receive()

    return replayed


def _method_not_found(request_id: Any) -> dict[str, Any]:
    error = {"code": -32601, "message": "Method not found"}
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


async def _json_reply(send: Any, payload: dict[str, Any]) -> None:
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(payload).encode()})
