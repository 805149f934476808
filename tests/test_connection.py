"""The connection supervisor with an in-memory adapter: no sockets, no session."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from e2e import until
from harkd import events as ev
from harkd.adapters.base import AuthenticationFailed, ConnectionFailed, ConnectionLost
from harkd.adapters.openai import TRAITS
from harkd.backoff import Backoff
from harkd.connection import GOING_AWAY_MARGIN_S, GOING_AWAY_POLL_S, ConnectionSupervisor
from harkd.messages import RealtimeError, RealtimeStatus, RealtimeToken


class MemoryConnection:
    """A connection that serves until the test ends it."""

    def __init__(self) -> None:
        self.sent: list[ev.Command] = []
        self.ended: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self.closed = False

    def send(self, command: ev.Command) -> None:
        self.sent.append(command)

    async def send_audio(self, pcm: bytes) -> None:
        self.sent.append(ev.AppendAudio(pcm))

    def update_session(self, settings: ev.SessionSettings) -> None:
        pass

    async def serve(self, on_event: Callable[[ev.ServerEvent], None]) -> None:
        on_event(ev.SessionUpdated())
        raise await self.ended

    def end(self, error: BaseException) -> None:
        if not self.ended.done():
            self.ended.set_result(error)

    async def close(self) -> None:
        self.closed = True
        self.end(ConnectionLost(1000, "closed by us"))


class MemoryAdapter:
    """Hands out connections; `failures` are raised by the next attempts, in order."""

    name = "memory"

    def __init__(self, resume: str = "replay") -> None:
        self.traits = replace(TRAITS, resume=resume)
        self.handles: list[str | None] = []
        self.connections: list[MemoryConnection] = []
        self.failures: list[Exception] = []
        self.attempts = 0

    async def connect(
        self, token: RealtimeToken, settings: ev.SessionSettings, resume_handle: str | None = None
    ) -> Any:
        self.attempts += 1
        self.handles.append(resume_handle)
        if self.failures:
            raise self.failures.pop(0)
        conn = MemoryConnection()
        self.connections.append(conn)
        return conn


class Owner:
    """Records what the supervisor reports."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.statuses: list[RealtimeStatus] = []
        self.idle_between_turns = True

    def connection_opened(self, conn: Any, resumed: bool) -> None:
        self.log.append("resumed" if resumed else "opened")

    def connection_event(self, event: ev.ServerEvent) -> None:
        self.log.append(type(event).__name__)

    def connection_closed(self) -> None:
        self.log.append("closed")

    def connection_status(self, status: RealtimeStatus, error: RealtimeError | None) -> None:
        if not self.statuses or self.statuses[-1] is not status:
            self.statuses.append(status)

    def between_turns(self) -> bool:
        return self.idle_between_turns


async def token() -> RealtimeToken:
    return RealtimeToken("sk-memory")


def supervisor(
    owner: Owner,
    adapter: MemoryAdapter,
    rollover_s: float = 3300.0,
    reconnect: Backoff | None = None,
) -> ConnectionSupervisor:
    return ConnectionSupervisor(
        owner,
        adapter,  # type: ignore[arg-type]
        token,
        lambda: ev.SessionSettings("Be brief.", "marin"),
        reconnect=reconnect or Backoff(0.01, 0.05),
        rollover_s=rollover_s,
    )


async def running(sup: ConnectionSupervisor) -> asyncio.Task[None]:
    sup.want(True)
    return asyncio.create_task(sup.run())


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_lost_connection_is_reconnected_and_the_owner_hears_it_in_order() -> None:
    owner, adapter = Owner(), MemoryAdapter()
    sup = supervisor(owner, adapter)
    task = await running(sup)
    await until(lambda: len(adapter.connections) == 1)
    adapter.connections[0].end(ConnectionLost(1011, "server error"))
    await until(lambda: len(owner.log) == 5, what="the second connection serving")
    assert owner.log == ["opened", "SessionUpdated", "closed", "opened", "SessionUpdated"]
    assert owner.statuses == [
        RealtimeStatus.CONNECTING,
        RealtimeStatus.CONNECTED,
        RealtimeStatus.RECONNECTING,
        RealtimeStatus.CONNECTED,
    ]
    await stop(task)


