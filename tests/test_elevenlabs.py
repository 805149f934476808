"""ElevenLabs Agents end to end: the real client over real websockets against the fake
agent. What a user would notice: a spoken question is heard and answered, typed
questions run the agent's client tools (failures reported as errors), talking over
the agent stops it where it was cut, the conversation survives a drop with its
context, and a refused key is reported without hammering the service."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from e2e import LoggedAdapter, Running, Timeline, until
from harkd import events as ev
from harkd.adapters.elevenlabs import ElevenLabsAdapter
from harkd.audio.wav import NullOutput, WavInput, WavOutput
from harkd.backoff import Backoff
from harkd.client import RealtimeClient
from harkd.config import ConfigError, parse_config
from harkd.messages import RealtimeStatus
from harkd.testing import FakeScript, ToolRule
from harkd.testing.elevenlabs_fake import AGENT_ID, IN_FLIGHT_CHUNKS, ElevenLabsFakeServer
from harkd.tokens import static_token
from harkd.tools import Tool, ToolCall, ToolError
from speech_fixtures import silence, speech_pcm, write_wav

pytestmark = pytest.mark.timeout(40)

KEY = "xi-test-key-0123456789"
SENTENCE = "turn on the kitchen lights"
ANSWER = "The kitchen lights are on now."
LONG_ANSWER = (
    "Sure. I am turning on the kitchen lights now, and while I am at it let me tell you "
    "all about the weather for the rest of the week, day by day, in great detail."
)


def adapter(server: ElevenLabsFakeServer) -> ElevenLabsAdapter:
    return ElevenLabsAdapter(AGENT_ID, server.url)


def make_client(server: ElevenLabsFakeServer, key: str = KEY, **options: Any) -> RealtimeClient:
    defaults: dict[str, Any] = {
        "get_token": static_token(key),
        "adapter": adapter(server),
        "instructions": "Be brief.",
        "voice": "agent",
        "transcription_model": "scribe",
        "reconnect": Backoff(0.05, 0.2),
    }
    return RealtimeClient(**{**defaults, **options})


async def clock(args: dict[str, Any], call: ToolCall) -> Any:
    return {"time": "12:30"}


async def broken(args: dict[str, Any], call: ToolCall) -> Any:
    raise ToolError("the lights are unreachable")


TOOLS = [
    Tool("get_time", "The time.", {"type": "object", "properties": {}}, clock),
    Tool("set_lights", "Lights.", {"type": "object", "properties": {}}, broken),
]


def voice_wav(tmp_path: Path, *parts: bytes) -> Path:
    path = tmp_path / "mic.wav"
    write_wav(path, b"".join(parts), 16000)
    return path


async def test_a_spoken_turn_is_heard_and_answered(tmp_path: Path) -> None:
    script = FakeScript(user_transcripts=[SENTENCE], reply=ANSWER, audio_ms_per_char=40)
    mic = voice_wav(tmp_path, silence(500), speech_pcm(SENTENCE), silence(2500))
    out = tmp_path / "answer.wav"
    async with ElevenLabsFakeServer(script, api_keys={KEY}) as server:
        client = make_client(
            server,
            audio_input=WavInput(mic),
            audio_output=WavOutput(out, rate=16000, source_rate=16000),
        )
        async with Running(client):
            await until(lambda: len(client.messages) == 2 and _final(client), what="the answer")
            user, assistant = client.messages
            assert (user.role, user.text) == ("user", SENTENCE)
            assert (assistant.role, assistant.text) == ("assistant", ANSWER)
            assert not assistant.interrupted
            assert assistant.duration_ms == pytest.approx(len(ANSWER) * 40, abs=20)
        conversation = server.conversations[0]
        # A private agent: the conversation was opened with a signed URL.
        assert conversation.signed and server.signed_url_requests == 1
        override = conversation.initiation["conversation_config_override"]
        assert override == {"agent": {"prompt": {"prompt": "Be brief."}}}  # the agent's voice
        assert conversation.audio_ms_received > 2000  # 16 kHz chunks, all valid
        assert conversation.invalid == []


def _final(client: RealtimeClient) -> bool:
    return client.mode.value in ("listening", "idle") and not client.pending_assistant_transcript


async def test_typed_questions_run_the_agents_client_tools(tmp_path: Path) -> None:
    script = FakeScript(
        tool_rules=[ToolRule(r"\btime\b", "get_time"), ToolRule(r"\blights\b", "set_lights")],
        tool_reply=lambda outputs: f"Done: {outputs[0][1]}",
    )
    async with ElevenLabsFakeServer(script) as server:  # a public agent: no key needed
        client = make_client(server, key="", tools=TOOLS, voice="21m00Tcm4TlvDq8ikWAM")
        async with Running(client):
            client.send_text("what time is it")
            await until(lambda: _assistant_texts(client) == ['Done: {"time": "12:30"}'])
            client.send_text("turn on the lights")
            await until(lambda: len(_assistant_texts(client)) == 2, what="the second answer")
        conversation = server.conversations[0]
        assert not conversation.signed and server.signed_url_requests == 0
        assert conversation.user_messages == ["what time is it", "turn on the lights"]
        ok, failed = conversation.tool_results
        assert (ok["is_error"], ok["result"]) == (False, '{"time": "12:30"}')
        assert (failed["is_error"], failed["result"]) == (True, "the lights are unreachable")
        override = conversation.initiation["conversation_config_override"]
        assert override["tts"] == {"voice_id": "21m00Tcm4TlvDq8ikWAM"}
        assert conversation.invalid == []


def _assistant_texts(client: RealtimeClient) -> list[str]:
    return [m.text for m in client.messages if m.role == "assistant" and m.text]


async def test_talking_over_the_agent_cuts_it_where_the_server_says(tmp_path: Path) -> None:
    script = FakeScript(
        user_transcripts=[SENTENCE, "stop"],
        reply=lambda text: LONG_ANSWER if text == SENTENCE else "Stopped.",
        audio_ms_per_char=60,  # ~9 s of answer, streamed at real time
        pace=1.0,
    )
    question = speech_pcm(SENTENCE)
    mic = voice_wav(
        tmp_path, silence(500), question, silence(3000), speech_pcm("stop"), silence(2500)
    )
    timeline = Timeline()
    async with ElevenLabsFakeServer(script) as server:
        client = make_client(
            server,
            key="",
            adapter=LoggedAdapter(adapter(server), timeline),
            audio_input=WavInput(mic),
            audio_output=NullOutput(rate=16000, source_rate=16000),
            barge_in=True,
        )
        async with Running(client):
            await until(lambda: "Stopped." in _assistant_texts(client), what="the second answer")
        conversation = server.conversations[0]
        [interrupted_id] = conversation.interruptions
        [(original, corrected)] = conversation.corrections
        assert original == LONG_ANSWER and corrected and corrected != LONG_ANSWER
        first = next(m for m in client.messages if m.role == "assistant")
        assert first.interrupted
        assert first.text == corrected  # what the agent really said, not what it meant to
        assert first.duration_ms is not None and first.duration_ms < len(LONG_ANSWER) * 60
        # The chunks in flight when it was cut reached the client and were dropped.
        events = [e.detail for e in timeline if e.kind == "event"]
        dropped = [i for i, d in enumerate(events) if d == ev.Ignored("audio")]
        assert len(dropped) == IN_FLIGHT_CHUNKS
        assert not any(
            isinstance(d, ev.AudioDelta) and d.item_id == _item(timeline)
            for d in events[dropped[0] :]
        )
        assert interrupted_id >= 1 and conversation.invalid == []


def _item(timeline: Timeline) -> str:
    """The item of the first answer's audio."""
    return next(e.detail.item_id for e in timeline if isinstance(e.detail, ev.AudioDelta))


