"""A tiny HTTP/1.1 endpoint minting ephemeral Realtime client secrets.

Serves ``POST /v1/realtime/client_secrets`` like the provider: authenticated with
``Authorization: Bearer <standard key>``, body
``{"expires_after": {"anchor": "created_at", "seconds": N}, "session": {...}}``,
answer ``{"value": "ek_...", "expires_at": <unix s>, "session": {...}}``.
Anything else is a 404 (unknown path) or 405 (other method). Plain ``asyncio``
streams, keep-alive supported, no third-party HTTP stack.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["HttpReply", "HttpRequest", "SecretsHttpServer"]

_MAX_BODY_BYTES = 1 << 20
_MAX_HEADER_LINES = 100


@dataclass(frozen=True)
class HttpRequest:
    """One parsed request: method, path (no query), lower-cased headers, body."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class HttpReply:
    """A JSON reply."""

    status: int
    body: dict[str, Any]


Handler = Callable[[HttpRequest], Awaitable[HttpReply]]


class SecretsHttpServer:
    """Serve ``handler`` over HTTP/1.1 on ``host:port`` (port 0 = any free port)."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self._handler = handler
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("HTTP server not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Bind and start accepting connections."""
        self._server = await asyncio.start_server(self._on_client, self._host, self._port)

    async def stop(self) -> None:
        """Stop accepting, end open keep-alive connections, wait for them."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._clients):
            task.cancel()
        if self._clients:
            await asyncio.wait(list(self._clients))
        await self._server.wait_closed()
        self._server = None

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            await self._serve_connection(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            logger.debug("HTTP client went away: %s", exc)
        finally:
            self._clients.discard(task)
            writer.close()

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            request = await _read_request(reader)
            if request is None:
                return
            try:
                reply = await self._handler(request)
            except Exception:
                logger.exception("client_secrets handler failed")
                reply = HttpReply(
                    500, {"error": {"message": "internal error", "type": "server_error"}}
                )
            keep_alive = request.headers.get("connection", "").lower() != "close"
            writer.write(_encode_reply(reply, keep_alive))
            await writer.drain()
            if not keep_alive:
                return


async def _read_request(reader: asyncio.StreamReader) -> HttpRequest | None:
    """Read one request; None on a clean EOF before a request line."""
    line = await reader.readline()
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3:
        raise ValueError(f"bad request line {line!r}")
    method, target, _version = parts
    headers: dict[str, str] = {}
    for _ in range(_MAX_HEADER_LINES):
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n", b""):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or "0")
    if length > _MAX_BODY_BYTES:
        raise ValueError("request body too large")
    body = await reader.readexactly(length) if length else b""
    return HttpRequest(method.upper(), target.split("?", 1)[0], headers, body)


def _encode_reply(reply: HttpReply, keep_alive: bool) -> bytes:
    body = json.dumps(reply.body).encode()
    reason = HTTPStatus(reply.status).phrase
    head = (
        f"HTTP/1.1 {reply.status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    return head.encode("latin-1") + body
