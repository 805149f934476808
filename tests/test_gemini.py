"""Gemini Live end to end: the real client and adapter against the fake Gemini Live
server over real websockets, with real espeak speech from a paced WAV microphone.

What a user would notice: a spoken question is heard and answered at 24 kHz, a typed
one can use a tool, speaking over the answer silences it at once, the provider's
`goAway` and a dropped connection go by without the conversation being lost or
replayed, a bad key is reported without hammering the service, and push-to-talk turns
are the provider's activities. Every message the daemon sends is checked against
`google-genai`'s own `LiveClientMessage`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from hypothesis import given
from hypothesis import strategies as st

from e2e import Running, until
from harkd import events as ev
from harkd.adapters.base import ProtocolError
from harkd.adapters.gemini import gemini_live
from harkd.adapters.gemini_wire import (
    Decoder,
    content_turn,
    context_update,
    function_response,
    parse,
    setup_message,
)
from harkd.audio.wav import WavInput, WavOutput
from harkd.backoff import Backoff
from harkd.client import RealtimeClient
from harkd.config import ConfigError, parse_config
from harkd.logsetup import redact
from harkd.messages import (
    MessageFinalized,
    RealtimeMode,
    RealtimeStatus,
    RealtimeToken,
    ToolCallPart,
)
from harkd.testing import FakeScript, ToolRule, gemini_validation
from harkd.testing.gemini_fake import CLOSE_INVALID, GeminiFakeServer
from harkd.testing.gemini_validation import ClientMessageInvalid, validate_client_message
from harkd.tokens import TokenSource, static_token
from harkd.tools import Tool, ToolSpec
from harkd_process import harkd_env, run_harkd
from mosquitto import free_port
from speech_fixtures import len_ms, silence, speech_pcm, write_wav

pytestmark = pytest.mark.timeout(60)

KEY = "AIza-test-gemini-0123456789"
SENTENCE = "turn on the kitchen lights"
ANSWER = "The kitchen lights are on now."
MS_PER_CHAR = 40.0
LONG_ANSWER = (
    "Sure. I am turning on the kitchen lights now, and while I am at it let me tell you "
    "all about the weather for the rest of the week."
)
OUTPUT_BYTES_PER_MS = 48  # PCM16 mono at 24 kHz
INPUT_BYTES_PER_MS = 32  # PCM16 mono at 16 kHz


def make_client(server: GeminiFakeServer, **options: Any) -> RealtimeClient:
    """A client of the fake with test defaults (fast reconnects); `options` win."""
    defaults: dict[str, Any] = {
        "get_token": static_token(KEY),
        "adapter": gemini_live(url=server.url),
        "instructions": "Be brief.",
        "voice": "Puck",
        "transcription_model": "gemini",
        "reconnect": Backoff(0.05, 0.2),
    }
    return RealtimeClient(**{**defaults, **options})


def finals(client: RealtimeClient) -> list[MessageFinalized]:
    found: list[MessageFinalized] = []
    client.on_event(lambda e: found.append(e) if isinstance(e, MessageFinalized) else None)
    return found


def assert_nothing_refused(server: GeminiFakeServer) -> None:
    """The fake validated every message against `LiveClientMessage` as it came; none
    was refused (a refusal closes the connection with 1007)."""
    refused = [(s.index, s.close_reason) for s in server.sessions if s.close_code == CLOSE_INVALID]
    assert refused == []
    assert server.received, "nothing was sent"
    for _, message in server.received:
        validate_client_message(message)


def answer_wav_ms(path: Path) -> float:
    import wave

    with wave.open(str(path), "rb") as wav:
        assert wav.getframerate() == 24000
        return wav.getnframes() / 24


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.5 s of silence, the sentence, 2 s of silence, 16 kHz."""
    path = tmp_path_factory.mktemp("gemini") / "turn.wav"
    write_wav(path, silence(500) + speech_pcm(SENTENCE) + silence(2000), 16000)
    return path


@pytest.fixture
async def server() -> AsyncIterator[GeminiFakeServer]:
    async with GeminiFakeServer(api_keys={KEY}) as fake:
        yield fake


# --- voice -------------------------------------------------------------------------