async def test_pings_are_answered_with_their_ids() -> None:
    async with ElevenLabsFakeServer(ping_interval_s=0.1) as server:
        async with Running(make_client(server, key="")):
            conversation = await server.wait_for_conversations()
            await until(lambda: len(conversation.pongs) >= 3, what="three pongs")
        assert conversation.pongs == conversation.pings[: len(conversation.pongs)]
        assert conversation.invalid == []


async def test_a_dropped_conversation_continues_with_its_context() -> None:
    script = FakeScript(reply=lambda text: f"About {text}.")
    async with ElevenLabsFakeServer(script) as server:
        client = make_client(server, key="")
        async with Running(client):
            client.send_text("the weather")
            await until(lambda: _assistant_texts(client) == ["About the weather."])
            await server.drop_all()
            second = await server.wait_for_conversations(2)
            await until(lambda: len(second.contextual_updates) == 2, what="replayed context")
            assert second.contextual_updates == [
                "The user said: the weather",
                "You said: About the weather.",
            ]
            assert second.user_messages == []  # context is not a question
            await until(lambda: client.status is RealtimeStatus.CONNECTED, what="reconnected")
            client.send_text("the news")
            await until(lambda: "About the news." in _assistant_texts(client))
            assert _assistant_texts(client) == ["About the weather.", "About the news."]
        assert second.invalid == []


