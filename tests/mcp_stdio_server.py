"""An MCP server over stdio for the tests (run as a subprocess by the daemon).

Tools: `add_note(text)`, `server_pid()` (so a test can kill this very process).
`--clashing` also offers `HassTurnOn` (the HTTP test server's) and `get_time` (the
clock plugin's), to clash with them.
"""

from __future__ import annotations

import os
import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("notes", log_level="WARNING")
notes: list[str] = []


@server.tool(description="Keep a note.")
def add_note(text: str) -> str:
    notes.append(text)
    return f"{len(notes)} notes kept"


@server.tool(description="The process id of this server.")
def server_pid() -> int:
    return os.getpid()


if "--clashing" in sys.argv:

    @server.tool(description="Turn on a device (the notes server's own).")
    def HassTurnOn(name: str) -> str:  # noqa: N802 - clashes on purpose
        return f"notes turned on {name}"

    @server.tool(description="The time, as the notes server sees it.")
    def get_time() -> str:
        return "teatime"


if __name__ == "__main__":
    server.run("stdio")
