"""Built-in plugin `mcp`: the tools of Model Context Protocol servers become the
assistant's tools (Home Assistant's MCP server first of all).

Options (see `options.py`): `servers: {NAME: {url | command, token | token_file, tools,
prompt, timeout_s}}`. Each server is kept by a `ServerLink` in the background; whenever
one connects or changes, the tools of all of them (and their prompts, as additions to
the session instructions) are offered again through `ctx.set_tools`. Two servers
offering one tool name is an error naming both; the server listed first keeps it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from harkd.logsetup import register_secret
from harkd.plugins import PluginContext
from harkd.tools import Tool

from .link import ServerLink
from .options import ServerOptions, parse_options


def plugin(options: dict[str, Any], ctx: PluginContext) -> list[Tool]:
    """Check the options and keep the servers from a background task; the tools come
    as the servers answer (`ctx.set_tools`), so none are returned here."""
    servers = parse_options(options)
    for server in servers:
        if server.token is not None:
            register_secret(server.token)
    kept = McpServers(servers, ctx)
    ctx.background(kept.run, "servers")
    return []


class McpServers:
    """Every configured server, merged into one tool set for the plugin context."""

    def __init__(self, servers: tuple[ServerOptions, ...], ctx: PluginContext) -> None:
        self._ctx = ctx
        self.links = tuple(ServerLink(s, self._changed, ctx.logger) for s in servers)
        self._reported: set[tuple[str, str, str]] = set()

    async def run(self) -> None:
        """Keep every server until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            for link in self.links:
                tasks.create_task(link.run(), name=f"plugin:{self._ctx.name}:{link.name}")

    def merged(self) -> tuple[tuple[Tool, ...], str]:
        """The tools of all servers (a clash logged once, the first server keeping the
        name) and the text of their prompts."""
        owner: dict[str, str] = {}
        tools: list[Tool] = []
        for link in self.links:
            for tool in link.tools:
                first = owner.setdefault(tool.name, link.name)
                if first == link.name:
                    tools.append(tool)
                elif (clash := (tool.name, first, link.name)) not in self._reported:
                    self._reported.add(clash)
                    self._ctx.logger.error(
                        "plugins.%s.servers: tool %r is offered by servers %s and %s; "
                        "%s keeps it (use `tools:` to choose)",
                        self._ctx.name,
                        tool.name,
                        first,
                        link.name,
                        first,
                    )
        notes = "\n\n".join(link.instructions for link in self.links if link.instructions)
        return tuple(tools), notes

    def _changed(self) -> None:
        tools, notes = self.merged()
        self._ctx.set_tools(tools, notes)