async def test_failed_attempts_back_off_then_connect() -> None:
    owner, adapter = Owner(), MemoryAdapter()
    adapter.failures = [ConnectionFailed("refused"), OSError("no route")]
    sup = supervisor(owner, adapter)
    task = await running(sup)
    await until(lambda: sup.status is RealtimeStatus.CONNECTED)
    assert adapter.attempts == 3 and sup.error is None
    await stop(task)


async def test_a_bug_while_connecting_is_one_more_failed_attempt() -> None:
    owner, adapter = Owner(), MemoryAdapter()
    adapter.failures = [RuntimeError("a bug in the adapter")]
    sup = supervisor(owner, adapter)
    task = await running(sup)
    await until(lambda: sup.status is RealtimeStatus.CONNECTED)
    assert not task.done()
    await stop(task)


async def test_a_refused_credential_is_an_error_and_not_retried_quickly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    owner, adapter = Owner(), MemoryAdapter()
    adapter.failures = [AuthenticationFailed("bad key")]
    sup = supervisor(owner, adapter)
    task = await running(sup)
    await until(lambda: sup.status is RealtimeStatus.ERROR)
    assert sup.error is not None and sup.error.code == "invalid_api_key"
    await until(lambda: sup.settled.is_set())
    # A quick retry would be a second attempt within the 5-minute pause.
    for _ in range(20):
        await asyncio.sleep(0)
    assert adapter.attempts == 1
    sup.want(False)  # wakes the pause; nothing more is attempted
    await until(lambda: sup.status is RealtimeStatus.IDLE)
    assert adapter.attempts == 1
    await stop(task)


async def test_want_false_closes_the_connection_and_settles() -> None:
    owner, adapter = Owner(), MemoryAdapter()
    sup = supervisor(owner, adapter)
    task = await running(sup)
    await until(lambda: sup.status is RealtimeStatus.CONNECTED)
    sup.want(False)
    await asyncio.wait_for(sup.settled.wait(), 5)
    assert adapter.connections[0].closed and sup.status is RealtimeStatus.IDLE
    assert owner.log[-1] == "closed"
    await stop(task)


async def test_rollover_waits_for_a_pause_in_the_conversation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    owner, adapter = Owner(), MemoryAdapter()
    owner.idle_between_turns = False  # mid-answer: no rollover yet
    sup = supervisor(owner, adapter, rollover_s=0.05)
    task = await running(sup)
    await until(lambda: len(adapter.connections) == 1)
    for _ in range(5):
        await asyncio.sleep(0.06)
    assert len(adapter.connections) == 1
    owner.idle_between_turns = True
    await until(lambda: len(adapter.connections) == 2, what="rolled over")
    assert adapter.connections[0].closed
    await stop(task)


async def test_going_away_moves_to_a_connection_resumed_from_the_latest_handle() -> None:
    owner, adapter = Owner(), MemoryAdapter(resume="handle")
    sup = supervisor(owner, adapter)
    task = await running(sup)
    await until(lambda: sup.status is RealtimeStatus.CONNECTED)
    first = adapter.connections[0]
    sup._on_event(ev.ResumeHandle("h1"))
    sup._on_event(ev.ResumeHandle("h2"))
    sup._on_event(ev.GoingAway(time_left_ms=5000))
    await until(lambda: owner.log.count("SessionUpdated") == 2, what="a new connection")
    assert first.closed
    assert adapter.handles == [None, "h2"]  # the newest handle, nothing replayed
    assert owner.log[-2:] == ["resumed", "SessionUpdated"]
    await stop(task)


async def test_going_away_mid_answer_moves_when_the_answer_is_over() -> None:
    owner, adapter = Owner(), MemoryAdapter(resume="handle")
    owner.idle_between_turns = False  # an answer is playing
    sup = supervisor(owner, adapter)
    task = await running(sup)
    await until(lambda: sup.status is RealtimeStatus.CONNECTED)
    sup._on_event(ev.ResumeHandle("h1"))
    sup._on_event(ev.GoingAway(time_left_ms=60_000))
    for _ in range(3):  # several of the watcher's looks
        await asyncio.sleep(GOING_AWAY_POLL_S * 2)
    assert len(adapter.connections) == 1
    owner.idle_between_turns = True
    await until(lambda: len(adapter.connections) == 2, what="moved after the answer")
    assert adapter.handles == [None, "h1"]
    await stop(task)


