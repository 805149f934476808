"""ToolRunner: validation before the handler, timeouts, failures as results, concurrency,
cancellation on interruption."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest

from harkd.tools import Tool, ToolCall, ToolError, ToolRunner, ToolSpec

OBJECT: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


def make_tool(name: str, handler: Any, **kwargs: Any) -> Tool:
    kwargs.setdefault("parameters", OBJECT)
    return Tool(name=name, description=f"{name} tool", handler=handler, **kwargs)


def call(name: str, arguments: Any = None, call_id: str | None = None) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments or {})
    return ToolCall(call_id or f"call_{name}", name, text)


async def echo(args: dict[str, Any], call: ToolCall) -> dict[str, Any]:
    return {"args": args, "call_id": call.call_id}


def sleeper(seconds: float, log: list[str] | None = None, starts: list[str] | None = None) -> Any:
    async def handler(args: dict[str, Any], call: ToolCall) -> str:
        if starts is not None:
            starts.append(call.call_id)
        await asyncio.sleep(seconds)
        if log is not None:
            log.append(call.call_id)
        return f"slept {seconds}"

    return handler


async def running(starts: list[str], count: int) -> None:
    """Wait until `count` handlers have started (a sleep might not be long enough)."""
    async with asyncio.timeout(30):
        while len(starts) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.005)


ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer"},
        "b": {"type": "integer", "minimum": 0},
        "when": {"type": "object", "properties": {"hour": {"type": "integer", "maximum": 23}}},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}


async def test_valid_call_returns_output_and_duration() -> None:
    runner = ToolRunner([make_tool("echo", echo, parameters=ADD)])
    [outcome] = await runner.run_all([call("echo", {"a": 1, "b": 2}, "c1")])
    assert outcome.error is None
    assert outcome.output == {"args": {"a": 1, "b": 2}, "call_id": "c1"}
    assert outcome.duration_ms >= 0
    assert json.loads(outcome.output_text()) == outcome.output


async def test_unknown_tool_is_an_error_result() -> None:
    runner = ToolRunner([make_tool("echo", echo)])
    [outcome] = await runner.run_all([call("nope")])
    assert outcome.error == "unknown tool 'nope' (available: echo)"
    assert json.loads(outcome.output_text()) == {"error": outcome.error}


async def test_invalid_json_never_reaches_the_handler() -> None:
    seen: list[Any] = []

    async def handler(args: dict[str, Any], call: ToolCall) -> None:
        seen.append(args)

    runner = ToolRunner([make_tool("t", handler)])
    [outcome] = await runner.run_all([call("t", '{"a": 1,')])
    assert outcome.error is not None
    assert outcome.error.startswith("arguments are not valid JSON")
    assert seen == []


async def test_empty_arguments_mean_no_arguments() -> None:
    runner = ToolRunner([make_tool("echo", echo)])
    [outcome] = await runner.run_all([call("echo", "")])
    assert outcome.output == {"args": {}, "call_id": "call_echo"}


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"a": 1}, "at $: 'b' is a required property"),
        ({"a": 1, "b": -1}, "at $.b: -1 is less than the minimum of 0"),
        ({"a": "x", "b": 1}, "at $.a: 'x' is not of type 'integer'"),
        ({"a": 1, "b": 1, "when": {"hour": 25}}, "at $.when.hour: 25 is greater than the maximum"),
        ({"a": 1, "b": 1, "c": 3}, "at $: Additional properties are not allowed ('c' was"),
        ([1, 2], "at $: [1, 2] is not of type 'object'"),
    ],
)
async def test_schema_invalid_arguments_name_path_and_reason(arguments: Any, expected: str) -> None:
    seen: list[Any] = []

    async def handler(args: dict[str, Any], call: ToolCall) -> None:
        seen.append(args)

    runner = ToolRunner([make_tool("add", handler, parameters=ADD)])
    [outcome] = await runner.run_all([call("add", arguments)])
    assert outcome.error is not None
    assert outcome.error.startswith("invalid arguments: ")
    assert expected in outcome.error
    assert seen == []


async def test_timeout_is_an_error_result() -> None:
    runner = ToolRunner([make_tool("slow", sleeper(60), timeout_s=0.05)])
    started = time.monotonic()
    [outcome] = await runner.run_all([call("slow")])
    assert time.monotonic() - started < 30  # cut short, not waited out
    assert outcome.error == "timed out after 0.05 s"


async def test_handlers_own_timeout_error_is_reported_as_an_exception() -> None:
    async def handler(args: dict[str, Any], call: ToolCall) -> None:
        raise TimeoutError("device did not answer")

    runner = ToolRunner([make_tool("t", handler)])
    [outcome] = await runner.run_all([call("t")])
    assert outcome.error == "TimeoutError: device did not answer"


async def test_exception_is_an_error_result_and_logged_with_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def handler(args: dict[str, Any], call: ToolCall) -> None:
        raise KeyError("light")

    runner = ToolRunner([make_tool("broken", handler)])
    with caplog.at_level(logging.WARNING, logger="harkd.tools"):
        [outcome] = await runner.run_all([call("broken")])
    assert outcome.error == "KeyError: 'light'"
    assert any(r.exc_info and "broken" in r.getMessage() for r in caplog.records)


async def test_tool_error_is_reported_as_its_message() -> None:
    async def handler(args: dict[str, Any], call: ToolCall) -> None:
        raise ToolError("topic not allowed: x")

    runner = ToolRunner([make_tool("t", handler)])
    [outcome] = await runner.run_all([call("t")])
    assert json.loads(outcome.output_text()) == {"error": "topic not allowed: x"}


@pytest.mark.parametrize("output", [object(), {"x": {1, 2}}, float("nan")])
async def test_output_must_be_json(output: Any) -> None:
    async def handler(args: dict[str, Any], call: ToolCall) -> Any:
        return output

    runner = ToolRunner([make_tool("t", handler)])
    [outcome] = await runner.run_all([call("t")])
    assert outcome.error is not None
    assert "not JSON-serializable" in outcome.error


async def test_calls_run_concurrently_and_come_back_in_call_order() -> None:
    started: list[str] = []
    finished: list[str] = []
    all_in = asyncio.Event()

    def handler(seconds: float) -> Any:
        async def run(args: dict[str, Any], call: ToolCall) -> str:
            started.append(call.call_id)
            if len(started) == 3:
                all_in.set()
            await all_in.wait()  # passes only when all three run at once
            await asyncio.sleep(seconds)
            finished.append(call.call_id)
            return f"slept {seconds}"

        return run

    runner = ToolRunner([make_tool("slow", handler(0.3)), make_tool("fast", handler(0.05))])
    outcomes = await asyncio.wait_for(
        runner.run_all(
            [call("slow", call_id="1"), call("slow", call_id="2"), call("fast", call_id="3")]
        ),
        30,  # one after the other, the first would wait for the others forever
    )
    assert finished[0] == "3"  # the fast one really finished first...
    assert [o.call.call_id for o in outcomes] == ["1", "2", "3"]  # ...yet order is kept
    assert [o.output for o in outcomes] == ["slept 0.3", "slept 0.3", "slept 0.05"]
    assert all(o.duration_ms >= 290 for o in outcomes[:2])


async def test_one_failing_call_does_not_affect_the_others() -> None:
    async def boom(args: dict[str, Any], call: ToolCall) -> None:
        raise RuntimeError("boom")

    runner = ToolRunner([make_tool("boom", boom), make_tool("echo", echo)])
    outcomes = await runner.run_all([call("boom"), call("echo"), call("missing")])
    assert [o.error is None for o in outcomes] == [False, True, False]


async def test_cancel_interruptible_cancels_only_those_tools() -> None:
    starts: list[str] = []
    runner = ToolRunner(
        [
            make_tool("search", sleeper(60, starts=starts), cancel_on_interrupt=True),
            make_tool("lights", sleeper(0.2, starts=starts)),
        ]
    )
    task = asyncio.create_task(runner.run_all([call("search"), call("lights")]))
    await running(starts, 2)
    assert runner.cancel_interruptible() == 1
    assert runner.cancel_interruptible() == 0  # already cancelled: not counted twice
    search, lights = await asyncio.wait_for(task, 30)
    assert search.error == "cancelled by interruption"
    assert lights.output == "slept 0.2"  # it kept running to the end
    assert runner.cancel_interruptible() == 0


async def test_cancelling_the_caller_cancels_every_call_and_propagates() -> None:
    cancelled: list[str] = []

    starts: list[str] = []

    async def handler(args: dict[str, Any], call: ToolCall) -> None:
        starts.append(call.call_id)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.append(call.call_id)
            raise

    runner = ToolRunner([make_tool("t", handler, cancel_on_interrupt=True)])
    task = asyncio.create_task(runner.run_all([call("t", call_id="a"), call("t", call_id="b")]))
    await running(starts, 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(cancelled) == ["a", "b"]  # awaited, not orphaned


async def test_caller_cancelled_together_with_an_interruption_still_propagates() -> None:
    starts: list[str] = []
    runner = ToolRunner([make_tool("t", sleeper(60, starts=starts), cancel_on_interrupt=True)])
    task = asyncio.create_task(runner.run_all([call("t")]))
    await running(starts, 1)
    assert runner.cancel_interruptible() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_reloaded_tools_leave_running_calls_interruptible() -> None:
    starts: list[str] = []
    runner = ToolRunner([make_tool("t", sleeper(60, starts=starts), cancel_on_interrupt=True)])
    task = asyncio.create_task(runner.run_all([call("t")]))
    await running(starts, 1)
    runner.replace_tools([make_tool("other", echo)])  # a SIGHUP mid-call
    assert runner.names == ("other",)
    assert runner.cancel_interruptible() == 1
    (outcome,) = await task
    assert outcome.error == "cancelled by interruption"


def test_schemas_and_names() -> None:
    runner = ToolRunner([make_tool("add", echo, parameters=ADD), make_tool("echo", echo)])
    assert runner.names == ("add", "echo")
    assert runner.schemas()[0] == ToolSpec("add", "add tool", ADD)


@pytest.mark.parametrize(
    ("tool", "message"),
    [
        (make_tool("bad name", echo), "tool 'bad name': name must match"),
        (make_tool("x" * 65, echo), "name must match"),
        (make_tool("t", echo, parameters={"type": "array"}), "tool 't': parameters must be"),
        (
            make_tool("t", echo, parameters={"type": "object", "properties": {"a": {"type": 5}}}),
            "tool 't': invalid JSON Schema at $.properties.a.type",
        ),
        (make_tool("t", echo, timeout_s=0), "tool 't': timeout_s must be positive"),
    ],
)
def test_bad_tool_definitions_are_refused_naming_the_tool(tool: Tool, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("$", r"\$").replace("(", r"\(")):
        ToolRunner([tool])


def test_duplicate_tool_names_are_refused() -> None:
    with pytest.raises(ValueError, match="tool 'echo': defined twice"):
        ToolRunner([make_tool("echo", echo), make_tool("echo", echo)])
