"""Built-in plugin `timers`: set, list and cancel kitchen timers.

When a timer finishes the assistant announces it (`ctx.announce`) and, with MQTT enabled,
`B/timer/finished` gets JSON `{"id", "label", "duration_s"}` (QoS 1, not retained).
Running timers are kept in `<state_dir>/plugins/timers/timers.json` with their wall-clock
due time, so they survive a restart; one that came due while the daemon was down
fires as soon as it is back. No options.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from harkd.plugins import PluginContext, reject_unknown_options
from harkd.tools import Tool, ToolCall, ToolError

MAX_DURATION_S = 86400
# The wall clock may jump (a Raspberry Pi has no RTC and syncs by NTP after boot), so a
# long wait is re-checked against it at least this often.
_RECHECK_S = 30.0
# A timer later than this was missed while the daemon was down: say so.
_LATE_S = 60.0


@dataclass
class _Timer:
    id: str
    label: str
    duration_s: float
    due: float
    """Wall-clock due time (Unix seconds): it must mean the same after a restart."""


def plugin(options: dict[str, Any], ctx: PluginContext) -> list[Tool]:
    """Offer `set_timer`, `list_timers` and `cancel_timer`; run the timers in the background."""
    reject_unknown_options(options, ())
    timers = Timers(ctx)
    ctx.background(timers.run, "timers")
    return timers.tools()


class Timers:
    """The running timers of one daemon, persisted on every change."""

    def __init__(self, ctx: PluginContext, clock: Callable[[], float] = time.time) -> None:
        self._ctx = ctx
        self._clock = clock
        self._path = ctx.state_dir / "timers.json"
        self._timers: dict[str, _Timer] = {}
        self._next_id = 1
        self._changed = asyncio.Event()
        self._load()

    def tools(self) -> list[Tool]:
        """The three tools, bound to these timers."""
        return [
            Tool(
                name="set_timer",
                description=(
                    "Start a countdown timer. When it finishes the user is told "
                    "'Your <label> timer is done'. Give the duration in seconds."
                ),
                parameters={
                    "type": "object",
                    "properties": {
                        "duration_s": {
                            "type": "number",
                            "exclusiveMinimum": 0,
                            "maximum": MAX_DURATION_S,
                            "description": "How long, in seconds (e.g. 300 for 5 minutes).",
                        },
                        "label": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": 80,
                            "description": "What it is for, e.g. 'pasta'. Optional.",
                        },
                    },
                    "required": ["duration_s"],
                    "additionalProperties": False,
                },
                handler=self._set,
                timeout_s=5.0,
            ),
            Tool(
                name="list_timers",
                description="List the running timers with the seconds each has left.",
                parameters={"type": "object", "properties": {}, "additionalProperties": False},
                handler=self._list,
                timeout_s=5.0,
            ),
            Tool(
                name="cancel_timer",
                description="Cancel a running timer, by its id or by its label.",
                parameters={
                    "type": "object",
                    "properties": {
                        "id": {"type": "string", "minLength": 1},
                        "label": {"type": "string", "minLength": 1},
                    },
                    "anyOf": [{"required": ["id"]}, {"required": ["label"]}],
                    "additionalProperties": False,
                },
                handler=self._cancel,
                timeout_s=5.0,
            ),
        ]

    async def run(self) -> None:
        """Fire timers as they come due, until cancelled (the daemon's background task)."""
        while True:
            self._fire_due()
            delay = self._next_delay()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if delay is None else min(delay, _RECHECK_S)):
                    await self._changed.wait()

    # ---- tools

    async def _set(self, args: dict[str, Any], call: ToolCall) -> dict[str, Any]:
        duration_s: float = args["duration_s"]
        label = str(args.get("label") or _spoken_duration(duration_s)).strip()
        timer = _Timer(str(self._next_id), label, duration_s, self._clock() + duration_s)
        self._next_id += 1
        self._timers[timer.id] = timer
        self._save()
        self._changed.set()
        self._ctx.logger.info("timer %s (%s) set for %g s", timer.id, label, duration_s)
        return {**self._describe(timer), "due": _local_time(timer.due)}

    async def _list(self, args: dict[str, Any], call: ToolCall) -> dict[str, Any]:
        running = sorted(self._timers.values(), key=lambda t: t.due)
        return {"timers": [self._describe(t) for t in running]}

    async def _cancel(self, args: dict[str, Any], call: ToolCall) -> dict[str, Any]:
        wanted_id, wanted_label = args.get("id"), args.get("label")
        matches = [
            t
            for t in self._timers.values()
            if t.id == wanted_id or (wanted_label and t.label.casefold() == wanted_label.casefold())
        ]
        if not matches:
            raise ToolError(
                f"no running timer with {_which(wanted_id, wanted_label)}"
                f" (running: {self._summary()})"
            )
        for timer in matches:
            del self._timers[timer.id]
            self._ctx.logger.info("timer %s (%s) cancelled", timer.id, timer.label)
        self._save()
        self._changed.set()
        return {"cancelled": [self._describe(t) for t in matches]}

    # ---- firing

    def _fire_due(self) -> None:
        now = self._clock()
        due = sorted((t for t in self._timers.values() if t.due <= now), key=lambda t: t.due)
        if not due:
            return
        for timer in due:
            del self._timers[timer.id]
        # Saved first: a crash while announcing must not fire the timer again on restart.
        try:
            self._save()
        except OSError:
            self._ctx.logger.exception("could not save %s", self._path)
        for timer in due:
            self._announce(timer, late=now - timer.due > _LATE_S)

    def _announce(self, timer: _Timer, *, late: bool) -> None:
        self._ctx.logger.info("timer %s (%s) finished", timer.id, timer.label)
        text = f"Your {timer.label} timer is done."
        if late:
            text = (
                f"Your {timer.label} timer finished at {_local_time(timer.due)}, "
                "while I was not running."
            )
        try:
            self._ctx.announce(text)
        except Exception:
            self._ctx.logger.exception("could not announce timer %s", timer.id)
        if not self._ctx.mqtt_enabled:
            return
        payload = json.dumps({"id": timer.id, "label": timer.label, "duration_s": timer.duration_s})
        try:
            self._ctx.publish(f"{self._ctx.base_topic}/timer/finished", payload, qos=1)
        except Exception:
            self._ctx.logger.exception("could not publish timer %s", timer.id)

    def _next_delay(self) -> float | None:
        if not self._timers:
            return None
        return max(0.0, min(t.due for t in self._timers.values()) - self._clock())

    # ---- helpers

    def _describe(self, timer: _Timer) -> dict[str, Any]:
        remaining = max(0.0, timer.due - self._clock())
        return {
            "id": timer.id,
            "label": timer.label,
            "duration_s": timer.duration_s,
            "remaining_s": round(remaining, 1),
        }

    def _summary(self) -> str:
        return ", ".join(f"{t.id} ({t.label})" for t in self._timers.values()) or "none"

    def _load(self) -> None:
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
            timers = [_Timer(**entry) for entry in data["timers"]]
            next_id = int(data["next_id"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Better to start empty than to refuse to start; the file is rewritten on change.
            self._ctx.logger.warning("ignoring unreadable %s: %s", self._path, exc)
            return
        self._timers = {t.id: t for t in timers}
        self._next_id = next_id
        if timers:
            self._ctx.logger.info("restored %d running timer(s) from %s", len(timers), self._path)

    def _save(self) -> None:
        data = {"next_id": self._next_id, "timers": [asdict(t) for t in self._timers.values()]}
        _write_atomic(self._path, json.dumps(data, indent=1))


def _write_atomic(path: Path, text: str) -> None:
    # A power cut leaves either the old file or the new one, never half of one.
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _spoken_duration(seconds: float) -> str:
    """300 -> "5 minute", 5400 -> "1 hour 30 minute": reads well in "Your ... timer"."""
    total = round(seconds)
    if total < 1:
        return f"{seconds:g} second"
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{n} {unit}" for n, unit in ((hours, "hour"), (minutes, "minute"), (secs, "second"))]
    return " ".join(p for p, n in zip(parts, (hours, minutes, secs), strict=True) if n)


def _local_time(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s).astimezone().strftime("%H:%M")


def _which(timer_id: Any, label: Any) -> str:
    if timer_id and label:
        return f"id {timer_id!r} or label {label!r}"
    return f"id {timer_id!r}" if timer_id else f"label {label!r}"
