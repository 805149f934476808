"""Test helpers shipped with harkd: a fake OpenAI Realtime (GA) server and event validation.

``FakeRealtimeServer`` is a real websocket server on loopback speaking the provider's
protocol; ``validate_client_event`` checks events against the ``openai`` package's
models (a test dependency, imported lazily).
"""

from .fake_server import (
    EnergyVad,
    FakeRealtimeServer,
    FakeScript,
    FakeSession,
    ToolRule,
    synthesize_speech,
)
from .validation import ClientEventInvalid, openai_available, validate_client_event

__all__ = [
    "ClientEventInvalid",
    "EnergyVad",
    "FakeRealtimeServer",
    "FakeScript",
    "FakeSession",
    "ToolRule",
    "openai_available",
    "synthesize_speech",
    "validate_client_event",
]
