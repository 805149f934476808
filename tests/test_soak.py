"""A long conversation: memory holds a bounded window, and replay still carries context."""

from __future__ import annotations

import asyncio
from typing import Any

from e2e import assert_all_valid, fake_client, until
from harkd.messages import RealtimeMessage, RealtimeStatus, ToolCallPart
from harkd.session import MESSAGE_WINDOW
from harkd.testing import FakeRealtimeServer, FakeScript, ToolRule
from harkd.tools import Tool, ToolCall

KEY = "sk-test-soak"
TURNS = 150  # three messages each: well past the window
REPLAY = 12


async def get_time(args: dict[str, Any], call: ToolCall) -> dict[str, str]:
    return {"time": "12:00"}


async def test_long_conversation_keeps_a_window_and_replays_the_newest() -> None:
    script = FakeScript(
        tool_rules=[ToolRule("time", name="get_time")],
        tool_reply=lambda outputs: "It is noon.",
        delta_ms=200,
    )
    answered = asyncio.Event()

    def on_message(message: RealtimeMessage) -> None:
        if message.role == "assistant" and not isinstance(message.parts[0], ToolCallPart):
            answered.set()

    async with FakeRealtimeServer(script=script, api_keys={KEY}) as server:
        client = fake_client(
            server,
            KEY,
            tools=[Tool("get_time", "Current time", {"type": "object"}, get_time)],
            transcription_model=None,
            replay_messages=REPLAY,
            on_message=on_message,
        )
        await client.connect()
        try:
            for turn in range(TURNS):
                answered.clear()
                client.send_text(f"what time is it? ({turn})")
                await asyncio.wait_for(answered.wait(), 5.0)

            messages = client.messages
            assert len(messages) == MESSAGE_WINDOW
            assert client.state.messages == messages
            assert messages[-3].text == f"what time is it? ({TURNS - 1})"
            assert isinstance(messages[-2].parts[0], ToolCallPart)
            assert messages[-1].text == "It is noon."
            spoken = [(m.role, m.text) for m in messages if m.text][-REPLAY:]

            await server.drop_all()
            await until(lambda: len(server.sessions) == 2, what="second session")
            await until(lambda: client.status is RealtimeStatus.CONNECTED, what="reconnected")
            await until(lambda: len(server.sessions[1].items) >= REPLAY, what="replayed items")
            replayed = [
                (e["item"]["role"], e["item"]["content"][0]["text"])
                for i, e in server.received
                if i == 1 and e["type"] == "conversation.item.create"
            ]
            assert replayed == spoken
            assert replayed[0] == ("user", f"what time is it? ({TURNS - REPLAY // 2})")
        finally:
            await client.disconnect()
    assert_all_valid(server)
