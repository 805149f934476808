"""The wake word end to end: real speech through the real capture path, the client and
real websockets to the fake server.

What a user notices: nothing said before "okay nabu" ever reaches the provider, one
wake word is one turn, a wake word with nothing after it is dropped, a follow-up needs
no wake word, the wake word stops an answer, and an on-demand session opens for it
without losing a word.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from e2e import LoggedAdapter, LoggedInput, Timeline, fake_client, until
from harkd.adapters.openai import openai_realtime
from harkd.audio.wav import NullOutput
from harkd.client import RealtimeClient
from harkd.config import VadConfig, WakeConfig
from harkd.events import InputCommitted, ResponseCreated
from harkd.messages import ClientEvent, MessageFinalized, RealtimeStatus, WakeHeard
from harkd.testing import FakeRealtimeServer, FakeScript
from speech_fixtures import len_ms, silence, speech_pcm, write_wav

KEY = "sk-test-wake"
QUESTION = "what time is it"
BYTES_PER_MS_24K = 48


def wav(tmp_path: Path, pcm: bytes, name: str = "mic.wav") -> Path:
    path = tmp_path / name
    write_wav(path, pcm, 16_000)
    return path


def appended_ms(server: FakeRealtimeServer) -> float:
    """Audio the provider received, in ms (24 kHz PCM16)."""
    total = sum(
        len(base64.b64decode(e["audio"]))
        for _, e in server.received
        if e["type"] == "input_audio_buffer.append"
    )
    return total / BYTES_PER_MS_24K


def count(server: FakeRealtimeServer, kind: str) -> int:
    return sum(1 for _, e in server.received if e["type"] == kind)


def committed(timeline: Timeline) -> int:
    """User turns the server committed."""
    return sum(1 for e in timeline if e.kind == "event" and isinstance(e.detail, InputCommitted))


class Heard:
    """Wake events and final messages, as subscribers see them (noted on `timeline`)."""

    def __init__(self, client: RealtimeClient, timeline: Timeline | None = None) -> None:
        self.wakes: list[WakeHeard] = []
        self.messages: list[MessageFinalized] = []
        self._timeline = timeline
        client.on_event(self._on_event)

    def _on_event(self, event: ClientEvent) -> None:
        if isinstance(event, WakeHeard):
            self.wakes.append(event)
            if self._timeline is not None:
                self._timeline.add("wake", event.answered)
        elif isinstance(event, MessageFinalized):
            self.messages.append(event)

    def answers(self) -> list[MessageFinalized]:
        return [m for m in self.messages if m.message.role == "assistant"]


@contextlib.asynccontextmanager
async def running(client: RealtimeClient) -> AsyncIterator[RealtimeClient]:
    task = asyncio.create_task(client.run())
    try:
        yield client
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def wake_client(
    server: FakeRealtimeServer, mic: Path, timeline: Timeline, **options: Any
) -> RealtimeClient:
    wake = options.pop("wake", WakeConfig(enabled=True, sound=None))
    return fake_client(
        server,
        KEY,
        adapter=LoggedAdapter(openai_realtime(url=server.url), timeline),
        audio_input=LoggedInput(mic, timeline),
        audio_output=NullOutput(),
        wake=wake,
        **options,
    )


@pytest.mark.parametrize("vad_mode", ["server", "manual"])
async def test_nothing_before_the_wake_word_is_sent_and_one_turn_is_answered(
    tmp_path: Path, vad_mode: str
) -> None:
    before = speech_pcm("turn on the kitchen lights") + silence(500)
    woken = speech_pcm(f"okay nabu, {QUESTION}")
    mic = wav(tmp_path, silence(300) + before + woken + silence(2500))
    timeline = Timeline()
    async with FakeRealtimeServer(FakeScript(user_transcripts=[QUESTION])) as server:
        client = wake_client(server, mic, timeline, vad_mode=vad_mode, vad=VadConfig())
        heard = Heard(client, timeline)
        async with running(client):
            await until(lambda: len(heard.answers()) == 1, what="the answer")
            await asyncio.sleep(1.0)  # more microphone audio after the answer
    wake_at = timeline.index_of("wake")
    assert timeline.tally("append", 0, wake_at) == 0  # the privacy invariant
    assert [w.word for w in heard.wakes] == ["okay_nabu"] and heard.wakes[0].answered
    # One turn, and only after the wake word: the question is heard, the lights are not.
    assert committed(timeline) == 1
    sent = appended_ms(server)
    assert sent >= len_ms(speech_pcm(QUESTION)) * 0.8
    assert sent < len_ms(woken) + 2500 and sent < len_ms(before) + len_ms(woken)
    user = [m.message.text for m in heard.messages if m.message.role == "user"]
    assert user == [QUESTION]
    # After the turn the device sleeps again: nothing more was streamed.
    ended = next(
        i
        for i, e in enumerate(timeline)
        if (e.kind == "event" and isinstance(e.detail, ResponseCreated))
        or (e.kind == "command" and e.detail == "EndTurn")
    )
    assert timeline.tally("append", ended + 1) == 0


@pytest.mark.parametrize("vad_mode", ["server", "manual"])
async def test_a_wake_word_with_nothing_after_it_is_dropped_unanswered(
    tmp_path: Path, vad_mode: str
) -> None:
    mic = wav(tmp_path, silence(300) + speech_pcm("okay nabu") + silence(4000))
    timeline = Timeline()
    async with FakeRealtimeServer() as server:
        wake = WakeConfig(enabled=True, sound=None, timeout_s=1.0)
        client = wake_client(server, mic, timeline, vad_mode=vad_mode, wake=wake)
        heard = Heard(client, timeline)
        async with running(client):
            await until(lambda: len(heard.wakes) == 2, what="the wake word and its drop")
            streamed = timeline.tally("append")
            await asyncio.sleep(1.0)
    assert [w.answered for w in heard.wakes] == [True, False]
    assert heard.wakes[0].ts == heard.wakes[1].ts  # the same wake word, reported dropped
    assert count(server, "response.create") == 0 and committed(timeline) == 0
    assert count(server, "input_audio_buffer.clear") >= 1  # the provider keeps nothing
    assert timeline.tally("append") == streamed  # and the device went back to sleep
    assert heard.answers() == []


async def answers_with_follow_up(mic: Path, follow_up_s: float) -> tuple[int, int]:
    """(answers, wake words) over the whole file with that follow-up window."""
    script = FakeScript(user_transcripts=[QUESTION, "and the date"], reply="It is noon.")
    timeline = Timeline()
    async with FakeRealtimeServer(script) as server:
        wake = WakeConfig(enabled=True, sound=None, follow_up_s=follow_up_s)
        client = wake_client(server, mic, timeline, vad_mode="manual", wake=wake)
        heard = Heard(client, timeline)
        async with running(client):
            await until(lambda: len(heard.answers()) >= 1, what="the first answer")
            await until(lambda: timeline.tally("frame") >= 500, what="the whole file")
    return len(heard.answers()), len(heard.wakes)


async def test_a_follow_up_needs_no_wake_word(tmp_path: Path) -> None:
    first = speech_pcm(f"okay nabu, {QUESTION}")
    mic = wav(tmp_path, first + silence(4500) + speech_pcm("and the date") + silence(3000))
    assert await answers_with_follow_up(mic, 0.0) == (1, 1)
    assert await answers_with_follow_up(mic, 6.0) == (2, 1)


async def test_the_wake_word_stops_an_answer_and_opens_a_new_turn(tmp_path: Path) -> None:
    story = "Once upon a time " + "there was a small voice daemon that lived on a shelf. " * 6
    mic = wav(
        tmp_path,
        speech_pcm("okay nabu, tell me a story")
        + silence(4000)
        + speech_pcm(f"okay nabu, {QUESTION}")
        + silence(3000),
    )
    script = FakeScript(user_transcripts=["tell me a story", QUESTION], reply=story)
    timeline = Timeline()
    async with FakeRealtimeServer(script) as server:
        client = wake_client(server, mic, timeline, vad_mode="manual")  # half duplex
        heard = Heard(client, timeline)
        async with running(client):
            await until(lambda: len(heard.answers()) >= 2, timeout_s=30, what="two answers")
    first, second = heard.answers()[:2]
    assert first.message.interrupted  # the story was cut by the second wake word
    assert [w.word for w in heard.wakes] == ["okay_nabu", "okay_nabu"]
    assert server.truncations, "the story was truncated at what was heard"
    heard_ms = server.truncations[0]["audio_end_ms"]
    assert 500 < heard_ms < 15_000
    assert [m.message.text for m in heard.messages if m.message.role == "user"] == [
        "tell me a story",
        QUESTION,
    ]
    assert not second.message.interrupted


async def test_on_demand_opens_a_session_for_the_wake_word_and_loses_nothing(
    tmp_path: Path,
) -> None:
    question = speech_pcm(QUESTION)
    mic = wav(tmp_path, silence(1500) + speech_pcm("okay nabu") + question + silence(2000))
    timeline = Timeline()
    async with FakeRealtimeServer(FakeScript(user_transcripts=[QUESTION])) as server:
        client = wake_client(server, mic, timeline, connect="on_demand", idle_disconnect_s=1.0)
        heard = Heard(client, timeline)
        sessions_at_wake: list[int] = []
        client.on_event(
            lambda e: (
                sessions_at_wake.append(len(server.sessions)) if isinstance(e, WakeHeard) else None
            )
        )
        async with running(client):
            await until(lambda: timeline.tally("frame") >= 50, what="a second of audio")
            assert client.status is RealtimeStatus.IDLE and server.sessions == []
            await until(lambda: len(heard.answers()) == 1, what="the answer")
            await until(
                lambda: client.status is RealtimeStatus.IDLE, timeout_s=10, what="idle again"
            )
    assert sessions_at_wake == [0]  # no session before the wake word
    assert len(server.sessions) == 1
    # Everything said after the wake word arrived, although the session opened after it.
    assert appended_ms(server) >= len_ms(question)
    assert [m.message.text for m in heard.messages if m.message.role == "user"] == [QUESTION]


async def test_listen_is_a_wake_word_from_home_assistant(tmp_path: Path) -> None:
    mic = wav(tmp_path, silence(1000) + speech_pcm(QUESTION) + silence(3000))
    timeline = Timeline()
    async with FakeRealtimeServer(FakeScript(user_transcripts=[QUESTION])) as server:
        client = wake_client(server, mic, timeline, vad_mode="manual")
        heard = Heard(client, timeline)
        async with running(client):
            await until(lambda: client.status is RealtimeStatus.CONNECTED, what="connected")
            await until(lambda: timeline.tally("frame") >= 25, what="half a second")
            assert timeline.tally("append") == 0
            client.start_listening()
            await until(lambda: len(heard.answers()) == 1, what="the answer")
    assert [(w.word, w.answered) for w in heard.wakes] == [("command", True)]
    assert committed(timeline) == 1
