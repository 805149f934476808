"""Every provider's fake server behind one shape, chosen by provider name.

`harkd demo --provider NAME` and `harkd fake-server --provider NAME` use this; so can
tests and plugin authors. A provider names its fake in the registry (`Provider.fake`),
so a third-party provider can ship one too.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import signal
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Protocol, Self

from harkd.adapters.registry import ProviderUnavailable, find_provider
from harkd.testing.fake_server import FakeScript


class ProviderFake(Protocol):
    """A provider's fake server on loopback (what `Provider.fake` names is a factory
    taking `script`, `host`, `port`, `api_keys` and `record` keywords)."""

    async def start(self) -> None:
        """Bind and serve."""

    async def stop(self) -> None:
        """Close every session and the endpoints."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    @property
    def url(self) -> str:
        """Where a client connects."""

    def realtime_config(self, api_key: str) -> dict[str, Any]:
        """The `realtime:` section that points harkd at this fake with `api_key`."""

    @property
    def audio_ms_received(self) -> float:
        """Microphone audio received so far, over all sessions, in milliseconds."""


def fake_server(
    provider: str,
    script: FakeScript | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    api_keys: Iterable[str] | None = None,
    record: bool = True,
) -> ProviderFake:
    """The fake server of `provider` (not started). Raises `ProviderUnavailable` when
    the provider is unknown or ships no fake."""
    where = find_provider(provider).fake
    if where is None:
        raise ProviderUnavailable(f"provider {provider!r} has no fake server")
    module, _, attribute = where.partition(":")
    factory = getattr(importlib.import_module(module), attribute)
    server: ProviderFake = factory(
        script=script,
        host=host,
        port=port,
        api_keys=None if api_keys is None else set(api_keys),
        record=record,
    )
    return server


def main(argv: list[str]) -> int:
    """`harkd fake-server [--provider NAME] ...`: the OpenAI fake keeps its own options."""
    chooser = argparse.ArgumentParser(add_help=False)
    chooser.add_argument("--provider", default="openai")
    chosen, rest = chooser.parse_known_args(argv)
    if chosen.provider == "openai":
        from harkd.testing.fake_server import main as openai_main

        return openai_main(rest)
    parser = argparse.ArgumentParser(
        prog="harkd fake-server", description=f"Run the local {chosen.provider} fake server."
    )
    parser.add_argument("--provider", default="openai", help="which provider's fake")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--api-key", action="append", dest="api_keys", metavar="KEY", help="accepted key"
    )
    parser.add_argument("--pace", type=float, default=1.0, help="0 = as fast as possible")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        server = fake_server(
            args.provider,
            FakeScript(pace=args.pace),
            host=args.host,
            port=args.port,
            api_keys=args.api_keys,
            record=False,
        )
    except ProviderUnavailable as exc:
        print(f"harkd fake-server: {exc}")
        return 2
    try:
        asyncio.run(_serve_until_signal(server))
    except OSError as exc:
        print(f"harkd fake-server: {exc}")
        return 1
    return 0


async def _serve_until_signal(server: ProviderFake) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        print(f"fake realtime server: {server.url}", flush=True)
        await stop.wait()
