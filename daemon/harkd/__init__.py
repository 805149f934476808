"""harkd: a headless realtime voice daemon for edge hardware."""

from harkd.client import RealtimeClient
from harkd.messages import (
    AudioVisualization,
    RealtimeError,
    RealtimeMessage,
    RealtimeMode,
    RealtimeState,
    RealtimeStatus,
    RealtimeToken,
)
from harkd.tools import Tool

__all__ = [
    "AudioVisualization",
    "RealtimeClient",
    "RealtimeError",
    "RealtimeMessage",
    "RealtimeMode",
    "RealtimeState",
    "RealtimeStatus",
    "RealtimeToken",
    "Tool",
]
