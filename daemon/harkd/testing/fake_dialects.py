"""Fakes of the providers that speak OpenAI's Realtime events with differences of their
own: xAI Grok and Azure OpenAI. Each is the OpenAI fake with those differences
declared (the hooks of `FakeRealtimeServer`); the conversation, VAD, responses, tool
calls and injected faults are the OpenAI fake's.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Mapping
from typing import Any

from websockets.datastructures import Headers

from harkd.adapters.registry import GROK_MODEL, GROK_VOICE

from .fake_server import FakeRealtimeServer, _bearer
from .xai_validation import validate_grok_event

Event = dict[str, Any]

_GROK_VAD_KEYS = (
    "type",
    "threshold",
    "prefix_padding_ms",
    "silence_duration_ms",
    "idle_timeout_ms",
)


class FakeGrokServer(FakeRealtimeServer):
    """xAI's Grok Voice Agent API on loopback.

    Differences from the OpenAI fake: `conversation.created` comes first (no
    `session.created`); `session.update` is xAI's flat shape (validated strictly,
    voices eve/ara/rex/sal/leo); only the events Grok documents are taken (no
    truncate); it transcribes the user without being asked; client secrets are minted
    from `{"expires_after": {"seconds": N}}` alone and answered with value and expiry.
    """

    provider = "grok"
    default_model = GROK_MODEL
    default_voice = GROK_VOICE

    def validate_event(self, event: Event) -> None:
        validate_grok_event(event)

    def default_session(self, model: str, expires_at: int) -> Event:
        session = super().default_session(model, expires_at)
        # Internal only (never reported): Grok transcribes the user by itself.
        session["audio"]["input"]["transcription"] = {"model": model}
        return session

    def session_from_wire(self, session: Event) -> Event:
        ga: Event = {"type": "realtime"}
        for key in ("instructions", "tools"):
            if key in session:
                ga[key] = copy.deepcopy(session[key])
        audio = session.get("audio") or {}
        given_in = audio.get("input") or {}
        given_out = audio.get("output") or {}
        audio_in = {"format": given_in["format"]} if "format" in given_in else {}
        if "turn_detection" in session:
            audio_in["turn_detection"] = copy.deepcopy(session["turn_detection"])
        audio_out = {k: given_out[k] for k in ("format", "speed") if k in given_out}
        if session.get("voice") is not None:
            audio_out["voice"] = str(session["voice"]).lower()
        ga["audio"] = {"input": audio_in, "output": audio_out}
        return ga

    def session_to_wire(self, config: Event) -> Event:
        audio = config["audio"]
        vad = audio["input"].get("turn_detection")
        return {
            "id": config["id"],
            "object": "realtime.session",
            "model": config["model"],
            "instructions": config["instructions"],
            "voice": audio["output"]["voice"],
            "turn_detection": None if vad is None else {k: vad.get(k) for k in _GROK_VAD_KEYS},
            "audio": {
                "input": {"format": audio["input"]["format"]},
                "output": {"format": audio["output"]["format"]},
            },
            "tools": config["tools"],
        }

    def greeting(self, config: Event) -> Event:
        conversation = {"id": f"conv_{secrets.token_hex(10)}", "object": "realtime.conversation"}
        return {"type": "conversation.created", "conversation": conversation}

    def mint_secret(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or set(body) != {"expires_after"}:
            raise ValueError("the body takes expires_after only (no session)")
        expires_after = body["expires_after"]
        if not isinstance(expires_after, dict) or set(expires_after) != {"seconds"}:
            raise ValueError("expires_after takes seconds only (no anchor)")
        seconds = expires_after["seconds"]
        if isinstance(seconds, bool) or not isinstance(seconds, int) or not 1 <= seconds <= 3600:
            raise ValueError("expires_after.seconds must be 1..3600")
        expires_at, value = self._new_secret(seconds, {})
        return {"value": value, "expires_at": expires_at}


class FakeAzureServer(FakeRealtimeServer):
    """Azure OpenAI realtime (GA) on loopback: OpenAI's protocol at the resource's
    `/openai/v1/realtime?model=DEPLOYMENT`, the key in the `api-key` header (a bearer
    token only for a client secret minted at `/openai/v1/realtime/client_secrets`),
    and a bad key refused with HTTP 401 at the handshake."""

    provider = "azure"
    realtime_path = "/openai/v1/realtime"
    secrets_path = "/openai/v1/realtime/client_secrets"
    rejects_at_handshake = True

    def credential(self, headers: Headers) -> str | None:
        key = headers.get("api-key")
        if key is not None:
            return key
        bearer = _bearer(headers)
        # Only a client secret goes in Authorization; a key there is no credential.
        return bearer if bearer is not None and bearer in self.secrets else None

    def http_credential(self, headers: Mapping[str, str]) -> str | None:
        return headers.get("api-key")

    def realtime_config(self, api_key: str) -> dict[str, Any]:
        return {**super().realtime_config(api_key), "model": self.default_model}
