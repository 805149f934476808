"""The `mcp` plugin's options, checked once at start into frozen dataclasses.

```yaml
servers:
  NAME:
    url: http://homeassistant.local:8123/api/mcp   # Streamable HTTP, or
    command: [/usr/bin/some-mcp-server, --flag]     # a stdio server the daemon runs
    token_file: /run/credentials/harkd.service/ha_token   # or token: ... (url only)
    tools: null          # allowlist of tool names; null: all
    prompt: true         # add the server's prompts to the session instructions
    timeout_s: 10
```

Errors name the option's path (`servers.home.url`). `token_file` is read here, at
start; the token is kept out of every repr.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from harkd.plugins import PluginConfigError

SERVER_KEYS = ("url", "command", "token", "token_file", "tools", "prompt", "timeout_s")
SERVER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ServerOptions:
    """One MCP server: where it is and what harkd takes from it."""

    name: str
    url: str | None = None
    """Streamable HTTP endpoint; exactly one of `url` and `command` is set."""
    command: tuple[str, ...] = ()
    """A stdio server: program and arguments."""
    token: str | None = field(default=None, repr=False)
    """Bearer token for `url` (from `token` or the contents of `token_file`)."""
    tools: frozenset[str] | None = None
    """Allowlist of tool names; None offers all."""
    prompt: bool = True
    timeout_s: float = 10.0

    @property
    def where(self) -> str:
        """The server for a log line: its URL or its program (never the token)."""
        return self.url if self.url is not None else self.command[0]


def parse_options(options: Mapping[str, Any]) -> tuple[ServerOptions, ...]:
    """Check the plugin's options; `PluginConfigError` names the bad key's path."""
    for key in options:
        if key != "servers":
            raise PluginConfigError("unknown key (expected: servers)", str(key))
    servers = options.get("servers")
    if not isinstance(servers, Mapping) or not servers:
        raise PluginConfigError("expected a mapping of server names to servers", "servers")
    return tuple(_server(name, value) for name, value in servers.items())


def _server(name: Any, value: Any) -> ServerOptions:
    path = f"servers.{name}"
    if not isinstance(name, str) or not SERVER_NAME.match(name):
        raise PluginConfigError(f"a server name must match {SERVER_NAME.pattern}", path)
    if not isinstance(value, Mapping):
        raise PluginConfigError("expected a mapping with url or command", path)
    for key in value:
        if key not in SERVER_KEYS:
            raise PluginConfigError(
                f"unknown key (expected: {', '.join(SERVER_KEYS)})", f"{path}.{key}"
            )
    url, command = value.get("url"), value.get("command")
    if (url is None) == (command is None):
        raise PluginConfigError("give url (an HTTP server) or command (a stdio server)", path)
    token = _token(value, path)
    if command is not None and token is not None:
        raise PluginConfigError("a token is sent to url servers only", f"{path}.token")
    return ServerOptions(
        name=name,
        url=None if url is None else _url(url, f"{path}.url"),
        command=() if command is None else _command(command, f"{path}.command"),
        token=token,
        tools=_allowlist(value.get("tools"), f"{path}.tools"),
        prompt=_bool(value.get("prompt", True), f"{path}.prompt"),
        timeout_s=_timeout(value.get("timeout_s", 10), f"{path}.timeout_s"),
    )


def _url(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise PluginConfigError(f"expected an http:// or https:// URL, got {value!r}", path)
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # The value is not echoed: a URL may carry credentials.
        raise PluginConfigError("expected an http:// or https:// URL with a host", path)
    return value


def _command(value: Any, path: str) -> tuple[str, ...]:
    words = shlex.split(value) if isinstance(value, str) else value
    if not isinstance(words, list) or not words or not all(isinstance(w, str) and w for w in words):
        raise PluginConfigError("expected [program, argument, ...]", path)
    return tuple(words)


def _token(value: Mapping[str, Any], path: str) -> str | None:
    token, token_file = value.get("token"), value.get("token_file")
    if token is not None and token_file is not None:
        raise PluginConfigError("give token or token_file, not both", path)
    if token is not None:
        if not isinstance(token, str) or not token.strip():
            raise PluginConfigError("expected the token as text", f"{path}.token")
        return token.strip()
    if token_file is None:
        return None
    if not isinstance(token_file, str) or not token_file:
        raise PluginConfigError("expected a file path", f"{path}.token_file")
    try:
        text = Path(token_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise PluginConfigError(
            f"cannot read {token_file}: {getattr(exc, 'strerror', None) or exc}",
            f"{path}.token_file",
        ) from None
    if not text:
        raise PluginConfigError(f"{token_file} is empty", f"{path}.token_file")
    return text


def _allowlist(value: Any, path: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise PluginConfigError("expected a list of tool names, or null for all", path)
    return frozenset(value)


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise PluginConfigError(f"expected true or false, got {value!r}", path)
    return value


def _timeout(value: Any, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise PluginConfigError(f"expected a positive number of seconds, got {value!r}", path)
    return float(value)
