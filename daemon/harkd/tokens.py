"""Credentials for realtime connections: a static key, or ephemeral client secrets
minted from it and refreshed before they expire."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

from harkd.messages import RealtimeError, RealtimeToken

TokenSource = Callable[[], Awaitable[RealtimeToken]]

REFRESH_MARGIN_S = 60.0
"""A cached ephemeral secret is replaced this long before it expires."""


def static_token(key: str) -> TokenSource:
    """A token source that always hands out the same key."""

    async def get_token() -> RealtimeToken:
        return RealtimeToken(key)

    return get_token


def http_base(realtime_url: str) -> str:
    """`wss://host/v1/realtime` -> `https://host` (where the REST API lives)."""
    parts = urlsplit(realtime_url)
    scheme = {"wss": "https", "ws": "http"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, "", "", ""))


class EphemeralTokens:
    """Mints short-lived client secrets with a standard key, cached until near expiry.

    Expiry only limits starting sessions, so one secret serves every reconnect
    until it is within `REFRESH_MARGIN_S` of expiring.
    """

    def __init__(
        self, api_key: str, base_url: str, model: str, ttl_s: int = 600, timeout_s: float = 10.0
    ) -> None:
        self._api_key = api_key
        self._endpoint = f"{base_url.rstrip('/')}/v1/realtime/client_secrets"
        self._model = model
        self._ttl_s = ttl_s
        self._timeout_s = timeout_s
        self._cached: RealtimeToken | None = None

    async def __call__(self) -> RealtimeToken:
        cached = self._cached
        if cached and cached.expires_at and cached.expires_at - time.time() > REFRESH_MARGIN_S:
            return cached
        self._cached = await asyncio.to_thread(self._mint)
        return self._cached

    def _mint(self) -> RealtimeToken:
        body = json.dumps(
            {
                "expires_after": {"anchor": "created_at", "seconds": self._ttl_s},
                "session": {"type": "realtime", "model": self._model},
            }
        ).encode()
        request = urllib.request.Request(
            self._endpoint,
            data=body,
            method="POST",
            headers={
                "Authorization": f"Bearer {self._api_key}",
                "Content-Type": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                data = json.load(response)
        except urllib.error.HTTPError as exc:
            code = "invalid_api_key" if exc.code in (401, 403) else "token_failed"
            raise RealtimeError(code, f"minting a client secret failed: HTTP {exc.code}") from None
        except (OSError, ValueError) as exc:
            raise RealtimeError("token_failed", f"minting a client secret failed: {exc}") from None
        return RealtimeToken(str(data["value"]), float(data["expires_at"]))