@pytest.mark.parametrize("key", ["xi-wrong-key", ""], ids=["bad_key", "no_key"])
async def test_a_refused_credential_is_reported_without_a_hot_loop(key: str) -> None:
    async with ElevenLabsFakeServer(api_keys={KEY}) as server:
        client = make_client(server, key=key)
        async with asyncio.timeout(20):
            task = asyncio.create_task(client.run())
            await until(lambda: client.status is RealtimeStatus.ERROR, what="the error")
            assert client.error is not None and client.error.code == "invalid_api_key"
            await asyncio.sleep(1.0)  # the backoff would retry several times in this
            attempts = server.signed_url_requests + len(server.conversations)
            assert attempts == 1
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_tool_the_agent_has_but_harkd_lacks_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    script = FakeScript(tool_rules=[ToolRule(r"rockets", "launch_rockets")])
    async with ElevenLabsFakeServer(script) as server:
        client = make_client(server, key="", tools=TOOLS)
        with caplog.at_level(logging.WARNING, logger="harkd.adapters.elevenlabs"):
            async with Running(client):
                client.send_text("launch the rockets")
                conversation = await server.wait_for_conversations()
                await until(lambda: len(conversation.tool_results) == 1, what="the tool result")
        [result] = conversation.tool_results
        assert result["is_error"] and "unknown tool 'launch_rockets'" in result["result"]
        [warning] = [r for r in caplog.records if r.name == "harkd.adapters.elevenlabs"]
        assert "the agent's configuration and in harkd" in warning.getMessage()


async def test_an_agent_that_does_not_speak_16_khz_is_refused_clearly() -> None:
    async with ElevenLabsFakeServer(output_format="pcm_24000") as server:
        client = make_client(server, key="")
        with pytest.raises(Exception, match="pcm_24000: harkd needs pcm_16000"):
            await client.connect()
        client.destroy()


def test_the_config_names_the_keys_elevenlabs_needs() -> None:
    def problems(**realtime: Any) -> str:
        with pytest.raises(ConfigError) as caught:
            parse_config({"realtime": realtime}, "config.yaml", {})
        return str(caught.value)

    assert "realtime.agent_id: required for provider elevenlabs" in problems(provider="elevenlabs")
    message = problems(provider="elevenlabs", agent_id="agent_x", turn_detection="manual")
    assert "realtime.turn_detection: manual is not supported by provider elevenlabs" in message
    assert "(supported: server_vad)" in message
    config = parse_config(
        {"realtime": {"provider": "elevenlabs", "agent_id": "agent_x"}}, "config.yaml", {}
    )
    rt = config.realtime
    assert (rt.url, rt.voice) == ("wss://api.elevenlabs.io/v1/convai/conversation", "agent")
