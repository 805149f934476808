"""The fake OpenAI Realtime (GA) server, driven by a real websockets client on loopback.

Every server event the fake sends is checked against the ``openai`` package's
``RealtimeServerEvent`` models (no unknown keys), so the fake cannot drift away from
the real protocol without these tests noticing.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Annotated, Any

import numpy as np
import pytest
from openai import AsyncOpenAI
from openai.types.realtime import RealtimeServerEvent
from pydantic import BaseModel, Field, TypeAdapter
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from harkd.testing import (
    ClientEventInvalid,
    EnergyVad,
    FakeRealtimeServer,
    FakeScript,
    ToolRule,
    synthesize_speech,
    validate_client_event,
)

KEY = "sk-test"
RATE = 24_000
SERVER_EVENTS: TypeAdapter[Any] = TypeAdapter(
    Annotated[RealtimeServerEvent, Field(discriminator="type")]
)
# The real session object carries these beside the SDK's request model fields.
SESSION_EXTRAS = {"id", "object", "expires_at"}

MANUAL = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
TRANSCRIBE = {"transcription": {"model": "gpt-4o-mini-transcribe"}}
GET_TIME_TOOL = {
    "type": "function",
    "name": "get_time",
    "description": "Current local time",
    "parameters": {"type": "object", "properties": {}},
}
SET_LIGHT_TOOL = {
    "type": "function",
    "name": "set_light",
    "description": "Switch a light",
    "parameters": {"type": "object", "properties": {"room": {"type": "string"}}},
}


# --------------------------------------------------------------------------- helpers


def _extras(value: Any, path: str = "") -> Iterator[str]:
    if isinstance(value, BaseModel):
        for key in value.model_extra or {}:
            yield f"{path}.{key}"
        for name in type(value).model_fields:
            yield from _extras(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _extras(item, f"{path}[{index}]")


def check_server_event(event: dict[str, Any]) -> None:
    """The event is a valid GA server event with no key the SDK does not know."""
    assert event.get("event_id"), event
    model = SERVER_EVENTS.validate_python(event)
    allowed = {f".session.{key}" for key in SESSION_EXTRAS}
    unknown = [path for path in _extras(model) if path not in allowed]
    assert not unknown, (event["type"], unknown)


def pcm_tone(ms: int, *, amplitude: float = 0.3, freq: float = 220.0) -> bytes:
    t = np.arange(RATE * ms // 1000) / RATE
    return (np.sin(2 * np.pi * freq * t) * amplitude * 32767).astype("<i2").tobytes()


def pcm_silence(ms: int) -> bytes:
    return bytes(RATE * ms // 1000 * 2)


def decode_pcm(events: list[dict[str, Any]]) -> np.ndarray[Any, np.dtype[np.float64]]:
    raw = b"".join(base64.b64decode(ev["delta"]) for ev in events)
    return np.frombuffer(raw, dtype="<i2").astype(np.float64) / 32768.0


class Client:
    """A thin GA client: send events, read (and validate) server events."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event))

    async def recv(self, timeout_s: float = 15.0) -> dict[str, Any]:
        event: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout_s))
        check_server_event(event)
        self.events.append(event)
        return event

    async def until(self, event_type: str, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        """Read until an event of ``event_type``; return everything read (it last)."""
        seen: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout_s):
            while True:
                event = await self.recv()
                seen.append(event)
                if event["type"] == event_type:
                    return seen

    async def update(self, session: dict[str, Any]) -> dict[str, Any]:
        await self.send({"type": "session.update", "session": session})
        events = await self.until("session.updated")
        return events[-1]["session"]  # type: ignore[no-any-return]

    async def append(self, pcm: bytes, chunk_ms: int = 20) -> None:
        step = RATE * chunk_ms // 1000 * 2
        for start in range(0, len(pcm), step):
            chunk = base64.b64encode(pcm[start : start + step]).decode()
            await self.send({"type": "input_audio_buffer.append", "audio": chunk})

    async def say(self, text: str) -> None:
        content = [{"type": "input_text", "text": text}]
        item = {"type": "message", "role": "user", "content": content}
        await self.send({"type": "conversation.item.create", "item": item})
        await self.until("conversation.item.done")


def types_of(events: list[dict[str, Any]]) -> list[str]:
    return [ev["type"] for ev in events]


@pytest.fixture
def script() -> FakeScript:
    return FakeScript()


