"""Azure OpenAI realtime (GA): OpenAI's protocol behind an Azure resource.

The events, session shape and traits are OpenAI's own; what differs is where and how
to connect: `wss://RESOURCE.openai.azure.com/openai/v1/realtime?model=DEPLOYMENT`
(there is no default resource, so `realtime.url` is required and `realtime.model`
names the deployment), with the key in Azure's `api-key` header. An ephemeral client
secret (minted at `/openai/v1/realtime/client_secrets` with the key) goes in
`Authorization: Bearer`, as at OpenAI.
"""

from __future__ import annotations

from harkd.adapters.openai import TRAITS, Dialect, OpenAIRealtimeAdapter, session_update
from harkd.adapters.registry import AZURE_MODEL
from harkd.messages import RealtimeToken
from harkd.tokens import SecretsEndpoint


def api_key_header(api_key: str) -> dict[str, str]:
    """Azure's key header."""
    return {"api-key": api_key}


def azure_auth(token: RealtimeToken) -> dict[str, str]:
    """A standard key goes in `api-key`; an ephemeral secret (it has an expiry) as a
    bearer token."""
    if token.expires_at is not None:
        return {"Authorization": f"Bearer {token.value}"}
    return api_key_header(token.value)


AZURE = Dialect("azure", TRAITS, session_update, azure_auth)
"""Azure OpenAI: OpenAI's protocol, Azure's credential header."""

AZURE_SECRETS = SecretsEndpoint(path="/openai/v1/realtime/client_secrets", auth=api_key_header)
"""Azure's client secrets: OpenAI's request under the resource's `/openai` path,
authorized by `api-key`."""


def azure_realtime(
    url: str,
    deployment: str = AZURE_MODEL,
    *,
    ping_interval_s: float = 20.0,
    ping_timeout_s: float = 20.0,
) -> OpenAIRealtimeAdapter:
    """The Azure adapter for the resource endpoint `url` and a model deployment."""
    return OpenAIRealtimeAdapter(
        deployment,
        url,
        ping_interval_s=ping_interval_s,
        ping_timeout_s=ping_timeout_s,
        dialect=AZURE,
    )
