"""Realtime providers by name: the built-in ones and those other packages add through
the entry-point group `harkd.providers`.

Nothing here imports an adapter: a provider's module is imported only when an
adapter is built for it, so `harkd --help` and `check-config` do not load websockets.
A built-in name wins over an entry point of the same name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any

from harkd.tokens import EphemeralTokens, SecretsEndpoint, TokenSource, http_base, static_token

if TYPE_CHECKING:
    from harkd.adapters.base import RealtimeAdapter
    from harkd.config import RealtimeConfig

ENTRY_POINT_GROUP = "harkd.providers"

AdapterFactory = Callable[["RealtimeConfig"], "RealtimeAdapter"]
"""What an entry point of group `harkd.providers` names: config section -> adapter."""
TokenMinter = Callable[[str, "RealtimeConfig"], TokenSource]
"""API key and config section -> a source of short-lived client secrets."""


class ProviderUnavailable(Exception):
    """A named provider that is not known, or whose entry point cannot be loaded."""


@dataclass(frozen=True)
class Provider:
    """What the daemon knows about a provider before importing its adapter."""

    name: str
    build: AdapterFactory
    url: str | None = None
    """Default for `realtime.url`; None: the adapter picks (or needs none)."""
    model: str | None = None
    """Default for `realtime.model`."""
    voice: str | None = None
    """Default for `realtime.voice`; without one the config must name a voice."""
    needs_api_key: bool = False
    """`realtime.api_key` (or `api_key_file`) is required."""
    mint_tokens: TokenMinter | None = None
    """How `realtime.ephemeral_tokens` gets client secrets; None: not supported."""
    turn_detection: frozenset[str] = frozenset({"server_vad", "semantic_vad", "manual"})
    """The `realtime.turn_detection` values it supports."""
    check: Callable[[RealtimeConfig], None] | None = None
    """Checks the provider's own keys of a `realtime` section; raises `ValueError`
    whose text starts with the key (`realtime.agent_id: required ...`)."""
    fake: str | None = None
    """`module:attribute` of its fake server in `harkd.testing` (a `ProviderFake`
    factory), for `harkd demo --provider` and `harkd fake-server --provider`."""
    key_variable: str | None = None
    """The environment variable a missing key's error suggests; None: `NAME_API_KEY`."""
    session_limit_s: float | None = None
    """How long the provider lets a session last; `realtime.rollover_s` must be less."""


OPENAI_URL = "wss://api.openai.com/v1/realtime"
OPENAI_MODEL = "gpt-realtime"
OPENAI_VOICE = "marin"
OPENAI_SESSION_LIMIT_S = 3600.0

GROK_URL = "wss://api.x.ai/v1/realtime"
GROK_MODEL = "grok-voice-latest"
"""xAI's alias for its newest voice model."""
GROK_VOICE = "eve"
GROK_SESSION_LIMIT_S = 3600.0

AZURE_MODEL = "gpt-realtime"
"""The deployment name Azure's own examples give the model; yours may differ."""
AZURE_URL_SHAPE = "wss://RESOURCE.openai.azure.com/openai/v1/realtime"


def _openai(config: RealtimeConfig) -> RealtimeAdapter:
    from harkd.adapters.openai import OpenAIRealtimeAdapter

    return OpenAIRealtimeAdapter(
        config.model or OPENAI_MODEL,
        config.url or OPENAI_URL,
        ping_interval_s=config.ping_interval_s,
        ping_timeout_s=config.ping_timeout_s,
    )


def _openai_secrets(api_key: str, config: RealtimeConfig) -> TokenSource:
    base = config.ephemeral_tokens if isinstance(config.ephemeral_tokens, str) else None
    return EphemeralTokens(
        api_key, base or http_base(config.url or OPENAI_URL), config.model or OPENAI_MODEL
    )


def _grok(config: RealtimeConfig) -> RealtimeAdapter:
    from harkd.adapters.grok import grok_realtime

    return grok_realtime(
        config.model or GROK_MODEL,
        config.url or GROK_URL,
        ping_interval_s=config.ping_interval_s,
        ping_timeout_s=config.ping_timeout_s,
    )


def _grok_secrets(api_key: str, config: RealtimeConfig) -> TokenSource:
    base = config.ephemeral_tokens if isinstance(config.ephemeral_tokens, str) else None
    return EphemeralTokens(
        api_key,
        base or http_base(config.url or GROK_URL),
        config.model or GROK_MODEL,
        endpoint=SecretsEndpoint(request=_xai_secret_request),
    )


def _xai_secret_request(ttl_s: int, model: str) -> dict[str, Any]:
    # xAI takes only the lifetime (no session, no anchor); the model is picked on connect.
    return {"expires_after": {"seconds": ttl_s}}


def _azure_url(config: RealtimeConfig) -> str:
    if config.url is None:  # config checks refuse this; a direct caller learns here
        raise ProviderUnavailable(f"provider azure needs realtime.url ({AZURE_URL_SHAPE})")
    return config.url


def _azure(config: RealtimeConfig) -> RealtimeAdapter:
    from harkd.adapters.azure import azure_realtime

    return azure_realtime(
        _azure_url(config),
        config.model or AZURE_MODEL,
        ping_interval_s=config.ping_interval_s,
        ping_timeout_s=config.ping_timeout_s,
    )


def _azure_secrets(api_key: str, config: RealtimeConfig) -> TokenSource:
    from harkd.adapters.azure import AZURE_SECRETS

    base = config.ephemeral_tokens if isinstance(config.ephemeral_tokens, str) else None
    return EphemeralTokens(
        api_key,
        base or http_base(_azure_url(config)),
        config.model or AZURE_MODEL,
        endpoint=AZURE_SECRETS,
    )