async def test_a_spoken_turn_is_heard_answered_and_played(speech_wav: Path, tmp_path: Path) -> None:
    script = FakeScript(user_transcripts=[SENTENCE], reply=ANSWER, audio_ms_per_char=MS_PER_CHAR)
    out_path = tmp_path / "answer.wav"
    modes: list[RealtimeMode] = []
    async with GeminiFakeServer(script=script, api_keys={KEY}) as server:
        client = make_client(
            server,
            audio_input=WavInput(speech_wav),
            audio_output=WavOutput(out_path),
            on_mode_change=modes.append,
        )
        done = finals(client)
        async with Running(client):
            await until(lambda: any(m.message.role == "assistant" for m in done), what="the answer")
            session = server.sessions[0]
            setup = session.setup
            assert setup["model"] == "models/gemini-3.8-live"
            assert setup["realtimeInputConfig"]["automaticActivityDetection"] == {"disabled": False}
            assert setup["contextWindowCompression"] == {"slidingWindow": {}}
            assert setup["sessionResumption"] == {}
            voice = setup["generationConfig"]["speechConfig"]["voiceConfig"]
            assert voice["prebuiltVoiceConfig"]["voiceName"] == "Puck"

            # The server heard one utterance of about the sentence's length, at 16 kHz.
            [(start, end)] = session.speech_segments
            speech_ms = len_ms(speech_pcm(SENTENCE))
            assert abs((end - start) - (speech_ms + 500)) < 150, (start, end, speech_ms)
            chunks = [
                m["realtimeInput"]["audio"]
                for m in server.messages("realtimeInput")
                if "audio" in m["realtimeInput"]
            ]
            assert {c["mimeType"] for c in chunks} == {"audio/pcm;rate=16000"}
            sizes = [len(base64.b64decode(c["data"])) / INPUT_BYTES_PER_MS for c in chunks]
            assert abs(sum(sizes) / len(sizes) - 20) < 1  # 20 ms capture periods

            user, assistant = client.messages
            assert (user.role, user.text) == ("user", SENTENCE)
            assert (assistant.role, assistant.text) == ("assistant", ANSWER)
            assert not assistant.interrupted
            assert assistant.duration_ms == len(ANSWER) * MS_PER_CHAR
            assert [m.message.id for m in done] == [user.id, assistant.id]
            assert RealtimeMode.SPEAKING in modes
            assert_nothing_refused(server)
    assert abs(answer_wav_ms(out_path) - len(ANSWER) * MS_PER_CHAR) <= 20


# --- text and tools ----------------------------------------------------------------


def clock_tool(calls: list[dict[str, Any]]) -> Tool:
    async def handler(args: dict[str, Any], call: Any) -> dict[str, str]:
        calls.append(args)
        return {"time": "07:30", "zone": args["zone"]}

    return Tool(
        "get_time",
        "The current time in a time zone.",
        {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
            "additionalProperties": False,
        },
        handler,
    )


async def test_a_typed_question_uses_a_tool_and_the_answer_says_its_result(
    tmp_path: Path,
) -> None:
    script = FakeScript(
        tool_rules=[ToolRule(r"\btime\b", "get_time", {"zone": "Europe/Berlin"})],
        tool_reply=lambda outputs: f"It is {json.loads(outputs[0][1])['time']}.",
    )
    ran: list[dict[str, Any]] = []
    async with GeminiFakeServer(script=script, api_keys={KEY}) as server:
        client = make_client(
            server, tools=[clock_tool(ran)], audio_output=WavOutput(tmp_path / "o.wav")
        )
        done = finals(client)
        async with Running(client):
            client.send_text("what time is it in Berlin?")
            await until(
                lambda: any(m.message.text == "It is 07:30." for m in done), what="the answer"
            )
            session = server.sessions[0]
            [declaration] = session.setup["tools"][0]["functionDeclarations"]
            assert declaration["behavior"] == "BLOCKING"
            assert declaration["parametersJsonSchema"]["required"] == ["zone"]

            # One clientContent: the typed turn, completed at once.
            [content] = [m["clientContent"] for m in server.messages("clientContent")]
            assert content == {
                "turns": [{"role": "user", "parts": [{"text": "what time is it in Berlin?"}]}],
                "turnComplete": True,
            }
            # The call ran once and its result went back with the call's id and name.
            assert ran == [{"zone": "Europe/Berlin"}]
            [call] = session.tool_calls
            [response] = session.tool_responses
            assert (response["id"], response["name"]) == (call["id"], "get_time")
            assert response["response"] == {"output": {"time": "07:30", "zone": "Europe/Berlin"}}

            user, tool_call, answer = client.messages
            assert (user.role, user.text) == ("user", "what time is it in Berlin?")
            part = tool_call.parts[0]  # then its result
            assert part.name == "get_time" and json.loads(part.output or "") == {
                "time": "07:30",
                "zone": "Europe/Berlin",
            }
            assert (answer.role, answer.text) == ("assistant", "It is 07:30.")
            assert answer.duration_ms is not None and answer.duration_ms > 0
            assert_nothing_refused(server)


