"""Tools the assistant can call: a JSON Schema plus an async handler with a timeout."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for."""

    call_id: str
    name: str
    arguments: str
    """The raw JSON text the model produced (may be invalid)."""


ToolHandler = Callable[[dict[str, Any], ToolCall], Awaitable[Any]]


@dataclass(frozen=True)
class Tool:
    """A function the model may call.

    `handler(args, call)` gets the validated arguments and returns anything JSON-able.
    """

    name: str
    description: str
    parameters: Mapping[str, Any]
    handler: ToolHandler = field(repr=False)
    timeout_s: float = 10.0
    cancel_on_interrupt: bool = False

    def schema(self) -> dict[str, Any]:
        """The tool as the provider's `session.tools` entry."""
        return {
            "type": "function",
            "name": self.name,
            "description": self.description,
            "parameters": dict(self.parameters),
        }


@dataclass(frozen=True)
class ToolOutcome:
    """What came of one call: an output or an error, and how long it took."""

    call: ToolCall
    output: Any = None
    error: str | None = None
    duration_ms: float = 0.0

    def output_text(self) -> str:
        """The `function_call_output` text sent to the model."""
        if self.error is not None:
            return json.dumps({"error": self.error}, ensure_ascii=False)
        return json.dumps(self.output, ensure_ascii=False, default=str)
