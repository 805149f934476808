"""Telling subscribers: state snapshots after a change, and client events as they happen.

The seed's single-purpose callbacks (`on_message`, `on_error`, `on_status_change`,
`on_mode_change`) and any number of `on_state_change` / `on_event` subscribers. A
subscriber's bug is logged and must not break the conversation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

from harkd.messages import (
    ClientEvent,
    MessageFinalized,
    RealtimeError,
    RealtimeMessage,
    RealtimeMode,
    RealtimeState,
    RealtimeStatus,
)

log = logging.getLogger(__name__)

StateCallback = Callable[[RealtimeState], None]
EventCallback = Callable[[ClientEvent], None]


class Subscribers:
    """Who hears about state changes and client events."""

    def __init__(
        self,
        initial: RealtimeState,
        *,
        on_message: Callable[[RealtimeMessage], None] | None = None,
        on_error: Callable[[RealtimeError], None] | None = None,
        on_status_change: Callable[[RealtimeStatus], None] | None = None,
        on_mode_change: Callable[[RealtimeMode], None] | None = None,
    ) -> None:
        self._last = initial
        self._on_message = on_message
        self._on_error = on_error
        self._on_status_change = on_status_change
        self._on_mode_change = on_mode_change
        self._states: list[StateCallback] = []
        self._events: list[EventCallback] = []

    def add_state(self, callback: StateCallback) -> Callable[[], None]:
        """Call `callback(state)` after every change; returns the unsubscribe function."""
        self._states.append(callback)
        return lambda: _discard(self._states, callback)

    def add_events(self, callback: EventCallback) -> Callable[[], None]:
        """Call `callback(event)` for each client event; returns the unsubscribe function."""
        self._events.append(callback)
        return lambda: _discard(self._events, callback)

    def clear(self) -> None:
        """Forget every subscriber (the client is destroyed)."""
        self._states.clear()
        self._events.clear()

    def emit(self, event: ClientEvent) -> None:
        """A finalized message, a partial transcript, a tool call, usage..."""
        if isinstance(event, MessageFinalized) and self._on_message is not None:
            _safely(self._on_message, event.message)
        for callback in list(self._events):
            _safely(callback, event)

    def changed(self, state: RealtimeState) -> None:
        """`state` is the newest snapshot: tell whoever cares what differs."""
        previous, self._last = self._last, state
        if state == previous:
            return
        if state.status != previous.status and self._on_status_change is not None:
            _safely(self._on_status_change, state.status)
        if state.mode != previous.mode and self._on_mode_change is not None:
            _safely(self._on_mode_change, state.mode)
        if state.error is not None and state.error is not previous.error and self._on_error:
            _safely(self._on_error, state.error)
        for callback in list(self._states):
            _safely(callback, state)


class Problems:
    """Parts failing right now: audio devices (it is their `DeviceListener`) and
    daemon parts being restarted. The oldest is shown as the client's error."""

    def __init__(self, changed: Callable[[], None]) -> None:
        self._changed = changed
        self._errors: dict[str, RealtimeError] = {}

    @property
    def first(self) -> RealtimeError | None:
        """The oldest current problem, if any."""
        return next(iter(self._errors.values()), None)

    def device_failed(self, device: str, message: str) -> None:
        """An audio device failed; the edge keeps retrying."""
        self._failed(device, RealtimeError("audio_device", f"{device}: {message}"))

    def device_recovered(self, device: str) -> None:
        """The device works again."""
        self.report_recovered(device)

    def report_failure(self, part: str, message: str) -> None:
        """A part of the daemon failed and is being restarted."""
        self._failed(part, RealtimeError("part_failed", f"{part}: {message}"))

    def report_recovered(self, part: str) -> None:
        """The part (or device) named in an earlier failure works again."""
        if self._errors.pop(part, None) is not None:
            self._changed()

    def _failed(self, part: str, error: RealtimeError) -> None:
        log.warning("%s", error.message)
        self._errors[part] = error
        self._changed()


def _discard(callbacks: list[Callable[..., None]], callback: Callable[..., None]) -> None:
    with contextlib.suppress(ValueError):
        callbacks.remove(callback)


def _safely(callback: Callable[..., None], *args: object) -> None:
    """A subscriber's bug must not break the conversation."""
    try:
        callback(*args)
    except Exception:
        log.exception("state subscriber %r failed", callback)