async def test_tools_given_during_a_session_are_usable_at_once(tmp_path: Path) -> None:
    script = FakeScript(
        tool_rules=[ToolRule(r"\btime\b", "get_time", {"zone": "UTC"})],
        tool_reply=lambda outputs: f"It is {json.loads(outputs[0][1])['time']}.",
    )
    ran: list[dict[str, Any]] = []
    async with GeminiFakeServer(script=script, api_keys={KEY}) as server:
        client = make_client(server, audio_output=WavOutput(tmp_path / "o.wav"))
        done = finals(client)
        async with Running(client):
            assert "tools" not in server.sessions[0].setup
            client.update_settings(instructions="Be terse.", tools=[clock_tool(ran)])
            client.send_text("what time is it?")
            await until(
                lambda: any(m.message.text == "It is 07:30." for m in done), what="the answer"
            )
            [update] = [m["contextUpdate"] for m in server.messages("contextUpdate")]
            assert update["systemInstruction"] == {"parts": [{"text": "Be terse."}]}
            [declaration] = update["tools"]["tools"][0]["functionDeclarations"]
            assert declaration["name"] == "get_time"
            assert ran == [{"zone": "UTC"}]
            assert_nothing_refused(server)


def tool_finished(done: list[MessageFinalized]) -> bool:
    """Whether a tool call's message was finalized with its output."""
    return any(
        isinstance(part, ToolCallPart) and part.output is not None
        for m in done
        for part in m.message.parts
    )


async def test_a_call_the_server_cancels_gets_no_result(tmp_path: Path) -> None:
    """A new turn while a tool runs: Gemini takes the call back (`toolCallCancellation`),
    so its late result is not sent (the service would refuse an unknown call id)."""
    script = FakeScript(tool_rules=[ToolRule(r"\btime\b", "get_time", {"zone": "UTC"})])
    release = asyncio.Event()

    async def slow(args: dict[str, Any], call: Any) -> dict[str, str]:
        await release.wait()
        return {"time": "07:30"}

    tool = Tool("get_time", "Time.", {"type": "object", "properties": {}}, slow)
    async with GeminiFakeServer(script=script, api_keys={KEY}) as server:
        client = make_client(server, tools=[tool], audio_output=WavOutput(tmp_path / "o.wav"))
        done = finals(client)
        async with Running(client):
            client.send_text("what time is it?")
            session = server.sessions[0]
            await until(lambda: len(session.tool_calls) == 1, what="the call")
            await ask(client, done, "never mind")
            assert session.cancelled_calls == [session.tool_calls[0]["id"]]
            release.set()
            await until(lambda: tool_finished(done), what="the tool's result recorded")
            client.send_text("thanks")  # the connection is still fine after it
            await until(lambda: any(m.message.text == "You said: thanks" for m in done))
            assert session.tool_responses == []
            assert_nothing_refused(server)


# --- barge-in ----------------------------------------------------------------------


async def test_speaking_over_the_answer_flushes_playback_and_marks_it_interrupted(
    tmp_path: Path,
) -> None:
    """barge_in on (an echo-cancelled microphone): the server hears the user over the
    answer and says `interrupted`; the speaker stops at once, the answer is marked
    interrupted at what was heard, and the user's words are the next turn."""
    script = FakeScript(
        user_transcripts=[SENTENCE, "stop"],
        reply=lambda text: "OK." if text == "stop" else LONG_ANSWER,
        audio_ms_per_char=50,
        pace=1.0,
    )
    first = speech_pcm(SENTENCE)
    mic = tmp_path / "mic.wav"
    write_wav(mic, silence(500) + first + silence(2500) + speech_pcm("stop") + silence(2500), 16000)
    output = WavOutput(tmp_path / "o.wav")
    async with GeminiFakeServer(script=script, api_keys={KEY}) as server:
        client = make_client(server, audio_input=WavInput(mic), audio_output=output, barge_in=True)
        done = finals(client)
        async with Running(client):
            await until(lambda: client.mode is RealtimeMode.SPEAKING, what="the answer")
            answer_id = client.messages[-1].id
            await until(lambda: server.sessions[0].interruptions == 1, what="the barge-in")
            await until(lambda: not output.is_playing, what="the speaker flushed")
            await until(
                lambda: any(m.message.text == "OK." for m in done), what="the second answer"
            )
            session = server.sessions[0]
            assert session.setup["realtimeInputConfig"]["activityHandling"] == (
                "START_OF_ACTIVITY_INTERRUPTS"
            )
            cut = next(m.message for m in done if m.message.id == answer_id)
            assert cut.interrupted
            full_ms = len(LONG_ANSWER) * 50
            assert cut.duration_ms is not None and 0 < cut.duration_ms < full_ms
            # What the fake model keeps: what it had sent, marked interrupted.
            model_turns = [t for t in session.turns if t.role == "model"]
            assert model_turns[0].interrupted and LONG_ANSWER.startswith(model_turns[0].text)
            assert [(m.role, m.text) for m in client.messages][-2:] == [
                ("user", "stop"),
                ("assistant", "OK."),
            ]
            assert_nothing_refused(server)