@pytest.fixture
async def server(script: FakeScript) -> AsyncIterator[FakeRealtimeServer]:
    async with FakeRealtimeServer(script=script, api_keys={KEY}) as srv:
        yield srv


@pytest.fixture
def open_client(
    server: FakeRealtimeServer,
) -> Callable[..., Any]:
    async def opener(key: str = KEY, *, created: bool = True) -> Client:
        ws = await connect(
            f"{server.url}?model=gpt-realtime",
            additional_headers={"Authorization": f"Bearer {key}"},
            max_size=None,
        )
        clients.append(ws)
        client = Client(ws)
        if created:
            first = await client.recv()
            assert first["type"] == "session.created"
        return client

    clients: list[ClientConnection] = []
    return opener


@pytest.fixture
async def client(open_client: Callable[..., Any]) -> AsyncIterator[Client]:
    c: Client = await open_client()
    yield c
    await c.ws.close()


# --------------------------------------------------------------------------- session


async def test_session_created_first_with_ga_defaults(
    server: FakeRealtimeServer, open_client: Callable[..., Any]
) -> None:
    client: Client = await open_client(created=False)
    first = await client.recv()
    assert first["type"] == "session.created"
    session = first["session"]
    assert session["type"] == "realtime" and session["model"] == "gpt-realtime"
    assert session["output_modalities"] == ["audio"]
    audio = session["audio"]
    assert audio["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert audio["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert audio["input"]["turn_detection"]["type"] == "server_vad"
    assert audio["input"]["turn_detection"]["silence_duration_ms"] == 500
    assert audio["output"]["voice"]
    assert server.sessions[0].authorized and server.sessions[0].connected
    await client.ws.close()


async def test_session_update_merges_and_rejects_beta_fields(
    server: FakeRealtimeServer, client: Client
) -> None:
    updated = await client.update(
        {
            "type": "realtime",
            "instructions": "Be brief.",
            "tools": [GET_TIME_TOOL],
            "audio": {"input": {"transcription": {"model": "gpt-4o-mini-transcribe"}}},
        }
    )
    assert updated["instructions"] == "Be brief."
    assert updated["tools"][0]["name"] == "get_time"
    assert updated["audio"]["input"]["transcription"]["model"] == "gpt-4o-mini-transcribe"
    # Untouched parts survive a partial update.
    assert updated["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    assert updated["audio"]["output"]["format"]["rate"] == 24000

    beta = {"type": "realtime", "modalities": ["audio"], "input_audio_format": "pcm16"}
    await client.send({"type": "session.update", "event_id": "evt_beta", "session": beta})
    error = (await client.until("error"))[-1]["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "unknown_parameter"
    assert error["param"] in ("session.modalities", "session.input_audio_format")
    assert error["event_id"] == "evt_beta"
    assert "modalities" not in server.sessions[0].config
    assert server.errors_sent[-1]["error"]["code"] == "unknown_parameter"

    await client.send({"type": "session.update", "session": {"type": "realtime", "temperature": 1}})
    assert (await client.until("error"))[-1]["error"]["param"] == "session.temperature"


async def test_unknown_event_type_is_an_error(client: Client) -> None:
    await client.send({"type": "response.audio.delta", "event_id": "e1"})
    error = (await client.until("error"))[-1]["error"]
    assert error["param"] == "type" and error["event_id"] == "e1"


# --------------------------------------------------------------------------- input audio


async def test_manual_commit_under_100ms_is_rejected(
    server: FakeRealtimeServer, client: Client
) -> None:
    await client.update(MANUAL)
    await client.append(pcm_tone(60))
    await client.send({"type": "input_audio_buffer.commit", "event_id": "c1"})
    error = (await client.until("error"))[-1]["error"]
    assert error["code"] == "input_audio_buffer_commit_empty"
    assert error["event_id"] == "c1"
    assert server.sessions[0].commits == 0
    assert server.sessions[0].audio_ms_received == pytest.approx(60)


async def test_manual_commit_adds_user_item_and_transcript_without_response(
    server: FakeRealtimeServer, script: FakeScript, client: Client
) -> None:
    script.user_transcripts.append("turn on the kitchen lights")
    await client.update({**MANUAL, "audio": {"input": {"turn_detection": None, **TRANSCRIBE}}})
    await client.append(pcm_tone(400))
    await client.send({"type": "input_audio_buffer.commit"})
    events = await client.until("conversation.item.input_audio_transcription.completed")
    kinds = types_of(events)
    assert kinds[:3] == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    item_id = events[0]["item_id"]
    added = events[1]["item"]
    assert added["id"] == item_id and added["role"] == "user"
    assert added["content"][0] == {"type": "input_audio", "transcript": None}
    deltas = [ev["delta"] for ev in events if ev["type"].endswith("transcription.delta")]
    assert "".join(deltas) == "turn on the kitchen lights"
    assert events[-1]["transcript"] == "turn on the kitchen lights"
    assert events[-1]["item_id"] == item_id
    assert server.sessions[0].commits == 1
    # Commit does not create a response.
    await client.send({"type": "input_audio_buffer.clear"})
    assert types_of(await client.until("input_audio_buffer.cleared")) == [
        "input_audio_buffer.cleared"
    ]


async def test_server_vad_turn_produces_a_spoken_answer(
    server: FakeRealtimeServer, script: FakeScript, client: Client
) -> None:
    script.user_transcripts.append("hello there")
    turn = {"type": "server_vad", "prefix_padding_ms": 200}
    await client.update(
        {"type": "realtime", "audio": {"input": {"turn_detection": turn, **TRANSCRIBE}}}
    )
    await client.append(pcm_silence(300) + pcm_tone(600) + pcm_silence(700))
    events = await client.until("response.done")
    kinds = types_of(events)
    for expected in (
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "response.created",
        "response.output_audio.delta",
        "response.output_audio_transcript.delta",
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.done",
    ):
        assert expected in kinds, expected
    assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index("response.created")
    started = events[kinds.index("input_audio_buffer.speech_started")]
    stopped = events[kinds.index("input_audio_buffer.speech_stopped")]
    committed = events[kinds.index("input_audio_buffer.committed")]
    assert 80 <= started["audio_start_ms"] <= 120  # onset at 300 ms minus 200 ms of padding
    assert 1350 <= stopped["audio_end_ms"] <= 1450  # 900 ms of audio + 500 ms of silence
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]

    audio = decode_pcm([ev for ev in events if ev["type"] == "response.output_audio.delta"])
    transcript = events[kinds.index("response.output_audio_transcript.done")]["transcript"]
    assert transcript == "You said: hello there"
    assert len(audio) == pytest.approx(len(transcript) * 60 * 24, rel=0.02)
    assert 0.1 < float(np.sqrt(np.mean(audio**2))) < 0.3
    assert float(np.max(np.abs(audio))) == pytest.approx(0.3, abs=0.03)
    deltas = [
        ev["delta"] for ev in events if ev["type"] == "response.output_audio_transcript.delta"
    ]
    assert "".join(deltas) == transcript
    done = events[-1]["response"]
    assert done["status"] == "completed"
    assert done["usage"]["total_tokens"] > 0
    assert done["output"][0]["content"][0] == {"type": "output_audio", "transcript": transcript}
    session = server.sessions[0]
    assert session.auto_commits == 1 and session.commits == 0
    assert session.speech_segments == [(started["audio_start_ms"], stopped["audio_end_ms"])]
    assert session.config["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 500


async def test_speech_during_a_response_cancels_it_server_side(
    server: FakeRealtimeServer, script: FakeScript, client: Client
) -> None:
    # Real time: 4.2 s of answer still streaming when the speech arrives, however slow
    # the machine (it ends as soon as the cancel lands).
    script.pace = 1.0
    script.reply = "This is a rather long answer that keeps on going for a while longer."
    await client.say("tell me a story")
    await client.send({"type": "response.create"})
    await client.until("response.output_audio.delta")
    await client.append(pcm_tone(200))
    events = await client.until("response.done")
    assert "input_audio_buffer.speech_started" in types_of(events)
    done = events[-1]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"]["reason"] == "turn_detected"
    assert server.sessions[0].server_cancels == 1


# --------------------------------------------------------------------------- tools


@pytest.mark.parametrize(
    "script",
    [FakeScript(tool_rules=[ToolRule(pattern=r"\btime\b", name="get_time", arguments={})])],
)
async def test_function_call_round_trip(server: FakeRealtimeServer, client: Client) -> None:
    await client.update({"type": "realtime", "tools": [GET_TIME_TOOL]})
    await client.say("what time is it")
    await client.send({"type": "response.create"})
    events = await client.until("response.done")
    done = events[-1]["response"]
    assert done["status"] == "completed"
    [call] = done["output"]
    assert call["type"] == "function_call" and call["name"] == "get_time"
    args_done = next(ev for ev in events if ev["type"] == "response.function_call_arguments.done")
    assert args_done["call_id"] == call["call_id"] and json.loads(args_done["arguments"]) == {}
    assert "response.output_audio.delta" not in types_of(events)

    output = {"type": "function_call_output", "call_id": call["call_id"], "output": '{"t":"12:00"}'}
    await client.send({"type": "conversation.item.create", "item": output})
    await client.until("conversation.item.done")
    await client.send({"type": "response.create"})
    events = await client.until("response.done")
    transcript = next(
        ev["transcript"] for ev in events if ev["type"] == "response.output_audio_transcript.done"
    )
    assert transcript == 'get_time returned {"t":"12:00"}'


async def test_function_call_output_for_unknown_call_is_rejected(client: Client) -> None:
    output = {"type": "function_call_output", "call_id": "call_nope", "output": "x"}
    await client.send({"type": "conversation.item.create", "item": output})
    assert (await client.until("error"))[-1]["error"]["param"] == "item.call_id"


@pytest.mark.parametrize(
    "script",
    [
        FakeScript(
            tool_rules=[
                ToolRule(pattern=r"lights", calls=[("set_light", {"room": "kitchen"})] * 2),
                ToolRule(pattern=r"time", name="get_time"),
                ToolRule(pattern=r"lights", name="not_declared"),
            ]
        )
    ],
)
async def test_parallel_function_calls(server: FakeRealtimeServer, client: Client) -> None:
    await client.update({"type": "realtime", "tools": [GET_TIME_TOOL, SET_LIGHT_TOOL]})
    await client.say("lights on and what time is it")
    await client.send({"type": "response.create"})
    done = (await client.until("response.done"))[-1]["response"]
    names = [item["name"] for item in done["output"]]
    assert names == ["set_light", "set_light", "get_time"]  # undeclared tools are not called
    assert len({item["call_id"] for item in done["output"]}) == 3
    for item in done["output"]:
        output = {"type": "function_call_output", "call_id": item["call_id"], "output": "ok"}
        await client.send({"type": "conversation.item.create", "item": output})
        await client.until("conversation.item.done")
    await client.send({"type": "response.create"})
    done = (await client.until("response.done"))[-1]["response"]
    transcript = done["output"][0]["content"][0]["transcript"]
    assert transcript.count("returned ok") == 3


# --------------------------------------------------------------------------- responses


async def test_response_create_while_active_is_rejected_and_cancel_works(
    server: FakeRealtimeServer, script: FakeScript, client: Client
) -> None:
    # 4.2 s of audio streamed in real time: still active for the second create and the
    # cancel on any machine (it ends as soon as the cancel lands).
    script.pace = 1.0
    script.reply = "This is a rather long answer that keeps on going for a while longer."
    await client.say("hello")
    await client.send({"type": "response.create"})
    await client.until("response.output_audio.delta")
    await client.send({"type": "response.create", "event_id": "again"})
    error = (await client.until("error"))[-1]["error"]
    assert error["code"] == "conversation_already_has_active_response"
    assert error["event_id"] == "again"

    await client.send({"type": "response.cancel"})
    events = await client.until("response.done")
    done = events[-1]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"]["reason"] == "client_cancelled"
    assert done["output"][0]["status"] == "incomplete"
    # Nothing of the cancelled response arrives afterwards.
    await client.send({"type": "response.cancel", "event_id": "none"})
    events = await client.until("error")
    assert events[-1]["error"]["code"] == "response_cancel_not_active"
    assert not [ev for ev in events if ev["type"].startswith("response.output")]
    assert server.sessions[0].cancels == 1 and server.sessions[0].response_creates == 2


async def test_text_only_response(client: Client) -> None:
    await client.update({"type": "realtime", "output_modalities": ["text"]})
    await client.say("hi")
    await client.send({"type": "response.create"})
    events = await client.until("response.done")
    kinds = types_of(events)
    assert "response.output_audio.delta" not in kinds
    text = "".join(ev["delta"] for ev in events if ev["type"] == "response.output_text.delta")
    assert text == "You said: hi"
    assert events[-1]["response"]["output"][0]["content"][0]["type"] == "output_text"


async def test_late_transcripts_arrive_after_the_response(
    server: FakeRealtimeServer, script: FakeScript, client: Client
) -> None:
    script.late_transcripts = True
    script.user_transcripts.append("what is the weather")
    await client.update({"type": "realtime", "audio": {"input": TRANSCRIBE}})
    await client.append(pcm_silence(100) + pcm_tone(300) + pcm_silence(600))
    events = await client.until("conversation.item.input_audio_transcription.completed")
    kinds = types_of(events)
    assert kinds.index("response.done") < kinds.index(
        "conversation.item.input_audio_transcription.completed"
    )
    assert events[-1]["transcript"] == "what is the weather"


# --------------------------------------------------------------------------- truncate


async def test_truncate_is_checked_against_audio_sent(
    server: FakeRealtimeServer, script: FakeScript, client: Client
) -> None:
    script.reply = "0123456789"  # 600 ms of audio
    await client.say("hi")
    await client.send({"type": "response.create"})
    done = (await client.until("response.done"))[-1]["response"]
    item_id = done["output"][0]["id"]

    truncate = {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0}
    await client.send({**truncate, "audio_end_ms": 601, "event_id": "too_far"})
    error = (await client.until("error"))[-1]["error"]
    assert error["code"] == "invalid_value" and error["param"] == "audio_end_ms"
    assert error["event_id"] == "too_far"
    await client.send({**truncate, "audio_end_ms": 0})
    assert (await client.until("error"))[-1]["error"]["param"] == "audio_end_ms"

    await client.send({**truncate, "audio_end_ms": 250})
    truncated = (await client.until("conversation.item.truncated"))[-1]
    assert truncated["audio_end_ms"] == 250 and truncated["item_id"] == item_id
    assert server.sessions[0].truncations == [
        {"item_id": item_id, "audio_end_ms": 250, "sent_ms": 600}
    ]
    # The item is now 250 ms long.
    await client.send({**truncate, "audio_end_ms": 300})
    assert (await client.until("error"))[-1]["error"]["code"] == "invalid_value"
    # A user item is not truncatable; an unknown one neither.
    user_id = server.sessions[0].items[0]["id"]
    await client.send({**truncate, "item_id": user_id, "audio_end_ms": 10})
    assert (await client.until("error"))[-1]["error"]["param"] == "item_id"

    await client.send({"type": "conversation.item.delete", "item_id": item_id})
    assert (await client.until("conversation.item.deleted"))[-1]["item_id"] == item_id
    assert server.sessions[0].item(item_id) is None


# --------------------------------------------------------------------------- auth, limits


async def test_bad_key_is_closed_with_3000(
    server: FakeRealtimeServer, open_client: Callable[..., Any]
) -> None:
    client: Client = await open_client("sk-wrong", created=False)
    event = await client.recv()
    assert event["type"] == "error" and event["error"]["code"] == "invalid_api_key"
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 3000 and "invalid_api_key" in closed.value.rcvd.reason

    server.fail_auth_next(1)
    client = await open_client(created=False)
    assert (await client.recv())["error"]["code"] == "invalid_api_key"
    client = await open_client()  # the next one is fine again
    assert [s.authorized for s in server.sessions] == [False, False, True]
    await client.ws.close()


async def test_ephemeral_key_minted_over_http(
    server: FakeRealtimeServer, open_client: Callable[..., Any]
) -> None:
    now = [1_000_000.0]
    server.clock = lambda: now[0]
    api = AsyncOpenAI(api_key=KEY, base_url=server.api_base, max_retries=0)
    secret = await api.realtime.client_secrets.create(
        expires_after={"anchor": "created_at", "seconds": 60},
        session={"type": "realtime", "model": "gpt-realtime", "instructions": "Minted."},
    )
    await api.close()
    assert secret.value.startswith("ek_") and secret.expires_at == 1_000_060
    client: Client = await open_client(created=False)
    await client.ws.close()
    client = await open_client(secret.value, created=False)
    created = await client.recv()
    assert created["type"] == "session.created"
    assert created["session"]["instructions"] == "Minted."
    # Expiry limits new sessions only: the open one lives on.
    now[0] += 61
    await client.say("still here")
    late: Client = await open_client(secret.value, created=False)
    assert (await late.recv())["error"]["code"] == "invalid_api_key"
    await client.ws.close()

    wrong = AsyncOpenAI(api_key="sk-wrong", base_url=server.api_base, max_retries=0)
    with pytest.raises(Exception, match="401"):
        await wrong.realtime.client_secrets.create(session={"type": "realtime"})
    await wrong.close()


async def test_max_session_length_closes_with_1001(script: FakeScript) -> None:
    async with FakeRealtimeServer(script=script, max_session_s=0.3) as server:
        ws = await connect(server.url, max_size=None)
        client = Client(ws)
        assert (await client.recv())["type"] == "session.created"
        error = (await client.until("error"))[-1]["error"]
        assert error["code"] == "session_expired"
        with pytest.raises(ConnectionClosed) as closed:
            await client.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert "maximum duration" in closed.value.rcvd.reason


async def test_drop_all_aborts_without_close_frame(
    server: FakeRealtimeServer, open_client: Callable[..., Any]
) -> None:
    client: Client = await open_client()
    await server.drop_all()
    with pytest.raises(ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd is None  # no close frame: a drop, not a close
    assert not server.sessions[0].connected
    again: Client = await open_client()  # the server itself is still up
    await again.ws.close()


async def test_received_records_every_client_event(
    server: FakeRealtimeServer, client: Client
) -> None:
    await client.say("hi")
    ev = await server.wait_for_client_event("conversation.item.create")
    assert ev["item"]["content"][0]["text"] == "hi"
    assert server.received[-1] == (0, ev)


# --------------------------------------------------------------------------- pure parts


def test_validate_client_event_catches_misspelled_and_beta_keys() -> None:
    validate_client_event({"type": "input_audio_buffer.commit"})
    with pytest.raises(ClientEventInvalid) as bad:
        turn = {"type": "server_vad", "silence_ms": 500}
        session = {"type": "realtime", "audio": {"input": {"turn_detection": turn}}}
        validate_client_event({"type": "session.update", "session": session})
    assert bad.value.code == "unknown_parameter"
    assert bad.value.param == "session.audio.input.turn_detection.silence_ms"
    with pytest.raises(ClientEventInvalid) as missing:
        validate_client_event({"type": "conversation.item.truncate", "item_id": "x"})
    assert missing.value.code == "missing_required_parameter"


def test_energy_vad_finds_a_tone_burst_between_silences() -> None:
    vad = EnergyVad(0.02, silence_ms=500)
    events = vad.feed(pcm_silence(200) + synthesize_speech(400) + pcm_silence(600))
    assert [(ev.kind, ev.ms) for ev in events] == [("start", 200), ("stop", 1100)]


async def test_voice_is_fixed_once_audio_was_sent(client: Client) -> None:
    await client.update({"type": "realtime", "audio": {"output": {"voice": "cedar"}}})
    await client.say("hi")
    await client.send({"type": "response.create"})
    await client.until("response.done")
    voice = {"type": "realtime", "audio": {"output": {"voice": "marin"}}}
    await client.send({"type": "session.update", "session": voice})
    assert (await client.until("error"))[-1]["error"]["code"] == "cannot_update_voice"


async def test_response_instructions_reply(script: FakeScript, client: Client) -> None:
    script.reply_for_instructions = lambda text: text.removeprefix("Say: ")
    params = {"instructions": "Say: your timer is done", "conversation": "none"}
    await client.send({"type": "response.create", "response": params})
    events = await client.until("response.done")
    assert events[-1]["response"]["output"][0]["content"][0]["transcript"] == "your timer is done"
    assert "conversation.item.added" not in types_of(events)  # out of band


async def test_lenient_mode_survives_malformed_events(script: FakeScript) -> None:
    async with FakeRealtimeServer(script=script, strict=False) as server:
        ws = await connect(server.url)
        client = Client(ws)
        await client.recv()
        await client.send({"type": "input_audio_buffer.append"})  # no audio
        assert (await client.until("error"))[-1]["error"]["code"] == "invalid_value"
        await client.say("still alive")
        await ws.close()


def test_cli_prints_the_url_and_stops_on_sigint() -> None:
    import signal
    import subprocess
    import sys

    code = "from harkd.testing.fake_server import main; raise SystemExit(main(['--port', '0']))"
    command = [sys.executable, "-c", code]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("fake realtime server: ws://127.0.0.1:")
            assert line.rstrip().endswith("/v1/realtime")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


async def test_a_failing_script_fails_the_response_not_the_session(
    script: FakeScript, client: Client
) -> None:
    def broken(text: str) -> str:
        raise RuntimeError("script bug")

    script.reply = broken
    await client.say("hi")
    await client.send({"type": "response.create"})
    done = (await client.until("response.done"))[-1]["response"]
    assert done["status"] == "failed"
    script.reply = "fine again"
    await client.send({"type": "response.create"})
    assert (await client.until("response.done"))[-1]["response"]["status"] == "completed"
