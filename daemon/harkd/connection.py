"""The connection supervisor: one realtime connection at a time, kept open while wanted.

It connects, serves the connection until it ends, and reconnects with jittered
backoff; it stops retrying fast when the credential is refused, rolls the session over
before the provider's limit, and resumes with the provider's handle where the provider
offers one (its owner replays recent context where it does not). It knows nothing of
audio or of the conversation: its owner is told when a connection opens, what it
receives, and when it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from harkd import events as ev
from harkd.adapters.base import (
    AuthenticationFailed,
    ConnectionFailed,
    ConnectionLost,
    RealtimeAdapter,
    RealtimeConnection,
)
from harkd.backoff import Backoff
from harkd.messages import RealtimeError, RealtimeStatus
from harkd.tokens import TokenSource

log = logging.getLogger(__name__)

AUTH_RETRY_S = 300.0
"""A refused credential is retried this seldom: a human has to fix it first."""

STABLE_AFTER_S = 30.0
"""A connection that lived this long resets the backoff (quick failures do not)."""

CLOSE_WAIT_S = 2.0
"""How long a clean close may take before the connection is simply dropped."""

GOING_AWAY_MARGIN_S = 1.0
"""A connection the provider is ending is left at the latest this long before its end."""

GOING_AWAY_POLL_S = 0.1
"""How often a connection that is going away looks for the end of the answer in progress."""


class ConnectionOwner(Protocol):
    """What the supervisor tells its owner (the client), all on the event loop."""

    def connection_opened(self, conn: RealtimeConnection, resumed: bool) -> None:
        """A connection is serving: start the session on it. `resumed`: the provider
        continued the earlier session from its handle (nothing to replay)."""

    def connection_event(self, event: ev.ServerEvent) -> None:
        """One decoded event of the serving connection."""

    def connection_closed(self) -> None:
        """The serving connection is gone."""

    def connection_status(self, status: RealtimeStatus, error: RealtimeError | None) -> None:
        """Status (and the connection's own error, if any) changed."""

    def between_turns(self) -> bool:
        """True when a rollover would cut nobody off (no answer or turn in progress)."""


class ConnectionSupervisor:
    """Keeps one connection open while `want(True)`; closes it on `want(False)`."""

    def __init__(
        self,
        owner: ConnectionOwner,
        adapter: RealtimeAdapter,
        get_token: TokenSource,
        settings: Callable[[], ev.SessionSettings],
        *,
        reconnect: Backoff | None = None,
        rollover_s: float = 3300.0,
    ) -> None:
        self._owner = owner
        self._adapter = adapter
        self._get_token = get_token
        self._settings = settings
        self._reconnect = reconnect or Backoff()
        self._rollover_s = rollover_s
        self.conn: RealtimeConnection | None = None
        """The serving connection, if any."""
        self.status = RealtimeStatus.IDLE
        self.error: RealtimeError | None = None
        """Why the last attempt failed or the connection was lost (None while fine)."""
        self._wanted = asyncio.Event()
        self._wish_changed = asyncio.Event()
        self.attempted = asyncio.Event()
        """Set after each attempt's outcome is known (connected, or failed)."""
        self.settled = asyncio.Event()
        """Set while idle or in error: nothing is being opened or served."""
        self.settled.set()
        self._rollover_pending = False
        self._resume_handle: str | None = None
        """The provider's latest handle to continue the session (resume="handle")."""
        self._resumed = False
        self._going_away = False
        self._going_away_by = 0.0

    @property
    def wanted(self) -> bool:
        """Whether a connection should be open."""
        return self._wanted.is_set()

    def want(self, connected: bool) -> None:
        """Open (and keep open) or close the connection."""
        if connected:
            self._wanted.set()
        else:
            self._wanted.clear()
        self._wish_changed.set()

    async def open_once(self, error: Callable[[], RealtimeError | None]) -> None:
        """Want a connection and wait for the first attempt; raise what `error()` says
        if it failed (later drops are reconnected until `want(False)`)."""
        self.attempted.clear()
        self.want(True)
        await self.attempted.wait()
        if self.status is not RealtimeStatus.CONNECTED:
            failure = error() or RealtimeError("connect_failed", "could not connect")
            self.want(False)
            raise failure

    async def run(self) -> None:
        """Connect, serve and reconnect until cancelled."""
        attempt = 0
        while True:
            if not self._wanted.is_set():
                self._set_status(RealtimeStatus.IDLE)
                await self._wanted.wait()
                attempt = 0
            self._set_status(
                RealtimeStatus.CONNECTING if attempt == 0 else RealtimeStatus.RECONNECTING
            )
            conn = await self._open(attempt)
            if conn is None:
                attempt += 1
                continue
            opened = time.monotonic()
            code = await self._serve(conn)
            if time.monotonic() - opened >= STABLE_AFTER_S:
                attempt = 0
            if not self._wanted.is_set():
                continue
            self._set_status(RealtimeStatus.RECONNECTING)
            if self._rollover_pending or code == 1001:
                # Session limit or our own rollover: a fresh session at once.
                self._rollover_pending = False
                continue
            await self._pause(self._reconnect.delay(attempt))
            attempt += 1

    async def _open(self, attempt: int) -> RealtimeConnection | None:
        """One connection attempt; on failure, waits out the backoff and returns None."""
        handle = self._resume_handle if self._adapter.traits.resume == "handle" else None
        try:
            token = await self._get_token()
            settings = self._settings()
            conn = await self._adapter.connect(token, settings, resume_handle=handle)
            self._resumed = handle is not None
            if (latest := self._settings()) != settings:
                # Tools or instructions changed while the session was being set up
                # (an MCP server answered meanwhile): the new session gets them too.
                conn.update_session(latest)
            return conn
        except AuthenticationFailed as exc:
            error = RealtimeError("invalid_api_key", str(exc))
        except RealtimeError as exc:
            error = exc
        except (ConnectionFailed, OSError) as exc:
            error = RealtimeError("connect_failed", str(exc))
        except Exception as exc:
            # A bug (ours, a token source's or an adapter's) must not take the
            # microphone and speaker down with it: it is one more failed attempt.
            log.exception("connecting failed unexpectedly")
            error = RealtimeError("connect_failed", f"{type(exc).__name__}: {exc}")
        self.error = error
        # A refused handle (expired, or the session is gone) must not block every later
        # attempt: the next one starts a fresh session, with context replayed.
        self._resume_handle = None
        if error.code == "invalid_api_key":
            log.error("realtime: %s", error.message)
            self._set_status(RealtimeStatus.ERROR)
            self.attempted.set()
            await self._pause(max(AUTH_RETRY_S, self._reconnect.max_s))
        else:
            self._set_status(RealtimeStatus.RECONNECTING)
            self.attempted.set()
            await self._pause(self._reconnect.delay(attempt))
        return None

    async def _serve(self, conn: RealtimeConnection) -> int | None:
        """Serve one connection until it ends; returns its close code.

        Whatever ends it (a close, a ping timeout, a protocol error, a bug in an event
        handler) is a lost connection: logged once, and the caller reconnects.
        """
        self.conn = conn
        self.error = None
        self._owner.connection_opened(conn, self._resumed)
        self._set_status(RealtimeStatus.CONNECTED)
        self.attempted.set()
        code: int | None = None
        serving = asyncio.create_task(conn.serve(self._on_event), name="ws")
        watcher = asyncio.create_task(self._watch(conn), name="ws-watch")
        try:
            await serving  # always ends by raising
        except ConnectionLost as lost:
            code = lost.code
            if self._wanted.is_set() and not self._rollover_pending:
                log.warning("realtime connection lost: %s", lost)
        except AuthenticationFailed as exc:
            self.error = RealtimeError("invalid_api_key", str(exc))
        except ConnectionFailed as exc:
            log.warning("realtime connection failed: %s", exc)
        except Exception:
            log.exception("realtime connection broken by a bug; reconnecting")
        finally:
            for task in (serving, watcher):
                task.cancel()
            await asyncio.gather(serving, watcher, return_exceptions=True)
            self.conn = None
            self._owner.connection_closed()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_WAIT_S):
                    await conn.close()
        return code

    def _on_event(self, event: ev.ServerEvent) -> None:
        if isinstance(event, ev.ResumeHandle):
            self._resume_handle = event.handle
        elif isinstance(event, ev.GoingAway):
            # The provider is about to close this connection: move to a new one, resumed
            # from the latest handle, once the answer in progress is over (it would be
            # cut off, and the handle from before it would forget it) or just before the
            # connection ends, whichever comes first.
            log.info("the provider is going away; moving to a new connection")
            left_s = 0.0 if event.time_left_ms is None else event.time_left_ms / 1000
            self._going_away_by = time.monotonic() + max(0.0, left_s - GOING_AWAY_MARGIN_S)
            self._going_away = True
            self._wish_changed.set()  # wakes the watcher
        self._owner.connection_event(event)

    async def _watch(self, conn: RealtimeConnection) -> None:
        """Close the connection when it is no longer wanted, or for a rollover."""
        deadline = time.monotonic() + self._rollover_s
        self._going_away = False
        while self._wanted.is_set():
            now = time.monotonic()
            if self._going_away and (self._owner.between_turns() or now >= self._going_away_by):
                self._rollover_pending = True
                break
            if now >= deadline:
                if self._owner.between_turns():
                    log.info("rolling the session over before the provider's limit")
                    self._rollover_pending = True
                    break
                deadline = now + 1.0  # mid-turn: look again shortly
            wake = deadline
            if self._going_away:
                wake = min(wake, self._going_away_by, now + GOING_AWAY_POLL_S)
            await self._wait_for_wish(wake - now)
        await conn.close()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake early when the wish changes."""
        wanted = self._wanted.is_set()
        deadline = time.monotonic() + seconds
        while self._wanted.is_set() == wanted and time.monotonic() < deadline:
            await self._wait_for_wish(deadline - time.monotonic())

    async def _wait_for_wish(self, timeout_s: float) -> None:
        # Callers re-check the wish after this returns; clearing first and
        # checking after keeps a want() (or a GoingAway) from being missed.
        self._wish_changed.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, timeout_s)):
                await self._wish_changed.wait()

    def _set_status(self, status: RealtimeStatus) -> None:
        self.status = status
        if status in (RealtimeStatus.IDLE, RealtimeStatus.ERROR):
            self.settled.set()
        else:
            self.settled.clear()
        self._owner.connection_status(status, self.error)