async def test_a_typed_turn_over_the_answer_is_answered_at_once(tmp_path: Path) -> None:
    """Gemini has no cancel: harkd ends the answer itself, and the completed text turn
    interrupts the server's generation instead of waiting for it to play out."""
    script = FakeScript(
        reply=lambda text: "OK." if text == "stop" else LONG_ANSWER,
        audio_ms_per_char=50,
        pace=1.0,
    )
    output = WavOutput(tmp_path / "o.wav")
    async with GeminiFakeServer(script=script, api_keys={KEY}) as server:
        client = make_client(server, audio_output=output)
        done = finals(client)
        async with Running(client):
            client.send_text("tell me about the weather")
            await until(lambda: client.mode is RealtimeMode.SPEAKING, what="the answer")
            answer_id = client.messages[-1].id
            await until(lambda: output.played_ms(answer_id) >= 300, what="some of it heard")
            client.send_text("stop")
            await until(lambda: any(m.message.text == "OK." for m in done), what="the answer")
            session = server.sessions[0]
            assert session.interruptions == 1  # its generation was still running
            [first, second] = [m["clientContent"] for m in server.messages("clientContent")]
            assert second == {
                "turns": [{"role": "user", "parts": [{"text": "stop"}]}],
                "turnComplete": True,
            }
            cut = next(m.message for m in done if m.message.id == answer_id)
            assert cut.interrupted and cut.duration_ms is not None
            assert cut.duration_ms < len(LONG_ANSWER) * 50
            assert [m.text for m in client.messages][-2:] == ["stop", "OK."]
            assert_nothing_refused(server)


# --- resumption --------------------------------------------------------------------


async def ask(client: RealtimeClient, done: list[MessageFinalized], text: str) -> None:
    """Type `text` and wait for its answer to be heard."""
    client.send_text(text)
    await until(
        lambda: any(m.message.text == f"You said: {text}" for m in done), what=f"answer: {text}"
    )


async def test_go_away_moves_to_a_resumed_session_that_remembers(tmp_path: Path) -> None:
    async with GeminiFakeServer(api_keys={KEY}) as server:
        # A slow backoff proves the move does not wait for it.
        client = make_client(
            server, audio_output=WavOutput(tmp_path / "o.wav"), reconnect=Backoff(30, 60)
        )
        done = finals(client)
        statuses: list[RealtimeStatus] = []
        client.on_state_change(lambda s: statuses.append(s.status))
        async with Running(client):
            await ask(client, done, "remember the number seven")
            first = server.sessions[0]
            await until(lambda: len(first.handles) >= 2, what="a handle after the turn")
            handle = first.handles[-1]
            await server.go_away(time_left_s=10.0)
            second = await server.wait_for_sessions(2)
            await until(lambda: client.status is RealtimeStatus.CONNECTED and second.setup != {})
            # The move happened at once, long before the server would have closed.
            assert not first.connected and first.close_code == 1000
            assert second.setup["sessionResumption"] == {"handle": handle}
            assert second.resumed_from == handle
            assert [t.text for t in second.history_at_start][:2] == [
                "remember the number seven",
                "You said: remember the number seven",
            ]
            # Nothing replayed: the model still has the conversation.
            assert server.messages("clientContent", index=1) == []
            await ask(client, done, "what was the number")
            assert [t.text for t in second.turns][-2:] == [
                "what was the number",
                "You said: what was the number",
            ]
            assert [m.text for m in client.messages] == [
                "remember the number seven",
                "You said: remember the number seven",
                "what was the number",
                "You said: what was the number",
            ]
            assert second.audio_ms_sent > 0
            assert RealtimeStatus.ERROR not in statuses
            assert_nothing_refused(server)


async def test_go_away_during_an_answer_lets_it_finish_then_resumes(tmp_path: Path) -> None:
    """The provider warns in time: the answer plays to its end, then the session moves,
    resumed from a handle that has that answer in it."""
    script = FakeScript(reply=LONG_ANSWER, audio_ms_per_char=20, pace=1.0)
    async with GeminiFakeServer(script=script, api_keys={KEY}) as server:
        client = make_client(server, audio_output=WavOutput(tmp_path / "o.wav"))
        done = finals(client)
        async with Running(client):
            client.send_text("tell me everything")
            await until(lambda: client.mode is RealtimeMode.SPEAKING, what="the answer")
            await server.go_away(time_left_s=30.0)
            await until(lambda: any(m.message.text == LONG_ANSWER for m in done), what="heard")
            second = await server.wait_for_sessions(2)
            await until(lambda: second.setup != {}, what="the move")
            answer = next(m.message for m in done if m.message.text == LONG_ANSWER)
            assert not answer.interrupted
            assert answer.duration_ms == len(LONG_ANSWER) * 20
            assert [t.text for t in second.history_at_start] == ["tell me everything", LONG_ANSWER]
            assert server.messages("clientContent", index=1) == []
            assert_nothing_refused(server)