def _azure_check(config: RealtimeConfig) -> None:
    if config.url is None:
        raise ValueError(f"realtime.url: required for provider azure ({AZURE_URL_SHAPE})")


ELEVENLABS_URL = "wss://api.elevenlabs.io/v1/convai/conversation"
ELEVENLABS_AGENT_VOICE = "agent"
"""ElevenLabs' default `realtime.voice`: the agent's own voice (no override is sent)."""


def _elevenlabs(config: RealtimeConfig) -> RealtimeAdapter:
    from harkd.adapters.elevenlabs import ElevenLabsAdapter

    assert config.agent_id is not None  # _elevenlabs_check refused the config otherwise
    return ElevenLabsAdapter(
        config.agent_id,
        config.url or ELEVENLABS_URL,
        ping_interval_s=config.ping_interval_s,
        ping_timeout_s=config.ping_timeout_s,
    )


def _elevenlabs_check(config: RealtimeConfig) -> None:
    if not config.agent_id:
        raise ValueError("realtime.agent_id: required for provider elevenlabs")


GEMINI_URL = (
    "wss://generativelanguage.googleapis.com/ws/"
    "google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
)
GEMINI_MODEL = "gemini-3.8-live"
GEMINI_VOICE = "Puck"


def _gemini(config: RealtimeConfig) -> RealtimeAdapter:
    from harkd.adapters.gemini import GeminiLiveAdapter

    return GeminiLiveAdapter(
        config.model or GEMINI_MODEL,
        config.url or GEMINI_URL,
        ping_interval_s=config.ping_interval_s,
        ping_timeout_s=config.ping_timeout_s,
    )


BUILTIN: dict[str, Provider] = {
    "openai": Provider(
        "openai",
        _openai,
        url=OPENAI_URL,
        model=OPENAI_MODEL,
        voice=OPENAI_VOICE,
        needs_api_key=True,
        mint_tokens=_openai_secrets,
        fake="harkd.testing.fake_server:FakeRealtimeServer",
        session_limit_s=OPENAI_SESSION_LIMIT_S,
    ),
    "azure": Provider(
        "azure",
        _azure,
        model=AZURE_MODEL,
        voice=OPENAI_VOICE,
        needs_api_key=True,
        mint_tokens=_azure_secrets,
        check=_azure_check,
        fake="harkd.testing.fake_dialects:FakeAzureServer",
        key_variable="AZURE_OPENAI_API_KEY",
        session_limit_s=OPENAI_SESSION_LIMIT_S,
    ),
    "grok": Provider(
        "grok",
        _grok,
        url=GROK_URL,
        model=GROK_MODEL,
        voice=GROK_VOICE,
        needs_api_key=True,
        mint_tokens=_grok_secrets,
        turn_detection=frozenset({"server_vad", "manual"}),
        fake="harkd.testing.fake_dialects:FakeGrokServer",
        key_variable="XAI_API_KEY",
        session_limit_s=GROK_SESSION_LIMIT_S,
    ),
    "gemini": Provider(
        "gemini",
        _gemini,
        url=GEMINI_URL,
        model=GEMINI_MODEL,
        voice=GEMINI_VOICE,
        needs_api_key=True,
        # No semantic VAD: the server's activity detection or harkd's own turns.
        turn_detection=frozenset({"server_vad", "manual"}),
        fake="harkd.testing.gemini_fake:GeminiFakeServer",
    ),
    # A public agent needs no key; with realtime.api_key harkd fetches a signed URL
    # (private agents). The agent's own turn model decides every turn.
    "elevenlabs": Provider(
        "elevenlabs",
        _elevenlabs,
        url=ELEVENLABS_URL,
        voice=ELEVENLABS_AGENT_VOICE,
        turn_detection=frozenset({"server_vad"}),
        check=_elevenlabs_check,
        fake="harkd.testing.elevenlabs_fake:ElevenLabsFakeServer",
    ),
}


def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def provider_names() -> list[str]:
    """Every provider name config.yaml may give, sorted."""
    return sorted({*BUILTIN, *_entry_points()})


def find_provider(name: str) -> Provider:
    """The provider called `name`; a third-party one's factory is imported here.

    Raises `ProviderUnavailable` (its text fit for `realtime.provider: ...`).
    """
    if name in BUILTIN:
        return BUILTIN[name]
    entry = _entry_points().get(name)
    if entry is None:
        known = ", ".join(provider_names())
        raise ProviderUnavailable(f"unknown provider {name!r} (known: {known})")
    try:
        factory = entry.load()
    except Exception as exc:  # a third party's import can fail in any way
        raise ProviderUnavailable(
            f"provider {name!r}: cannot load {entry.value}: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(factory):
        raise ProviderUnavailable(f"provider {name!r}: {entry.value} is not callable")
    # A third party names its fake (`module:attribute`) on the factory, if it has one.
    fake = getattr(factory, "harkd_fake", None)
    return Provider(name, factory, fake=fake if isinstance(fake, str) else None)


def build_adapter(config: RealtimeConfig) -> RealtimeAdapter:
    """The adapter for `config.provider`, built from its config section."""
    return find_provider(config.provider).build(config)


def token_source(config: RealtimeConfig, api_key: str) -> TokenSource:
    """The credential the adapter connects with: the key itself, or client secrets
    minted from it when `realtime.ephemeral_tokens` asks."""
    if config.ephemeral_tokens is False:
        return static_token(api_key)
    minter = find_provider(config.provider).mint_tokens
    if minter is None:
        raise ProviderUnavailable(f"provider {config.provider!r} has no ephemeral tokens")
    return minter(api_key, config)
