"""`realtime.provider` picks the adapter from the registry: built-in names, entry
points of group `harkd.providers`, provider defaults, and ephemeral tokens."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import EntryPoint
from typing import Any

import pytest

from e2e import fake_client
from harkd.adapters import registry
from harkd.adapters.openai import OpenAIRealtimeAdapter
from harkd.adapters.registry import ENTRY_POINT_GROUP, build_adapter, token_source
from harkd.config import ConfigError, RealtimeConfig, parse_config
from harkd.testing import FakeRealtimeServer

KEY = "sk-test-providers-0123"


@dataclass
class AcmeAdapter:
    """What a third party's factory returns (the registry only constructs it)."""

    name: str
    url: str | None


def make_acme(config: RealtimeConfig) -> AcmeAdapter:
    return AcmeAdapter("acme", config.url)


NOT_CALLABLE = 42


@pytest.fixture
def third_party(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entry points as an installed package would declare them."""
    points = {
        name: EntryPoint(name, f"test_config_providers:{target}", ENTRY_POINT_GROUP)
        for name, target in [
            ("acme", "make_acme"),
            ("broken", "no_such_factory"),
            ("odd", "NOT_CALLABLE"),
        ]
    }
    monkeypatch.setattr(registry, "_entry_points", lambda: points)


def realtime(**section: Any) -> RealtimeConfig:
    return parse_config({"realtime": section}, "config.yaml", {}).realtime


def problems(**section: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config({"realtime": section}, "config.yaml", {})
    return str(caught.value)


def test_openai_is_the_default_with_its_defaults_filled_in() -> None:
    rt = realtime(api_key=KEY, url=None, model=None)  # null: the provider's default
    assert (rt.provider, rt.url, rt.model, rt.voice) == (
        "openai",
        "wss://api.openai.com/v1/realtime",
        "gpt-realtime",
        "marin",
    )
    adapter = build_adapter(rt)
    assert isinstance(adapter, OpenAIRealtimeAdapter)
    assert (adapter.url, adapter.model) == (rt.url, rt.model)


def test_an_unknown_provider_names_the_key_and_the_known_ones(third_party: None) -> None:
    message = problems(provider="opnai", api_key=KEY)
    assert "config.yaml: realtime.provider: unknown provider 'opnai'" in message
    assert "(known: acme, broken, elevenlabs, odd, openai)" in message


def test_openai_needs_a_key_but_a_third_party_need_not(third_party: None) -> None:
    assert "realtime.api_key: required for provider openai" in problems()
    rt = realtime(provider="acme", voice="alto")
    assert (rt.url, rt.model) == (None, None)  # no defaults: the factory decides
    assert build_adapter(rt) == AcmeAdapter("acme", None)


def test_a_provider_without_a_default_voice_needs_one(third_party: None) -> None:
    assert "realtime.voice: required for provider acme" in problems(provider="acme")


@pytest.mark.parametrize(
    ("name", "why"),
    [("broken", "cannot load test_config_providers:no_such_factory"), ("odd", "not callable")],
)
def test_a_provider_that_does_not_load_is_a_config_error(
    third_party: None, name: str, why: str
) -> None:
    message = problems(provider=name, voice="alto")
    assert f"realtime.provider: provider '{name}'" in message and why in message


def test_ephemeral_tokens_need_a_provider_that_mints_them(third_party: None) -> None:
    message = problems(provider="acme", voice="alto", ephemeral_tokens=True)
    assert "realtime.ephemeral_tokens: provider acme has no ephemeral tokens" in message
    assert "realtime.ephemeral_tokens: must match" in problems(
        api_key=KEY, ephemeral_tokens="ftp://example.com"
    )


async def test_ephemeral_tokens_connect_with_minted_secrets() -> None:
    async with FakeRealtimeServer(api_keys={KEY}) as server:
        rt = realtime(api_key=KEY, url=server.url, ephemeral_tokens=server.http_url)
        client = fake_client(server, KEY, get_token=token_source(rt, KEY))
        await client.connect()
        try:
            assert len(server.secrets) == 1  # the websocket got an ek_ secret, not the key
            assert next(iter(server.secrets)).startswith("ek_")
        finally:
            await client.disconnect()


async def test_without_ephemeral_tokens_the_key_itself_connects() -> None:
    async with FakeRealtimeServer(api_keys={KEY}) as server:
        rt = realtime(api_key=KEY, url=server.url)
        client = fake_client(server, KEY, get_token=token_source(rt, KEY))
        await client.connect()
        try:
            assert server.secrets == {}
        finally:
            await client.disconnect()