async def test_the_connection_limit_goes_by_unnoticed(tmp_path: Path) -> None:
    """The service's own limit: `goAway` a while after each connection opened."""
    async with GeminiFakeServer(api_keys={KEY}, max_connection_s=0.5) as server:
        client = make_client(
            server, audio_output=WavOutput(tmp_path / "o.wav"), reconnect=Backoff(30, 60)
        )
        done = finals(client)
        async with Running(client):
            await ask(client, done, "first")
            await until(lambda: len(server.sessions) >= 3, what="two moves")
            await until(lambda: client.status is RealtimeStatus.CONNECTED)
            await ask(client, done, "second")
            assert all(s.went_away for s in server.sessions[:2])
            assert all(s.resumed_from is not None for s in server.sessions[1:])
            assert server.messages("clientContent") == [
                {"clientContent": {"turns": [turn(text)], "turnComplete": True}}
                for text in ("first", "second")
            ]  # asked once each, nothing replayed
            assert [m.text for m in client.messages] == [
                "first",
                "You said: first",
                "second",
                "You said: second",
            ]


def turn(text: str) -> dict[str, Any]:
    return {"role": "user", "parts": [{"text": text}]}


async def test_a_dropped_connection_is_resumed_without_replay(tmp_path: Path) -> None:
    async with GeminiFakeServer(api_keys={KEY}) as server:
        client = make_client(server, audio_output=WavOutput(tmp_path / "o.wav"))
        done = finals(client)
        async with Running(client):
            await ask(client, done, "the code is four two")
            first = server.sessions[0]
            await until(lambda: len(first.handles) >= 2, what="a handle after the turn")
            handle = first.handles[-1]
            await server.drop_all()
            second = await server.wait_for_sessions(2)
            await until(lambda: client.status is RealtimeStatus.CONNECTED and second.setup != {})
            assert second.resumed_from == handle
            assert server.messages("clientContent", index=1) == []
            await ask(client, done, "say the code")
            assert "the code is four two" in [t.text for t in second.turns]
            assert_nothing_refused(server)


async def test_a_refused_handle_starts_a_fresh_session_with_context_replayed(
    tmp_path: Path,
) -> None:
    async with GeminiFakeServer(api_keys={KEY}) as server:
        client = make_client(server, audio_output=WavOutput(tmp_path / "o.wav"))
        done = finals(client)
        async with Running(client):
            await ask(client, done, "my name is Ada")
            first = server.sessions[0]
            await until(lambda: len(first.handles) >= 2, what="a handle after the turn")
            server.handles.clear()  # expired: the service forgot the session
            await server.drop_all()
            await until(
                lambda: any(s.setup and s.resumed_from is None for s in server.sessions[1:]),
                what="a fresh session",
            )
            fresh = next(s for s in server.sessions[1:] if s.setup and s.resumed_from is None)
            await until(lambda: len(server.messages("clientContent", index=fresh.index)) == 1)
            [replay] = server.messages("clientContent", index=fresh.index)
            assert replay["clientContent"]["turnComplete"] is False  # context, no answer
            assert [t["role"] for t in replay["clientContent"]["turns"]] == ["user", "model"]
            assert_nothing_refused_but_the_handle(server)


def assert_nothing_refused_but_the_handle(server: GeminiFakeServer) -> None:
    for session in server.sessions:
        assert session.close_code != CLOSE_INVALID, session.close_reason
    for _, message in server.received:
        validate_client_message(message)


# --- failures ----------------------------------------------------------------------


def counted(label: str, key: str, attempts: list[str]) -> TokenSource:
    inner = static_token(key)

    async def get_token() -> RealtimeToken:
        attempts.append(label)
        return await inner()

    return get_token


async def test_a_bad_key_is_an_error_without_a_hot_loop(server: GeminiFakeServer) -> None:
    attempts: list[str] = []
    refused = make_client(server, get_token=counted("refused", "AIza-wrong", attempts))
    # A yardstick instead of a sleep: a client on the same backoff whose connection
    # fails for another reason. Its retries show the refused one had time to retry.
    unreachable = make_client(
        server,
        get_token=counted("unreachable", KEY, attempts),
        adapter=gemini_live(url=f"ws://127.0.0.1:{free_port()}/ws"),
    )
    tasks = [asyncio.create_task(c.run()) for c in (refused, unreachable)]
    try:
        await until(lambda: refused.status is RealtimeStatus.ERROR, what="the error")
        await until(lambda: attempts.count("unreachable") >= 6, what="6 attempts elsewhere")
        assert attempts.count("refused") == 1  # no hot loop
        assert refused.error is not None and refused.error.code == "invalid_api_key"
        assert "API key not valid" in refused.error.message
        [session] = server.sessions
        assert session.close_code == CLOSE_INVALID and not session.authorized
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_a_message_field_harkd_does_not_know_is_ignored(
    server: GeminiFakeServer, tmp_path: Path
) -> None:
    """The protocol grows: a new server field is logged and skipped, nothing breaks."""
    client = make_client(server, audio_output=WavOutput(tmp_path / "o.wav"))
    done = finals(client)
    async with Running(client):
        await server.send_message({"interactionStatus": {"state": "ACTIVE"}})
        await ask(client, done, "still there?")
        assert len(server.sessions) == 1 and client.status is RealtimeStatus.CONNECTED


