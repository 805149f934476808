"""RealtimeClient end to end against the fake server over real websockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from e2e import assert_all_valid, fake_client, sent_types, until
from harkd.adapters.openai import openai_realtime
from harkd.backoff import Backoff
from harkd.client import RealtimeClient
from harkd.messages import (
    AudioPart,
    MessageFinalized,
    RealtimeError,
    RealtimeStatus,
    RealtimeToken,
    ToolCallFinished,
    ToolCallPart,
)
from harkd.testing import FakeRealtimeServer, FakeScript, ToolRule
from harkd.tokens import EphemeralTokens, TokenSource, static_token
from harkd.tools import Tool, ToolCall
from mosquitto import free_port

KEY = "sk-test-0123456789"


async def get_time(args: dict[str, Any], call: ToolCall) -> dict[str, str]:
    return {"time": "12:34"}


TIME_TOOL = Tool("get_time", "Current time", {"type": "object", "properties": {}}, get_time)


@pytest.fixture
async def server() -> AsyncIterator[FakeRealtimeServer]:
    script = FakeScript(tool_rules=[ToolRule(r"\btime\b", "get_time")], delta_ms=100)
    async with FakeRealtimeServer(script=script, api_keys={KEY}) as fake:
        yield fake


def make_client(server: FakeRealtimeServer, **options: Any) -> RealtimeClient:
    return fake_client(server, KEY, **{"tools": [TIME_TOOL], **options})


def assistant_texts(client: RealtimeClient) -> list[str]:
    return [m.text for m in client.messages if m.role == "assistant" and m.text]


async def test_connect_configures_a_ga_session(server: FakeRealtimeServer) -> None:
    statuses: list[RealtimeStatus] = []
    client = make_client(server, on_status_change=statuses.append)
    await client.connect()
    try:
        assert client.status is RealtimeStatus.CONNECTED
        session = server.sessions[0].config
        assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        assert session["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe"}
        assert session["audio"]["output"]["voice"] == "marin"
        assert [t["name"] for t in session["tools"]] == ["get_time"]
        assert statuses[:2] == [RealtimeStatus.CONNECTING, RealtimeStatus.CONNECTED]
        assert client.audio is not None
    finally:
        await client.disconnect()
    assert client.status is RealtimeStatus.IDLE
    assert client.audio is None
    assert_all_valid(server)


async def test_text_turn_is_answered_and_final(server: FakeRealtimeServer) -> None:
    finals: list[MessageFinalized] = []
    client = make_client(server)
    client.on_event(lambda e: finals.append(e) if isinstance(e, MessageFinalized) else None)
    await client.connect()
    client.send_text("hello there")
    await until(lambda: len(finals) >= 2, what="user and assistant messages")
    assert [m.role for m in client.messages] == ["user", "assistant"]
    assert client.messages[1].text == "You said: hello there"
    assert isinstance(client.messages[1].parts[0], AudioPart)
    assert client.messages[1].duration_ms and client.messages[1].duration_ms > 0
    await client.disconnect()
    assert_all_valid(server)


async def test_tool_round_trip_sends_outputs_then_one_response(
    server: FakeRealtimeServer,
) -> None:
    calls: list[ToolCallFinished] = []
    client = make_client(server)
    client.on_event(lambda e: calls.append(e) if isinstance(e, ToolCallFinished) else None)
    await client.connect()
    client.send_text("what time is it?")
    await until(lambda: any("12:34" in t for t in assistant_texts(client)), what="tool reply")
    assert calls[0].name == "get_time" and calls[0].output == {"time": "12:34"}
    types = sent_types(server)
    after_output = types[types.index("conversation.item.create", 2) :]
    assert after_output.count("response.create") == 1
    tool_message = next(
        m for m in client.messages if any(isinstance(p, ToolCallPart) for p in m.parts)
    )
    assert json.loads(tool_message.parts[0].output or "") == {"time": "12:34"}  # type: ignore[union-attr]
    await client.disconnect()
    assert_all_valid(server)


async def test_drop_reconnects_and_replays_context(server: FakeRealtimeServer) -> None:
    statuses: list[RealtimeStatus] = []
    client = make_client(server, on_status_change=statuses.append)
    await client.connect()
    client.send_text("remember the word banana")
    await until(lambda: len(assistant_texts(client)) == 1, what="first answer")
    await server.drop_all()
    await until(lambda: len(server.sessions) == 2, what="second session")
    await until(lambda: client.status is RealtimeStatus.CONNECTED, what="reconnected")
    assert RealtimeStatus.RECONNECTING in statuses
    await until(lambda: len(server.sessions[1].items) >= 2, what="replayed items")
    replayed = [e for i, e in server.received if i == 1 and e["type"] == "conversation.item.create"]
    texts = [e["item"]["content"][0]["text"] for e in replayed]
    assert texts == ["remember the word banana", "You said: remember the word banana"]
    assert replayed[1]["item"]["role"] == "assistant"
    await client.disconnect()
    assert_all_valid(server)


async def test_rollover_before_the_session_limit(server: FakeRealtimeServer) -> None:
    client = make_client(server, rollover_s=0.5)
    await client.connect()
    client.send_text("hi")
    await until(lambda: len(server.sessions) >= 2, timeout_s=5, what="rolled over")
    # The replayed context is what the user keeps across the rollover.
    await until(
        lambda: "conversation.item.create" in sent_types(server, 1), what="context replayed"
    )
    await client.disconnect()
    assert_all_valid(server)


async def test_provider_session_limit_reconnects_at_once() -> None:
    async with FakeRealtimeServer(api_keys={KEY}, max_session_s=0.3) as server:
        client = make_client(server, reconnect=Backoff(5, 10))  # backoff not used
        await client.connect()
        await until(lambda: len(server.sessions) >= 2, timeout_s=3, what="new session")
        await until(lambda: client.status is RealtimeStatus.CONNECTED)
        await client.disconnect()


async def test_bad_key_fails_without_a_hot_loop(server: FakeRealtimeServer) -> None:
    client = make_client(server, get_token=static_token("sk-wrong-key-123"))
    with pytest.raises(RealtimeError) as raised:
        await client.connect()
    assert raised.value.code == "invalid_api_key"
    assert client.status is RealtimeStatus.ERROR
    client.destroy()
    # A supervisor-owned client keeps the error in view and retries only slowly.
    attempts: list[str] = []

    def counted(label: str, key: str) -> TokenSource:
        inner = static_token(key)

        async def get_token() -> RealtimeToken:
            attempts.append(label)
            return await inner()

        return get_token

    supervised = make_client(server, get_token=counted("refused", "sk-wrong-key-123"))
    # A yardstick instead of a sleep: a client on the same backoff whose connection
    # fails for another reason. Its retries show the refused one had time to retry.
    unreachable = make_client(
        server,
        get_token=counted("unreachable", KEY),
        adapter=openai_realtime(url=f"ws://127.0.0.1:{free_port()}/v1/realtime"),
    )
    tasks = [asyncio.create_task(c.run()) for c in (supervised, unreachable)]
    await until(lambda: supervised.status is RealtimeStatus.ERROR, what="the error")
    await until(lambda: attempts.count("unreachable") >= 6, what="6 attempts elsewhere")
    assert attempts.count("refused") == 1  # no hot loop
    assert len(server.sessions) == 2  # one attempt each
    assert supervised.status is RealtimeStatus.ERROR
    assert supervised.error is not None and supervised.error.code == "invalid_api_key"
    for task in tasks:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_ephemeral_tokens_are_minted_and_reused(server: FakeRealtimeServer) -> None:
    tokens = EphemeralTokens(KEY, server.http_url, "gpt-realtime")
    client = make_client(server, get_token=tokens)
    await client.connect()
    first = await tokens()
    assert first.value.startswith("ek_") and first.expires_at is not None
    assert (await tokens()) is first  # cached until near expiry
    await client.disconnect()


async def test_state_subscribers_see_changes_and_can_unsubscribe(
    server: FakeRealtimeServer,
) -> None:
    seen: list[str] = []
    client = make_client(server)
    unsubscribe = client.on_state_change(lambda s: seen.append(s.status.value))
    await client.connect()
    assert "connected" in seen
    unsubscribe()
    count = len(seen)
    client.set_volume(40)
    assert len(seen) == count and client.volume == 40
    await client.disconnect()


async def test_connect_after_creating_a_run_task_opens_one_connection(
    server: FakeRealtimeServer,
) -> None:
    client = make_client(server)
    running = asyncio.create_task(client.run(autoconnect=False))
    await client.connect()  # the run task has not started yet when connect is called
    client.send_text("what time is it")
    await until(lambda: bool(assistant_texts(client)), what="an answer")
    assert len(server.sessions) == 1  # one run loop, one connection
    with pytest.raises(RuntimeError, match="already running"):
        await client.run()
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
