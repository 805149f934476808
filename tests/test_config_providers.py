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
from harkd.testing.fakes import fake_server

KEY = "sk-test-providers-0123"


@dataclass
class AcmeAdapter:
    """What a third party's factory returns (the registry only constructs it)."""

    name: str
    url: str | None


def make_acme(config: RealtimeConfig) -> AcmeAdapter:
    return AcmeAdapter("acme", config.url)


class AcmeFake(FakeRealtimeServer):
    """A third party's fake: the OpenAI fake under its own name."""

    provider = "acme"


make_acme.harkd_fake = "test_config_providers:AcmeFake"  # type: ignore[attr-defined]


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
    known = ", ".join(sorted({"acme", "broken", "odd", *registry.BUILTIN}))
    assert f"(known: {known})" in message


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


def test_grok_has_xais_defaults_and_no_semantic_vad() -> None:
    rt = realtime(provider="grok", api_key=KEY)
    assert (rt.url, rt.model, rt.voice) == (
        "wss://api.x.ai/v1/realtime",
        "grok-voice-latest",
        "eve",
    )
    assert build_adapter(rt).name == "grok"
    message = problems(provider="grok", api_key=KEY, turn_detection="semantic_vad")
    assert (
        "realtime.turn_detection: semantic_vad is not supported by provider grok "
        "(supported: manual, server_vad)"
    ) in message
    assert realtime(provider="grok", api_key=KEY, turn_detection="manual").turn_detection == (
        "manual"
    )


def test_azure_needs_its_resource_url_and_takes_the_deployment_as_model() -> None:
    message = problems(provider="azure", api_key=KEY)
    assert (
        "realtime.url: required for provider azure "
        "(wss://RESOURCE.openai.azure.com/openai/v1/realtime)"
    ) in message
    url = "wss://kitchen.openai.azure.com/openai/v1/realtime"
    rt = realtime(provider="azure", api_key=KEY, url=url, model="my-realtime")
    adapter = build_adapter(rt)
    assert isinstance(adapter, OpenAIRealtimeAdapter)
    assert (adapter.name, adapter.url, adapter.model, rt.voice) == (
        "azure",
        url,
        "my-realtime",
        "marin",
    )


@pytest.mark.parametrize(
    ("provider", "variable", "extra"),
    [
        ("grok", "XAI_API_KEY", {}),
        ("azure", "AZURE_OPENAI_API_KEY", {"url": "wss://r.openai.azure.com/openai/v1/realtime"}),
        ("openai", "OPENAI_API_KEY", {}),
    ],
)
def test_a_missing_key_names_the_providers_own_variable(
    provider: str, variable: str, extra: dict[str, Any]
) -> None:
    message = problems(provider=provider, **extra)
    assert (
        f"realtime.api_key: required for provider {provider} (set api_key, e.g. ${{{variable}}}"
        in (message)
    )


@pytest.mark.parametrize("provider", ["openai", "grok"])
def test_rollover_must_come_before_the_providers_session_limit(provider: str) -> None:
    message = problems(provider=provider, api_key=KEY, rollover_s=3600)
    assert (
        f"realtime.rollover_s: must be below the 3600 s session limit of provider {provider}"
    ) in message


async def test_a_third_party_fake_serves_demo_and_fake_server(third_party: None) -> None:
    server = fake_server("acme", api_keys={KEY})
    assert isinstance(server, AcmeFake)
    async with server:
        assert server.realtime_config(KEY)["provider"] == "acme"
    with pytest.raises(registry.ProviderUnavailable, match="'broken'"):
        fake_server("broken")
