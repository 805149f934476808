"""A real Home Assistant for the tests, and what they need to talk to it.

:func:`running_home_assistant` starts Home Assistant 2026.2 from the cached trixie tree
(tests/ha_tree.py) with a fresh configuration (tests/ha_config.py: demo lights, MQTT
on the test broker, the MCP server), onboards it through its API as the UI would (the
first user, an authorization code, a token, then a long-lived token over the websocket
API) and hands back a :class:`HomeAssistant`. :class:`HaWebsocket` speaks its websocket
API: states, services, the entity registry.

Usage::

    with running_home_assistant(tmp_path, broker) as ha:
        async with ha.websocket() as ws:
            states = await ws.states()
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import websockets

from ha_config import write_config
from ha_tree import ensure_ha_tree, start_ha, wait_ha_up
from mosquitto import Mosquitto, free_port

__all__ = ["HaWebsocket", "HomeAssistant", "running_home_assistant"]

START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class HomeAssistant:
    """A running, onboarded Home Assistant on 127.0.0.1:``port``."""

    port: int
    token: str
    """A long-lived access token (what a user creates for harkd's mcp plugin)."""
    config: Path
    start_s: float
    """How long it took from the start command to "initialized" with the API up."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def mcp_url(self) -> str:
        """The MCP server (Streamable HTTP) of the mcp_server integration."""
        return f"{self.url}/api/mcp"

    def log_tail(self, lines: int = 60) -> str:
        """The end of Home Assistant's own log file."""
        text = (self.config / "home-assistant.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def websocket(self) -> HaWebsocket:
        """A websocket API connection with the long-lived token (``async with``)."""
        return HaWebsocket(self.port, self.token)


class HaWebsocket:
    """One authenticated connection to Home Assistant's websocket API."""

    def __init__(self, port: int, token: str) -> None:
        self._url = f"ws://127.0.0.1:{port}/api/websocket"
        self._token = token
        self._ids = itertools.count(1)
        self._ws: websockets.ClientConnection | None = None

    async def __aenter__(self) -> HaWebsocket:
        self._ws = await websockets.connect(self._url, max_size=None)
        assert json.loads(await self._ws.recv())["type"] == "auth_required"
        await self._ws.send(json.dumps({"type": "auth", "access_token": self._token}))
        answer = json.loads(await self._ws.recv())
        if answer["type"] != "auth_ok":
            raise AssertionError(f"Home Assistant refused the token: {answer}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._ws is not None:
            await self._ws.close()

    async def call(self, kind: str, **fields: Any) -> Any:
        """Send a command of type ``kind``; return its result or raise with its error."""
        assert self._ws is not None, "use as an async context manager"
        ident = next(self._ids)
        await self._ws.send(json.dumps({"id": ident, "type": kind, **fields}))
        while True:
            answer = json.loads(await self._ws.recv())
            if answer.get("id") == ident and answer["type"] == "result":
                if not answer["success"]:
                    raise AssertionError(f"{kind} failed: {answer['error']}")
                return answer["result"]

    async def states(self) -> dict[str, dict[str, Any]]:
        """Every entity's state object, by entity id."""
        return {s["entity_id"]: s for s in await self.call("get_states")}

    async def state(self, entity_id: str) -> str | None:
        """One entity's state ("on", "42", "unavailable"...), None when it has none."""
        found = (await self.states()).get(entity_id)
        return None if found is None else str(found["state"])

    async def entity_registry(self) -> list[dict[str, Any]]:
        """The entity registry: ``entity_id``, ``platform``, ``unique_id`` and more."""
        entries: list[dict[str, Any]] = await self.call("config/entity_registry/list")
        return entries

    async def call_service(self, domain: str, service: str, entity_id: str, **data: Any) -> None:
        """What a user's tap in the UI does: call ``domain.service`` on one entity."""
        await self.call(
            "call_service",
            domain=domain,
            service=service,
            target={"entity_id": entity_id},
            service_data=data,
        )


def _post(url: str, body: dict[str, str], *, form: bool = False) -> Any:
    data = urllib.parse.urlencode(body).encode() if form else json.dumps(body).encode()
    kind = "application/x-www-form-urlencoded" if form else "application/json"
    request = urllib.request.Request(url, data=data, headers={"Content-Type": kind})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


async def _long_lived_token(port: int, access_token: str) -> str:
    async with HaWebsocket(port, access_token) as ws:
        token: str = await ws.call(
            "auth/long_lived_access_token", client_name="harkd tests", lifespan=30
        )
        return token


def onboard(port: int) -> str:
    """Create the owner as the onboarding screen does; return a long-lived token."""
    base = f"http://127.0.0.1:{port}"
    client_id = f"{base}/"  # the frontend's own client id is its URL
    user = {
        "client_id": client_id,
        "name": "harkd tester",
        "username": "harkd",
        "password": secrets.token_urlsafe(16),
        "language": "en",
    }
    code = _post(f"{base}/api/onboarding/users", user)["auth_code"]
    grant = {"grant_type": "authorization_code", "code": code, "client_id": client_id}
    access = _post(f"{base}/auth/token", grant, form=True)["access_token"]
    return asyncio.run(_long_lived_token(port, access))


@contextlib.contextmanager
def running_home_assistant(workdir: Path, broker: Mosquitto) -> Iterator[HomeAssistant]:
    """Start an onboarded Home Assistant whose MQTT integration uses ``broker``.

    Builds the cached tree first if needed (minutes, once). Home Assistant's output
    goes to ``workdir/home-assistant.out``; it is stopped cleanly on exit.
    """
    with (workdir / "ha-tree-build.log").open("w") as build_log:
        tree = ensure_ha_tree(build_log)
    config = workdir / "config"
    port = free_port()  # just before use: the container shares the host's network
    write_config(config, http_port=port, mqtt_port=broker.port, mqtt_host=broker.host)
    with (workdir / "home-assistant.out").open("w") as out, start_ha(tree, config, out) as proc:
        start_s = wait_ha_up(config, port, START_TIMEOUT_S, ha=proc)
        yield HomeAssistant(port, onboard(port), config, start_s)
