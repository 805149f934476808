"""xAI Grok Voice Agent: the OpenAI Realtime events with xAI's own session shape.

Grok speaks OpenAI's event names, so the OpenAI mapping and transport serve it; this
module declares only what differs (`GROK`):

* `session.update` is flat: `voice` and `turn_detection` sit at the top of the
  session, there is no `type`, `tool_choice` nor transcription model (Grok
  transcribes the user by itself), and turn detection is `server_vad` or null
  (manual turns) — no semantic VAD;
* there is no `conversation.item.truncate`: an interrupted answer is marked at what
  was heard in harkd's own messages, but the model's copy keeps the whole text;
* the endpoint is `wss://api.x.ai/v1/realtime`; the key (or an ephemeral client
  secret from `POST /v1/realtime/client_secrets`) goes in `Authorization: Bearer`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from harkd import events as ev
from harkd.adapters.openai import TRAITS, Dialect, OpenAIRealtimeAdapter, function_tools
from harkd.adapters.registry import GROK_MODEL, GROK_URL

GROK_TRAITS = replace(TRAITS, can_truncate=False)
"""Like OpenAI (24 kHz PCM both ways, server or manual turns, replay after a drop),
except that an answer cannot be truncated."""


def grok_session_update(settings: ev.SessionSettings) -> dict[str, Any]:
    """xAI's `session.update` for these settings."""
    if settings.vad_mode == "semantic":
        # config.py refuses it (realtime.turn_detection); a direct caller learns here.
        raise ValueError("Grok has no semantic VAD: use server or manual turns")
    rate = GROK_TRAITS.input_format.rate
    session: dict[str, Any] = {
        "instructions": settings.instructions,
        "voice": settings.voice,
        "turn_detection": {"type": "server_vad"} if settings.vad_mode == "server" else None,
        "audio": {
            "input": {"format": {"type": "audio/pcm", "rate": rate}},
            "output": {"format": {"type": "audio/pcm", "rate": GROK_TRAITS.output_format.rate}},
        },
        "tools": function_tools(settings),
    }
    return {"type": "session.update", "session": session}


GROK = Dialect("grok", GROK_TRAITS, grok_session_update)
"""What the Grok Voice Agent does differently from OpenAI Realtime."""


def grok_realtime(
    model: str = GROK_MODEL,
    url: str = GROK_URL,
    *,
    ping_interval_s: float = 20.0,
    ping_timeout_s: float = 20.0,
) -> OpenAIRealtimeAdapter:
    """The Grok adapter: OpenAI's transport speaking the `GROK` dialect."""
    return OpenAIRealtimeAdapter(
        model,
        url,
        ping_interval_s=ping_interval_s,
        ping_timeout_s=ping_timeout_s,
        dialect=GROK,
    )
