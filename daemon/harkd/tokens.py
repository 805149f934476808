"""Credentials for realtime connections: a static key, or ephemeral client secrets
minted from it and refreshed before they expire."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
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


def bearer_key(api_key: str) -> dict[str, str]:
    """The key as `Authorization: Bearer` (OpenAI, xAI)."""
    return {"Authorization": f"Bearer {api_key}"}


def openai_secret_request(ttl_s: int, model: str) -> dict[str, Any]:
    """OpenAI's (and Azure's) request body: expiry and the session it is for."""
    return {
        "expires_after": {"anchor": "created_at", "seconds": ttl_s},
        "session": {"type": "realtime", "model": model},
    }


@dataclass(frozen=True)
class SecretsEndpoint:
    """Where and how a provider mints client secrets (the answer is always
    `{"value", "expires_at"}`)."""

    path: str = "/v1/realtime/client_secrets"
    auth: Callable[[str], dict[str, str]] = field(default=bearer_key)
    """API key -> request headers."""
    request: Callable[[int, str], dict[str, Any]] = field(default=openai_secret_request)
    """(lifetime in s, model) -> request body."""


class EphemeralTokens:
    """Mints short-lived client secrets with a standard key, cached until near expiry.

    Expiry only limits starting sessions, so one secret serves every reconnect
    until it is within `REFRESH_MARGIN_S` of expiring.
    """

    def __init__(
        self,
        api_key: str,
        base_url: str,
        model: str,
        ttl_s: int = 600,
        timeout_s: float = 10.0,
        *,
        endpoint: SecretsEndpoint = SecretsEndpoint(),
    ) -> None:
        self._api_key = api_key
        self._url = f"{base_url.rstrip('/')}{endpoint.path}"
        self._endpoint = endpoint
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
        body = json.dumps(self._endpoint.request(self._ttl_s, self._model)).encode()
        request = urllib.request.Request(
            self._url,
            data=body,
            method="POST",
            headers={**self._endpoint.auth(self._api_key), "Content-Type": "application/json"},
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
