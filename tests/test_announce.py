"""Announcements (`B/cmd/announce`, `ctx.announce`): the assistant reads a text out as
it is, never over an answer, opening a session for it if need be, and the user may
reply without the wake word.

Over real websockets against the fake server (whose model reads out what a
response's own instructions ask it to).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from e2e import LoggedAdapter, LoggedInput, Timeline, fake_client, until
from harkd.adapters.openai import openai_realtime
from harkd.audio.wav import NullOutput
from harkd.client import RealtimeClient
from harkd.config import WakeConfig
from harkd.messages import ClientEvent, MessageFinalized, RealtimeStatus
from harkd.testing import FakeRealtimeServer, FakeScript
from speech_fixtures import silence, speech_pcm, write_wav

KEY = "sk-test-announce"
ANNOUNCEMENT = "The washing machine is done."


def reads_out(instructions: str) -> str:
    """The fake model's reading of an announcement's instructions: the text itself."""
    return instructions.rsplit(": ", 1)[-1]


def answers(client: RealtimeClient) -> list[str]:
    found: list[str] = []

    def on_event(event: ClientEvent) -> None:
        if isinstance(event, MessageFinalized) and event.message.role == "assistant":
            found.append(event.message.text)

    client.on_event(on_event)
    return found


@contextlib.asynccontextmanager
async def running(client: RealtimeClient) -> AsyncIterator[RealtimeClient]:
    task = asyncio.create_task(client.run())
    try:
        yield client
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def script(**kw: object) -> FakeScript:
    return FakeScript(reply_for_instructions=reads_out, pace=4.0, **kw)  # type: ignore[arg-type]


async def test_an_announcement_waits_for_the_answer_playing_and_is_read_as_given() -> None:
    async with FakeRealtimeServer(script(reply="Once upon a time there was a kettle.")) as server:
        client = fake_client(server, KEY, audio_output=NullOutput())
        said = answers(client)
        async with running(client):
            await until(lambda: client.status is RealtimeStatus.CONNECTED, what="connected")
            client.send_text("tell me a story")
            await until(lambda: client.mode.value == "speaking", what="the story playing")
            client.announce(ANNOUNCEMENT)
            await until(lambda: len(said) == 2, what="the story, then the announcement")
    assert said == ["Once upon a time there was a kettle.", ANNOUNCEMENT]
    creates = [e for _, e in server.received if e["type"] == "response.create"]
    assert "word for word" in creates[-1]["response"]["instructions"]


async def test_an_announcement_opens_an_on_demand_session_and_invites_a_reply(
    tmp_path: Path,
) -> None:
    reply = "yes please"
    mic = tmp_path / "mic.wav"
    # The user answers the announcement a few seconds in, without the wake word.
    write_wav(mic, silence(4500) + speech_pcm(reply) + silence(3000))
    timeline = Timeline()
    async with FakeRealtimeServer(script(user_transcripts=[reply], reply="Done.")) as server:
        client = fake_client(
            server,
            KEY,
            adapter=LoggedAdapter(openai_realtime(url=server.url), timeline),
            audio_input=LoggedInput(mic, timeline),
            audio_output=NullOutput(),
            vad_mode="manual",
            wake=WakeConfig(enabled=True, sound=None, follow_up_s=6.0),
            connect="on_demand",
            idle_disconnect_s=30,
        )
        said = answers(client)
        async with running(client):
            await asyncio.sleep(0.5)
            assert server.sessions == []  # on demand: nothing open yet
            client.announce("Shall I start the dishwasher?")
            await until(lambda: len(said) == 2, timeout_s=30, what="announcement and reply")
    assert said == ["Shall I start the dishwasher?", "Done."]
    assert len(server.sessions) == 1