async def test_garbage_from_the_server_is_a_lost_connection_that_resumes(
    server: GeminiFakeServer, tmp_path: Path
) -> None:
    client = make_client(server, audio_output=WavOutput(tmp_path / "o.wav"))
    async with Running(client):
        first = server.sessions[0]
        await until(lambda: len(first.handles) >= 1, what="the first handle")
        await server.send_raw('{"serverContent": {"modelTurn": {"parts": 5}}}')
        second = await server.wait_for_sessions(2)
        await until(lambda: second.setup != {}, what="the second setup")
        assert second.resumed_from == first.handles[-1]
        await until(lambda: client.status is RealtimeStatus.CONNECTED)


# --- manual turns ------------------------------------------------------------------


async def test_push_to_talk_turns_are_activities(tmp_path: Path) -> None:
    """Manual turns: activityStart, the turn's audio, activityEnd, and the model
    answers by itself. A tap too short to be a turn sends no activityEnd: its activity
    stays open and the next turn continues it."""
    script = FakeScript(user_transcripts=[SENTENCE], reply=ANSWER)
    mic = tmp_path / "mic.wav"
    write_wav(mic, silence(300) + speech_pcm(SENTENCE) + silence(4000), 16000)
    async with GeminiFakeServer(script=script, api_keys={KEY}) as server:
        client = make_client(
            server,
            vad_mode="manual",
            audio_input=WavInput(mic),
            audio_output=WavOutput(tmp_path / "o.wav"),
        )
        done = finals(client)
        async with Running(client):
            session = server.sessions[0]
            disabled = session.setup["realtimeInputConfig"]["automaticActivityDetection"]
            assert disabled == {"disabled": True}
            client.start_listening()
            client.stop_listening()  # a tap: under 100 ms of audio
            client.start_listening()
            held = len(speech_pcm(SENTENCE)) // INPUT_BYTES_PER_MS + 600
            await until(lambda: session.audio_ms_received >= held, what="the sentence")
            client.stop_listening()
            await until(lambda: any(m.message.role == "assistant" for m in done), what="the answer")
            kinds = [
                next(iter(m["realtimeInput"]))
                for m in server.messages("realtimeInput")
                if "audio" not in m["realtimeInput"]
            ]
            assert kinds == ["activityStart", "activityEnd"]
            assert session.activities == 1
            # The activity's audio sits between its start and its end.
            realtime = [m["realtimeInput"] for m in server.messages("realtimeInput")]
            start = next(i for i, m in enumerate(realtime) if "activityStart" in m)
            end = next(i for i, m in enumerate(realtime) if "activityEnd" in m)
            assert all("audio" in m for m in realtime[start + 1 : end])
            assert "audio" not in str(realtime[end + 1 :])
            assert [(m.role, m.text) for m in client.messages] == [
                ("user", SENTENCE),
                ("assistant", ANSWER),
            ]
            assert_nothing_refused(server)


# --- the wire mapping, message by message ------------------------------------------

SETTINGS = ev.SessionSettings(
    "Be brief.",
    "Kore",
    tools=(ToolSpec("get_time", "Time.", {"type": "object", "properties": {}}),),
    transcription_model="x",
)


@pytest.mark.parametrize("vad_mode", ["server", "manual"])
def test_every_message_the_adapter_writes_validates(vad_mode: ev.VadMode) -> None:
    settings = ev.SessionSettings(
        SETTINGS.instructions,
        SETTINGS.voice,
        vad_mode,
        SETTINGS.transcription_model,
        SETTINGS.tools,
    )
    for message in (
        setup_message("gemini-3.8-live", settings),
        setup_message("models/gemini-3.8-live", settings, "handle-1"),
        setup_message("m", ev.SessionSettings("x", "Puck", output_modalities=("text",))),
        context_update(settings),
        {"clientContent": {"turns": [content_turn(ev.CreateMessage("i", "user", "hi"))]}},
        {
            "clientContent": {
                "turns": [
                    content_turn(
                        ev.CreateMessage("i", "user", image_url="data:image/png;base64,iVBORw0=")
                    )
                ]
            }
        },
        {"toolResponse": {"functionResponses": [function_response(ev.ToolResult("c", "f", "1"))]}},
    ):
        validate_client_message(json.dumps(message))


