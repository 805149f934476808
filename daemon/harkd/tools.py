"""Tools the assistant can call: a JSON Schema plus an async handler with a timeout.

`ToolRunner` runs the calls of one response: it validates the arguments against the
tool's schema before the handler sees them, applies each tool's timeout, runs the calls
concurrently and turns every failure into an error result for the model, so a broken
tool never ends the session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

logger = logging.getLogger(__name__)

TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
"""What the provider accepts as a function name."""

_MAX_REPORTED_ERRORS = 5


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for."""

    call_id: str
    name: str
    arguments: str
    """The raw JSON text the model produced (may be invalid)."""


@dataclass(frozen=True)
class ToolSpec:
    """What the model is told about a tool, in no provider's wire shape: each adapter
    words it for its own session configuration."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    """JSON Schema (of type object) of the arguments."""


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

    def spec(self) -> ToolSpec:
        """What the model is told about this tool."""
        return ToolSpec(self.name, self.description, self.parameters)


@dataclass(frozen=True)
class ToolOutcome:
    """What came of one call: an output or an error, and how long it took."""

    call: ToolCall
    output: Any = None
    error: str | None = None
    duration_ms: float = 0.0

    def output_text(self) -> str:
        """The result text sent to the model (`ToolResult.output`)."""
        if self.error is not None:
            return json.dumps({"error": self.error}, ensure_ascii=False)
        return json.dumps(self.output, ensure_ascii=False, default=str)


class ToolError(Exception):
    """Raised by a handler for an expected failure ("topic not allowed", "no such timer").

    The message goes to the model as the error result, without the exception type and
    without a traceback in the log (it is not a bug).
    """


def check_tool(tool: Tool) -> None:
    """Raise `ValueError` naming the tool when it cannot be offered to the model."""
    if not isinstance(tool, Tool):
        raise ValueError(f"expected a harkd.tools.Tool, got {type(tool).__name__}")
    if not isinstance(tool.name, str) or not TOOL_NAME.match(tool.name):
        raise ValueError(f"tool {tool.name!r}: name must match {TOOL_NAME.pattern}")
    if not isinstance(tool.description, str):
        raise ValueError(f"tool {tool.name!r}: description must be a string")
    if not callable(tool.handler):
        raise ValueError(f"tool {tool.name!r}: handler is not callable")
    if not tool.timeout_s > 0:
        raise ValueError(f"tool {tool.name!r}: timeout_s must be positive, got {tool.timeout_s}")
    if not isinstance(tool.parameters, Mapping):
        raise ValueError(f"tool {tool.name!r}: parameters must be a JSON Schema mapping")
    try:
        Draft202012Validator.check_schema(tool.parameters)
    except SchemaError as exc:
        raise ValueError(
            f"tool {tool.name!r}: invalid JSON Schema at {exc.json_path}: {exc.message}"
        ) from None
    if tool.parameters.get("type") != "object":
        raise ValueError(f"tool {tool.name!r}: parameters must be a schema of type 'object'")


class ToolRunner:
    """Runs the model's function calls against a fixed set of tools.

    Safe to use from one event loop; `cancel_interruptible()` may be called while
    `run_all()` is in progress (that is its purpose).
    """

    def __init__(self, tools: Sequence[Tool]) -> None:
        """Check every tool definition; `ValueError` names the first bad or duplicate one."""
        self._tools: dict[str, Tool] = {}
        self._validators: dict[str, Draft202012Validator] = {}
        # The calls now in their handler, and those we cancelled on interruption.
        self._running: dict[asyncio.Task[Any], Tool] = {}
        self._interrupted: set[asyncio.Task[Any]] = set()
        self.replace_tools(tools)

    def replace_tools(self, tools: Sequence[Tool]) -> None:
        """Offer a new set of tools (config reload); calls already running keep going
        and can still be cancelled by an interruption."""
        checked: dict[str, Tool] = {}
        validators: dict[str, Draft202012Validator] = {}
        for tool in tools:
            check_tool(tool)
            if tool.name in checked:
                raise ValueError(f"tool {tool.name!r}: defined twice")
            checked[tool.name] = tool
            validators[tool.name] = Draft202012Validator(
                tool.parameters, format_checker=Draft202012Validator.FORMAT_CHECKER
            )
        self._tools, self._validators = checked, validators

    @property
    def names(self) -> tuple[str, ...]:
        """The tool names, in definition order."""
        return tuple(self._tools)

    def schemas(self) -> list[ToolSpec]:
        """The spec of every tool, for `SessionSettings.tools`."""
        return [tool.spec() for tool in self._tools.values()]

    async def run_all(self, calls: Sequence[ToolCall]) -> list[ToolOutcome]:
        """Run the calls of one response concurrently; outcomes come back in call order.

        Never raises for a failing call. If the caller is cancelled, every call is
        cancelled and awaited before the `CancelledError` propagates.
        """
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(self.run(call), name=f"tool:{call.name}:{call.call_id}")
                for call in calls
            ]
        return [task.result() for task in tasks]

    async def run(self, call: ToolCall) -> ToolOutcome:
        """Run one call: validate, run the handler under its timeout, check the output."""
        started = time.perf_counter()

        def outcome(output: Any = None, error: str | None = None) -> ToolOutcome:
            duration_ms = (time.perf_counter() - started) * 1000
            if error is not None:
                logger.warning("tool %s (%s) failed: %s", call.name, call.call_id, error)
            else:
                logger.debug("tool %s (%s) done in %.0f ms", call.name, call.call_id, duration_ms)
            return ToolOutcome(call, output=output, error=error, duration_ms=duration_ms)

        tool = self._tools.get(call.name)
        if tool is None:
            known = ", ".join(self._tools) or "none"
            return outcome(error=f"unknown tool {call.name!r} (available: {known})")
        args, problem = self._parse_arguments(call)
        if problem is not None:
            return outcome(error=problem)

        task = asyncio.current_task()
        assert task is not None  # run() is always awaited inside a task
        self._running[task] = tool
        timeout = asyncio.timeout(tool.timeout_s)
        try:
            async with timeout:
                output = await tool.handler(args, call)
        except asyncio.CancelledError:
            # Only our own interruption becomes a result; a cancellation of the caller
            # (or one on top of ours) keeps propagating.
            if task in self._interrupted and task.uncancel() == 0:
                return outcome(error="cancelled by interruption")
            raise
        except ToolError as exc:
            return outcome(error=str(exc) or type(exc).__name__)
        except Exception as exc:
            if isinstance(exc, TimeoutError) and timeout.expired():
                return outcome(error=f"timed out after {tool.timeout_s:g} s")
            logger.exception("tool %s (%s) raised", call.name, call.call_id)
            return outcome(error=f"{type(exc).__name__}: {exc}")
        finally:
            self._running.pop(task, None)
            self._interrupted.discard(task)

        try:
            json.dumps(output, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return outcome(error=f"tool returned output that is not JSON-serializable: {exc}")
        return outcome(output=output)

    def cancel_interruptible(self) -> int:
        """Cancel the running calls of tools with `cancel_on_interrupt`; return how many.

        Their outcome is the error "cancelled by interruption"; other calls keep running.
        """
        cancelled = 0
        for task, tool in self._running.items():
            if tool.cancel_on_interrupt and not task.done() and task not in self._interrupted:
                self._interrupted.add(task)
                task.cancel()
                cancelled += 1
        return cancelled

    def _parse_arguments(self, call: ToolCall) -> tuple[dict[str, Any], str | None]:
        # Some models send "" for a call without arguments.
        text = call.arguments if call.arguments.strip() else "{}"
        try:
            args = json.loads(text)
        except json.JSONDecodeError as exc:
            return {}, f"arguments are not valid JSON: {exc}"
        errors = sorted(self._validators[call.name].iter_errors(args), key=lambda e: e.json_path)
        if errors:
            described = "; ".join(
                f"at {e.json_path}: {e.message}" for e in errors[:_MAX_REPORTED_ERRORS]
            )
            return {}, f"invalid arguments: {described}"
        # The schema is of type object, so valid arguments are a JSON object.
        return dict(args), None
