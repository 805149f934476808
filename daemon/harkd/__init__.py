"""harkd: a headless realtime voice daemon for edge hardware.

The names below are imported on first use, so `import harkd.events` (or the
`harkd` command's start) does not load the client stack (websockets, numpy).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

_HOMES = {
    "AudioVisualization": "harkd.messages",
    "RealtimeClient": "harkd.client",
    "RealtimeError": "harkd.messages",
    "RealtimeMessage": "harkd.messages",
    "RealtimeMode": "harkd.messages",
    "RealtimeState": "harkd.messages",
    "RealtimeStatus": "harkd.messages",
    "RealtimeToken": "harkd.messages",
    "Tool": "harkd.tools",
}

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


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'harkd' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