def test_the_validator_refuses_what_the_service_refuses() -> None:
    with pytest.raises(ClientMessageInvalid, match="setup.sessionResumptionX"):
        validate_client_message({"setup": {"model": "models/m", "sessionResumptionX": {}}})
    with pytest.raises(ClientMessageInvalid, match="exactly one"):
        validate_client_message({"setup": {}, "clientContent": {}})
    with pytest.raises(ClientMessageInvalid, match="base64"):
        validate_client_message({"realtimeInput": {"audio": {"data": "!!"}}})
    with pytest.raises(ClientMessageInvalid, match="not a valid ActivityHandling"):
        bad = {"activityHandling": "SOMETIMES"}
        validate_client_message({"setup": {"model": "models/m", "realtimeInputConfig": bad}})


def test_without_the_sdk_only_the_shape_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """`harkd demo` needs no test dependency: its fake checks what it can."""
    assert gemini_validation.genai_available()  # the test suite validates fully
    monkeypatch.setattr(gemini_validation, "genai_available", lambda: False)
    validate_client_message({"setup": {"model": "models/m", "voice": "Puck"}})
    with pytest.raises(ClientMessageInvalid, match="exactly one"):
        validate_client_message({"setup": {}, "toolResponse": {}})


async def test_the_fake_closes_on_an_unknown_field_like_the_service(
    server: GeminiFakeServer,
) -> None:
    async with websockets.connect(server.url, additional_headers={"x-goog-api-key": KEY}) as ws:
        await ws.send(json.dumps({"setup": {"model": "models/m", "voice": "Puck"}}))
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CLOSE_INVALID
    assert "setup.voice" in closed.value.rcvd.reason


def test_tool_results_are_outputs_and_errors_stay_errors() -> None:
    assert function_response(ev.ToolResult("c1", "f", '{"a": 1}')) == {
        "id": "c1",
        "name": "f",
        "response": {"output": {"a": 1}},
    }
    error = function_response(ev.ToolResult("c2", "f", '{"error": "no such timer"}'))
    assert error["response"] == {"error": "no such timer"}


def test_one_message_with_several_parts_decodes_in_order() -> None:
    pcm = b"\x01\x00" * 480
    decoder = Decoder()
    events = decoder.decode(
        {
            "serverContent": {
                "inputTranscription": {"text": "hello", "finished": True},
                "modelTurn": {
                    "parts": [
                        {"text": "thinking...", "thought": True},
                        {
                            "inlineData": {
                                "mimeType": "audio/pcm;rate=24000",
                                "data": base64.b64encode(pcm).decode(),
                            }
                        },
                    ]
                },
                "outputTranscription": {"text": "Hi"},
                "generationComplete": True,
                "turnComplete": True,
            },
            "usageMetadata": {"totalTokenCount": 9},
        }
    )
    names = [type(e).__name__ for e in events]
    assert names == [
        "InputCommitted",
        "UserTranscriptDelta",
        "UserTranscriptDone",
        "ResponseCreated",
        "OutputItemAdded",
        "AudioDelta",
        "AssistantTranscriptDelta",
        "AssistantTranscriptDone",
        "AudioDone",
        "ResponseDone",
    ]
    audio = events[5]
    assert isinstance(audio, ev.AudioDelta) and audio.pcm == pcm
    done = events[-1]
    assert isinstance(done, ev.ResponseDone) and done.usage == {"totalTokenCount": 9}


def test_interrupted_is_a_server_barge_in_and_cancels_the_answer() -> None:
    decoder = Decoder()
    opened = decoder.decode({"serverContent": {"outputTranscription": {"text": "Sure"}}})
    response_id = next(e for e in opened if isinstance(e, ev.ResponseCreated)).response_id
    events = decoder.decode({"serverContent": {"interrupted": True}})
    assert [type(e) for e in events] == [ev.SpeechStarted, ev.ResponseDone]
    done = events[1]
    assert isinstance(done, ev.ResponseDone)
    assert (done.response_id, done.status) == (response_id, "cancelled")


def test_a_cancelled_answer_ends_at_once_and_its_rest_is_dropped() -> None:
    decoder = Decoder()
    decoder.decode({"serverContent": {"outputTranscription": {"text": "Sure"}}})
    [done] = decoder.cancel()
    assert isinstance(done, ev.ResponseDone) and done.status == "cancelled"
    late = {"serverContent": {"outputTranscription": {"text": " thing"}}}
    assert decoder.decode(late) == []
    # Our own next turn interrupted it: no barge-in of the user's, nothing more to drop.
    assert decoder.decode({"serverContent": {"interrupted": True}}) == []
    fresh = decoder.decode({"serverContent": {"outputTranscription": {"text": "OK"}}})
    assert [type(e) for e in fresh] == [
        ev.ResponseCreated,
        ev.OutputItemAdded,
        ev.AssistantTranscriptDelta,
    ]


