"""One MCP server as harkd keeps it: connected, its tools current, calls answered.

`ServerLink.run` connects with the official SDK's `Client` (Streamable HTTP with a
bearer token, or a stdio server it starts), lists the tools (and prompts), and then
watches the connection: a list-changed notice refreshes them, a lost connection is
retried with backoff (a stdio server is started again). The last tools seen stay
offered while the server is away, and a call then answers at once with an error.

Change notices come two ways: servers on the 2026-07-28 protocol send them only on a
`subscriptions/listen` stream the client opens (which also shows when the server goes
away); older servers (Home Assistant) send them unasked, and a periodic ping notices
when they go away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Generator
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client import Transport
from mcp.client.session import IncomingMessage
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from harkd.backoff import Backoff
from harkd.tools import Tool, ToolCall, ToolError, ToolHandler, check_tool

from .options import ServerOptions

RETRY_INITIAL_S = 1.0
RETRY_MAX_S = 60.0
UNAUTHORIZED_RETRY_S = 300.0
"""A refused token does not fix itself: retry rarely (someone may renew it)."""
STABLE_S = 10.0
"""A connection that lasted this long starts the backoff again from the first delay;
one a server accepts and drops at once keeps backing off (no hammering)."""
PING_INTERVAL_S = 30.0
"""How often a server without a change stream is pinged to notice it went away."""
MAX_PAGES = 100
"""A listing that never ends cannot hang the link."""


def _harkd_version() -> str:
    try:
        return version("harkd")
    except PackageNotFoundError:
        return "0"


CLIENT_INFO = types.Implementation(name="harkd", version=_harkd_version())


class _Bearer(httpx2.Auth):
    """Sends the token and notes a 401, which the SDK reports only as a generic error."""

    def __init__(self, token: str) -> None:
        self._token = token
        self.refused = False

    def __repr__(self) -> str:
        return "_Bearer(***)"

    def auth_flow(
        self, request: httpx2.Request
    ) -> Generator[httpx2.Request, httpx2.Response, None]:
        request.headers["Authorization"] = f"Bearer {self._token}"
        response = yield request
        if response.status_code == 401:
            self.refused = True


class ServerLink:
    """Keeps one MCP server; `tools` and `instructions` are what it offers now."""

    def __init__(
        self, options: ServerOptions, changed: Callable[[], None], logger: logging.Logger
    ) -> None:
        self.options = options
        self.tools: tuple[Tool, ...] = ()
        """The server's tools (allowlisted), kept while it is away."""
        self.instructions = ""
        """The text of its prompts, when `prompt` is on."""
        self._changed = changed
        self._log = logger
        self._client: Client | None = None
        self._handlers: dict[str, ToolHandler] = {}
        self._skipped: set[str] = set()
        self._skipped_prompts: set[str] = set()
        self._wake = asyncio.Event()
        self._stale = False
        self._lost = False

    @property
    def name(self) -> str:
        """The server's name in config."""
        return self.options.name

    # --- the connection ---------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, and reconnect with backoff, until cancelled."""
        backoff = Backoff(RETRY_INITIAL_S, RETRY_MAX_S)
        outage_reported = refusal_reported = False
        while True:
            bearer = _Bearer(self.options.token) if self.options.token is not None else None
            self._stale = self._lost = False
            connected_at: float | None = None
            try:
                async with self._connect(bearer) as client:
                    await self._refresh(client)
                    self._client = client
                    self._log.info(
                        "server %s (%s) connected (protocol %s); tools: %s",
                        self.name,
                        self.options.where,
                        client.protocol_version,
                        ", ".join(t.name for t in self.tools) or "none",
                    )
                    connected_at = time.monotonic()
                    outage_reported = refusal_reported = False
                    self._changed()
                    await self._watch(client)
                problem = "the connection ended"
            except Exception as exc:
                problem = _describe(exc)
            finally:
                self._client = None
            _honour_cancellation()
            if connected_at is not None and time.monotonic() - connected_at >= STABLE_S:
                backoff.reset()
            if bearer is not None and bearer.refused:
                if not refusal_reported:
                    self._log.error(
                        "server %s refused the token (HTTP 401): check servers.%s.token or "
                        "token_file; retrying every %.0f s",
                        self.name,
                        self.name,
                        UNAUTHORIZED_RETRY_S,
                    )
                    refusal_reported = True
                delay = UNAUTHORIZED_RETRY_S
            else:
                delay = backoff.next()
                # Once per outage; every further attempt only at debug level.
                level = logging.DEBUG if outage_reported else logging.WARNING
                self._log.log(
                    level,
                    "server %s (%s) unavailable: %s; retrying in %.1f s",
                    self.name,
                    self.options.where,
                    problem,
                    delay,
                )
                outage_reported = True
            await asyncio.sleep(delay)

    @contextlib.asynccontextmanager
    async def _connect(self, bearer: _Bearer | None) -> AsyncIterator[Client]:
        async with contextlib.AsyncExitStack() as stack:
            if self.options.url is not None:
                # No read timeout on the HTTP client: a change stream may stay quiet for
                # hours. Each request has its own (the session's read timeout).
                http = await stack.enter_async_context(
                    httpx2.AsyncClient(
                        auth=bearer, timeout=httpx2.Timeout(self.options.timeout_s, read=None)
                    )
                )
                transport: Transport = streamable_http_client(self.options.url, http_client=http)
            else:
                program, *args = self.options.command
                transport = stdio_client(StdioServerParameters(command=program, args=args))
            client = Client(
                transport,
                read_timeout_seconds=self.options.timeout_s,
                message_handler=self._on_message,
                client_info=CLIENT_INFO,
                cache=None,  # every listing after a change notice must be fresh
            )
            yield await stack.enter_async_context(client)

    async def _watch(self, client: Client) -> None:
        """Return when the connection is lost; refresh after change notices meanwhile."""
        modern = client.protocol_version in MODERN_PROTOCOL_VERSIONS
        listener = asyncio.create_task(self._listen(client)) if modern else None
        try:
            while True:
                # Cleared before the flags are read: a notice that comes while a
                # refresh runs is seen on the next round, not lost.
                self._wake.clear()
                if self._lost:
                    return
                if self._stale:
                    self._stale = False
                    before = (self.tools, self.instructions)
                    await self._refresh(client)
                    if (self.tools, self.instructions) != before:
                        self._log.info(
                            "server %s changed; tools: %s",
                            self.name,
                            ", ".join(t.name for t in self.tools) or "none",
                        )
                        self._changed()
                    continue
                try:
                    async with asyncio.timeout(None if modern else PING_INTERVAL_S):
                        await self._wake.wait()
                except TimeoutError:
                    await client.session.send_ping()  # raises when the server is gone
        finally:
            if listener is not None:
                listener.cancel()
                await asyncio.wait([listener])  # our own cancellation still propagates

    async def _listen(self, client: Client) -> None:
        listening = False
        try:
            async with client.listen(
                tools_list_changed=True, prompts_list_changed=self.options.prompt
            ) as stream:
                listening = True
                # A change between the listing and this subscription has no notice:
                # list once more now that none can be missed.
                self._mark_stale()
                async for _event in stream:
                    self._mark_stale()
        except Exception as exc:
            if not listening:
                # The server offers no change stream: its tools stay as listed.
                self._log.info("server %s sends no change notices: %s", self.name, _describe(exc))
                return
            self._log.debug("server %s change stream lost: %s", self.name, _describe(exc))
        self._mark_lost(client)  # the stream ends with the connection

    async def _on_message(self, message: IncomingMessage) -> None:
        """Notices from servers before 2026-07-28, which send them unasked."""
        if isinstance(
            message, types.ToolListChangedNotification | types.PromptListChangedNotification
        ):
            self._mark_stale()
        elif isinstance(message, Exception):
            self._log.debug("server %s transport: %s", self.name, _describe(message))

    def _mark_stale(self) -> None:
        self._stale = True
        self._wake.set()

    def _mark_lost(self, client: Client) -> None:
        if client is not self._client:
            return  # news of a connection already replaced
        # Calls fail at once from here on, not after their timeout.
        self._client = None
        self._lost = True
        self._wake.set()

    # --- listings -------------------------------------------------------------------

    async def _refresh(self, client: Client) -> None:
        tools: list[Tool] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            page = await client.list_tools(cursor=cursor)
            tools += (t for mcp_tool in page.tools if (t := self._tool(mcp_tool)) is not None)
            if (cursor := page.next_cursor) is None:
                break
        self.tools = tuple(tools)
        self.instructions = await self._prompts(client) if self.options.prompt else ""

    def _tool(self, listed: types.Tool) -> Tool | None:
        allow = self.options.tools
        if allow is not None and listed.name not in allow:
            return None
        handler = self._handlers.get(listed.name)
        if handler is None:
            handler = self._handlers[listed.name] = self._handler(listed.name)
        tool = Tool(
            name=listed.name,
            description=listed.description or listed.title or "",
            parameters=listed.input_schema,
            handler=handler,
            timeout_s=self.options.timeout_s,
        )
        try:
            check_tool(tool)
        except ValueError as exc:
            if listed.name not in self._skipped:
                self._skipped.add(listed.name)
                self._log.warning("server %s: tool left out: %s", self.name, exc)
            return None
        return tool

    async def _prompts(self, client: Client) -> str:
        if client.server_capabilities.prompts is None:
            return ""
        texts: list[str] = []
        cursor: str | None = None
        for _ in range(MAX_PAGES):
            page = await client.list_prompts(cursor=cursor)
            for prompt in page.prompts:
                if any(a.required for a in prompt.arguments or ()):
                    continue  # nothing to fill its arguments with
                try:
                    got = await client.get_prompt(prompt.name)
                except MCPError as exc:
                    # The tools work without it: one broken prompt must not keep them away.
                    if prompt.name not in self._skipped_prompts:
                        self._skipped_prompts.add(prompt.name)
                        self._log.warning(
                            "server %s: prompt %s left out: %s",
                            self.name,
                            prompt.name,
                            exc.error.message,
                        )
                    continue
                texts += (
                    m.content.text for m in got.messages if isinstance(m.content, types.TextContent)
                )
            if (cursor := page.next_cursor) is None:
                break
        return "\n\n".join(t.strip() for t in texts if t.strip())

    # --- calls ------------------------------------------------------------------------

    def _handler(self, name: str) -> ToolHandler:
        async def call_tool(args: dict[str, Any], call: ToolCall) -> Any:
            return await self.call(name, args)

        return call_tool

    async def call(self, name: str, args: dict[str, Any]) -> Any:
        """Call the server's tool; every failure is a `ToolError` for the model."""
        client = self._client
        if client is None:
            raise ToolError(f"MCP server {self.name} is not reachable now (retrying)")
        try:
            result = await client.call_tool(name, args)
            _honour_cancellation()
        except MCPError as exc:
            if exc.code == types.CONNECTION_CLOSED:
                self._mark_lost(client)
                raise ToolError(f"MCP server {self.name} went away") from None
            if exc.code == types.REQUEST_TIMEOUT:
                raise ToolError(f"timed out after {self.options.timeout_s:g} s") from None
            raise ToolError(f"MCP server {self.name}: {exc.error.message}") from None
        except (httpx2.TransportError, OSError, anyio.BrokenResourceError) as exc:
            self._mark_lost(client)
            raise ToolError(f"MCP server {self.name} is not reachable: {_describe(exc)}") from None
        if result.is_error:
            raise ToolError(_text(result) or f"{name} failed")
        if result.structured_content is not None:
            return result.structured_content
        return _text(result)


def _honour_cancellation() -> None:
    """Raise `CancelledError` if this task was asked to stop.

    The SDK's anyio task groups can swallow a native asyncio cancellation that lands
    while they set up or unwind (about one in three cancellations during a connect
    attempt): without this, shutdown would wait for a link that keeps retrying.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _text(result: types.CallToolResult) -> str:
    """The result's text; other content (images, audio) is named, not passed on."""
    texts = [b.text for b in result.content if isinstance(b, types.TextContent)]
    others = [b.type for b in result.content if not isinstance(b, types.TextContent)]
    if others:
        texts.append(f"({', '.join(others)} content left out)")
    return "\n".join(texts)


def _describe(exc: BaseException) -> str:
    """The innermost cause of a failure, in one line (task groups wrap it)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, MCPError):
        return exc.error.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
