"""The OpenAI adapter: its declared traits match its wire protocol, every neutral
command becomes a valid GA event, control overtakes queued audio, and provider error
codes arrive in the session's terms."""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any, get_args

import pytest
from openai.types.realtime import InputAudioBufferAppendEvent
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from harkd import events as ev
from harkd.adapters.base import ConnectionLost
from harkd.adapters.openai import (
    OpenAIConnection,
    OpenAIRealtimeAdapter,
    append_message,
    decode,
    encode,
    session_update,
)
from harkd.session import DEFAULT_TRAITS
from harkd.testing import validate_client_event
from harkd.tools import ToolSpec


@pytest.mark.parametrize("pcm", [b"", b"\x00\x01", os.urandom(960), os.urandom(4801)])
def test_append_message_is_the_encoded_command_and_a_valid_ga_event(pcm: bytes) -> None:
    text = append_message(pcm)
    assert json.loads(text) == encode(ev.AppendAudio(pcm))
    InputAudioBufferAppendEvent.model_validate_json(text, strict=True)


COMMANDS: list[tuple[ev.Command, str]] = [
    (ev.AppendAudio(b"\x00\x01" * 480), "input_audio_buffer.append"),
    (ev.StartTurn(), "input_audio_buffer.clear"),
    (ev.EndTurn(), "input_audio_buffer.commit"),
    (ev.DiscardTurn(), "input_audio_buffer.clear"),
    (ev.RequestResponse(), "response.create"),
    (ev.CancelResponse(), "response.cancel"),
    (ev.TruncateItem("item_a1", 1234), "conversation.item.truncate"),
    (ev.CreateMessage("item_u1", "user", text="hi"), "conversation.item.create"),
    (
        ev.CreateMessage("item_u2", "user", image_url="https://cam/x"),
        "conversation.item.create",
    ),
    (ev.CreateMessage("item_a2", "assistant", text="hello"), "conversation.item.create"),
    (ev.CreateMessage("item_s1", "system", text="be brief"), "conversation.item.create"),
    (ev.ToolResult("call_1", "get_time", '{"time": "12:00"}'), "conversation.item.create"),
]


@pytest.mark.parametrize(
    ("command", "wire_type"),
    COMMANDS,
    ids=[f"{type(c).__name__}-{i}" for i, (c, _) in enumerate(COMMANDS)],
)
def test_every_neutral_command_encodes_as_a_valid_ga_event(
    command: ev.Command, wire_type: str
) -> None:
    event = encode(command)
    assert event["type"] == wire_type
    validate_client_event(event)


def test_the_commands_above_are_the_whole_vocabulary() -> None:
    assert {type(command) for command, _ in COMMANDS} == set(get_args(ev.Command))


def test_encoding_keeps_what_the_command_says() -> None:
    truncate = encode(ev.TruncateItem("item_a1", 1234))
    assert (truncate["item_id"], truncate["audio_end_ms"]) == ("item_a1", 1234)
    result = encode(ev.ToolResult("call_1", "get_time", "1"))["item"]
    assert result == {"type": "function_call_output", "call_id": "call_1", "output": "1"}


@pytest.mark.parametrize("vad_mode", ["server", "semantic", "manual"])
def test_session_update_words_the_neutral_settings_as_a_valid_ga_event(vad_mode: Any) -> None:
    tool = ToolSpec("get_time", "The time now.", {"type": "object", "properties": {}})
    settings = ev.SessionSettings("Be brief.", "marin", vad_mode, tools=(tool,))
    event = session_update(settings)
    validate_client_event(event)
    session = event["session"]
    assert session["tools"] == [
        {
            "type": "function",
            "name": "get_time",
            "description": "The time now.",
            "parameters": {"type": "object", "properties": {}},
        }
    ]
    turns = session["audio"]["input"]["turn_detection"]
    # Manual turns need a response.create after the commit; server turns answer because
    # session.update asks for it.
    assert turns is None if vad_mode == "manual" else turns["create_response"]


def test_the_declared_traits_match_the_wire_protocol() -> None:
    traits = OpenAIRealtimeAdapter.traits
    session = session_update(ev.SessionSettings("", "marin"))["session"]["audio"]
    assert session["input"]["format"] == {"type": "audio/pcm", "rate": traits.input_format.rate}
    assert session["output"]["format"] == {"type": "audio/pcm", "rate": traits.output_format.rate}
    assert traits.input_format.bytes_per_ms == 48
    assert traits.server_turns and traits.manual_turns and traits.can_truncate
    assert not traits.answers_by_itself and traits.resume == "replay"
    # Sessions built without traits (tests, benchmarks) behave like this adapter.
    assert traits == DEFAULT_TRAITS


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("response_cancel_not_active", "harmless"),
        ("invalid_api_key", "auth"),
        ("conversation_already_has_active_response", "busy"),
        ("input_audio_buffer_commit_empty", "empty_turn"),
        ("session_expired", "expired"),
        ("server_error", "other"),
    ],
)
def test_error_codes_are_decoded_to_kinds_and_kept(code: str, kind: ev.ErrorKind) -> None:
    error = {"type": "invalid_request_error", "code": code, "message": "words"}
    event = decode({"type": "error", "error": error})
    assert event == ev.ServerError(code, "words", kind, "invalid_request_error")


def test_a_failed_response_carries_its_error_code() -> None:
    details = {"type": "failed", "error": {"type": "server_error", "code": "server_error"}}
    response = {"id": "r", "status": "failed", "status_details": details}
    event = decode({"type": "response.done", "response": response})
    assert isinstance(event, ev.ResponseDone) and event.error_code == "server_error"
    quiet = decode({"type": "response.done", "response": {"id": "r", "status": "failed"}})
    assert isinstance(quiet, ev.ResponseDone) and quiet.error_code is None


class RecordingSocket:
    """Just enough of a websocket for the writer: records what is sent, in order."""

    state = State.OPEN

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed = asyncio.Event()

    async def send(self, message: str) -> None:
        self.sent.append(json.loads(message)["type"])

    async def recv(self) -> str:
        await self.closed.wait()
        raise ConnectionClosed(None, None)

    async def close(self) -> None:
        self.closed.set()


async def test_control_overtakes_audio_a_turn_end_follows_it_a_turn_start_drops_it() -> None:
    ws = RecordingSocket()
    connection = OpenAIConnection(ws)  # type: ignore[arg-type]
    pcm = b"\0" * 960
    connection.send(ev.AppendAudio(pcm))
    connection.send(ev.AppendAudio(pcm))
    connection.send(ev.CancelResponse())  # overtakes both appends
    connection.send(ev.EndTurn())  # but a turn's end follows its audio
    connection.send(ev.AppendAudio(pcm))
    connection.send(ev.DiscardTurn())  # drops the queued append
    connection.send(ev.AppendAudio(pcm))
    connection.send(ev.StartTurn())  # so does a new turn
    connection.send(ev.AppendAudio(pcm))
    connection.send(ev.RequestResponse())
    serving = asyncio.create_task(connection.serve(lambda event: None))
    for _ in range(20):
        await asyncio.sleep(0)
    await ws.close()
    with pytest.raises(ConnectionLost):
        await serving
    assert ws.sent == [
        "response.cancel",
        "input_audio_buffer.append",
        "input_audio_buffer.append",
        "input_audio_buffer.commit",
        "input_audio_buffer.clear",
        "input_audio_buffer.clear",
        "response.create",
        "input_audio_buffer.append",
    ]