async def test_going_away_mid_answer_moves_before_the_connection_ends() -> None:
    owner, adapter = Owner(), MemoryAdapter(resume="handle")
    owner.idle_between_turns = False  # an answer that never ends
    sup = supervisor(owner, adapter)
    task = await running(sup)
    await until(lambda: sup.status is RealtimeStatus.CONNECTED)
    sup._on_event(ev.GoingAway(time_left_ms=int((GOING_AWAY_MARGIN_S + 0.3) * 1000)))
    await until(lambda: len(adapter.connections) == 2, what="moved before the end")
    assert adapter.connections[0].closed
    await stop(task)


async def test_a_refused_handle_is_dropped_and_the_next_attempt_starts_fresh() -> None:
    owner, adapter = Owner(), MemoryAdapter(resume="handle")
    sup = supervisor(owner, adapter)
    task = await running(sup)
    await until(lambda: sup.status is RealtimeStatus.CONNECTED)
    sup._on_event(ev.ResumeHandle("stale"))
    adapter.failures = [ConnectionFailed("session not found")]
    adapter.connections[0].end(ConnectionLost(1011, "dropped"))
    await until(lambda: owner.log.count("SessionUpdated") == 2, what="reconnected")
    assert adapter.handles == [None, "stale", None]
    assert owner.log[-2:] == ["opened", "SessionUpdated"]  # fresh: context is replayed
    await stop(task)


async def test_a_provider_without_handles_is_never_given_one() -> None:
    owner, adapter = Owner(), MemoryAdapter(resume="replay")
    sup = supervisor(owner, adapter)
    task = await running(sup)
    await until(lambda: sup.status is RealtimeStatus.CONNECTED)
    sup._on_event(ev.ResumeHandle("h1"))
    adapter.connections[0].end(ConnectionLost(1011, "dropped"))
    await until(lambda: len(adapter.connections) == 2, what="reconnected")
    assert adapter.handles == [None, None]
    await stop(task)


async def test_tools_that_change_while_the_session_opens_reach_it() -> None:
    """An MCP server answering while the session is being set up: its tools must not
    wait for the next change to reach the model."""
    from e2e import fake_client
    from harkd.adapters.openai import openai_realtime
    from harkd.testing import FakeRealtimeServer
    from harkd.tools import Tool

    async def noop(args: Any, call: Any) -> str:
        return "ok"

    lamp = Tool("turn_on", "Turn a light on", {"type": "object", "properties": {}}, noop)
    async with FakeRealtimeServer() as server:
        inner = openai_realtime(url=server.url)
        release = asyncio.Event()

        class SlowSetup:
            name, traits = inner.name, inner.traits

            async def connect(self, token: Any, settings: Any, resume_handle: Any = None) -> Any:
                conn = await inner.connect(token, settings, resume_handle)
                await release.wait()
                return conn

        client = fake_client(server, "k", adapter=SlowSetup())
        task = asyncio.create_task(client.run())
        try:
            await until(lambda: len(server.sessions) == 1, what="the session being set up")
            client.update_settings(tools=[lamp])  # nothing to send it on yet
            release.set()
            await until(
                lambda: any(
                    [t["name"] for t in e["session"].get("tools", [])] == ["turn_on"]
                    for _, e in server.received
                    if e["type"] == "session.update"
                ),
                what="the new tool in a session.update",
            )
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_stop_that_comes_with_a_change_of_wish_is_not_lost() -> None:
    """Stopping the daemon as it is told to disconnect (both in one tick) stops it: a
    cancellation swallowed here leaves the service hanging until systemd kills it."""
    adapter = MemoryAdapter()
    adapter.failures = [ConnectionFailed("refused")]
    sup = supervisor(Owner(), adapter, reconnect=Backoff(30, 60))  # waits in its backoff
    task = await running(sup)
    await until(lambda: sup.status is RealtimeStatus.RECONNECTING, what="the backoff")
    await asyncio.sleep(0.05)
    sup.want(False)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2.0)
    assert done, "the supervisor ignored its cancellation"
    assert task.cancelled()