def test_a_tool_call_ends_its_response_with_the_calls() -> None:
    decoder = Decoder()
    events = decoder.decode(
        {"toolCall": {"functionCalls": [{"id": "fc1", "name": "get_time", "args": {"z": 1}}]}}
    )
    done = events[-1]
    assert isinstance(done, ev.ResponseDone)
    [call] = done.function_calls
    assert (call.call_id, call.name, json.loads(call.arguments)) == ("fc1", "get_time", {"z": 1})
    assert decoder.decode({"toolCallCancellation": {"ids": ["fc1"]}}) == [
        ev.Ignored("toolCallCancellation")
    ]
    assert "fc1" in decoder.cancelled_calls


def test_resumption_messages() -> None:
    decoder = Decoder()
    update = {"sessionResumptionUpdate": {"newHandle": "h2", "resumable": True}}
    assert decoder.decode(update) == [ev.ResumeHandle("h2")]
    busy = {"sessionResumptionUpdate": {"resumable": False}}
    assert decoder.decode(busy) == [ev.Ignored("sessionResumptionUpdate")]
    assert decoder.decode({"goAway": {"timeLeft": "9.5s"}}) == [ev.GoingAway(9500)]
    with pytest.raises(ProtocolError):
        decoder.decode({"goAway": {"timeLeft": "soon"}})


@pytest.mark.parametrize("data", ["not base64!", "\x80"])
def test_audio_that_is_not_base64_is_a_protocol_error(data: str) -> None:
    blob = {"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": data}}
    with pytest.raises(ProtocolError, match="malformed audio data"):
        Decoder().decode({"serverContent": {"modelTurn": {"parts": [blob]}}})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)
KNOWN = [
    "setupComplete", "serverContent", "toolCall", "toolCallCancellation", "usageMetadata",
    "goAway", "sessionResumptionUpdate",
]  # fmt: skip
NESTED = [
    "modelTurn", "parts", "inlineData", "text", "interrupted", "turnComplete",
    "inputTranscription", "outputTranscription", "functionCalls", "ids", "newHandle",
    "resumable", "timeLeft", "id", "name", "args", "mimeType", "data", "finished",
]  # fmt: skip
nested = st.dictionaries(st.sampled_from(NESTED), json_values, max_size=4)
messages = st.dictionaries(st.sampled_from(KNOWN), nested | json_values, max_size=3)


@given(st.text() | st.binary() | messages.map(json.dumps))
def test_any_frame_decodes_or_is_a_protocol_error(frame: str | bytes) -> None:
    decoder = Decoder()
    try:
        events = decoder.decode(parse(frame))
    except ProtocolError:
        return
    assert all(type(e).__name__ in ev.__dict__ for e in events)


# --- configuration and the command line --------------------------------------------


def problems(**section: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config({"realtime": section}, "config.yaml", {})
    return str(caught.value)


def test_gemini_defaults_and_what_it_cannot_do() -> None:
    realtime = parse_config(
        {"realtime": {"provider": "gemini", "api_key": KEY}}, "config.yaml", {}
    ).realtime
    assert realtime.model == "gemini-3.8-live" and realtime.voice == "Puck"
    assert realtime.url is not None and realtime.url.startswith(
        "wss://generativelanguage.googleapis.com/ws/"
    )
    semantic = problems(provider="gemini", api_key=KEY, turn_detection="semantic_vad")
    assert "realtime.turn_detection: semantic_vad is not supported by provider gemini" in semantic
    missing = problems(provider="gemini")
    assert "realtime.api_key: required for provider gemini" in missing
    assert "GEMINI_API_KEY" in missing
    ephemeral = problems(provider="gemini", api_key=KEY, ephemeral_tokens=True)
    assert "realtime.ephemeral_tokens" in ephemeral


def test_a_gemini_key_never_reaches_the_log() -> None:
    key = "AIza" + "SyD-0123456789abcdefghijklmnopqrstu"
    # websockets logs the handshake's headers at debug level.
    assert redact(f"> x-goog-api-key: {key}") == "> x-goog-api-key: ***"
    assert key not in redact(f"unexpected text with {key} in it")


def test_the_fake_server_command_starts_for_gemini() -> None:
    command = [sys.executable, "-m", "harkd.cli", "fake-server", "--provider", "gemini"]
    server = subprocess.Popen(
        [*command, "--port", "0", "--api-key", KEY],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("fake realtime server: ws://127.0.0.1:"), line
        assert line.rstrip().endswith("GenerativeService.BidiGenerateContent")
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0


def test_the_demo_runs_against_the_gemini_fake(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = harkd_env(HOME=str(home), TMPDIR=str(tmp_path))
    result = run_harkd("demo", "--provider", "gemini", env=env, cwd=home, timeout_s=40)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    lines = [line.split("] ", 1)[-1] for line in out.splitlines()]
    assert "provider    gemini (fake)" in out
    assert "you: What time is it?" in lines
    assert any(line.startswith("tool: get_time") for line in lines)
    assert any(line.startswith("assistant: It is ") for line in lines)
    assert "Traceback" not in result.stderr
