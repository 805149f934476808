"""`harkd monitor`: a live terminal view of one or all harkd devices, over MQTT.

Reads only the public MQTT contract (DESIGN.md), so it works against any daemon on the
broker, local or not. `apply` (message -> view) and `render` (views -> text) are pure;
`run_monitor` only moves messages from paho's thread to them and to the terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from .arbitration import CLAIM_TOPIC, Claim
from .config import MqttConfig
from .mqtt import make_client

__all__ = ["DeviceView", "apply", "render", "run_monitor"]

logger = logging.getLogger(__name__)

REDRAW_INTERVAL_S = 0.1
LEVELS_STALE_S = 3.0
"""Without a level message for this long, a device shows "levels off"."""
TOOL_CALLS_SHOWN = 3
BAR_WIDTH = 20
_MAX_PENDING = 10_000
_CLEAR = "\x1b[H\x1b[2J"


@dataclass
class DeviceView:
    """What the monitor knows about one device."""

    device_id: str
    availability: str | None = None
    status: str | None = None
    mode: str | None = None
    mic_mute: str | None = None
    volume: str | None = None
    partial: dict[str, str] = field(default_factory=dict)
    final: dict[str, str] = field(default_factory=dict)
    tool_calls: deque[str] = field(default_factory=lambda: deque(maxlen=TOOL_CALLS_SHOWN))
    error: str | None = None
    wake: str | None = None
    """The last wake word heard, as a line."""
    claim: str | None = None
    """Its last claim to answer a wake word (arbitration), as a line."""
    levels: tuple[float, float] | None = None
    levels_at: float | None = None
    """time.monotonic() of the last level message."""


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None


def _text(payload: bytes) -> str:
    return payload.decode("utf-8", "replace")


def _tool_line(data: Any) -> str:
    if not isinstance(data, dict):
        return "?"
    result = f"error: {data['error']}" if "error" in data else json.dumps(data.get("output"))
    return f"{data.get('name')}({data.get('arguments', '')}) -> {result}"


def _wake_line(data: dict[str, Any]) -> str:
    answered = "answered" if data.get("answered") else "not answered"
    with contextlib.suppress(TypeError, ValueError):
        return (
            f"{data.get('word')} score {float(data['score']):.2f} "
            f"level {float(data['level']):.3f} ({answered})"
        )
    return f"{data.get('word')} ({answered})"


def _claim(devices: dict[str, DeviceView], payload: bytes) -> str | None:
    try:
        claim = Claim.from_json(payload)
    except ValueError:
        return None
    view = devices.setdefault(claim.device, DeviceView(claim.device))
    view.claim = f"{claim.word} level {claim.level:.3f} score {claim.score:.2f}"
    return f"{claim.device} claims {view.claim}"


def apply(
    devices: dict[str, DeviceView],
    base_topic: str,
    topic: str,
    payload: bytes,
    now: float | None = None,
) -> str | None:
    """Fold one message into `devices`; return a one-line description, or None.

    None means nothing worth a line (level meters, unknown topics, full messages).
    """
    if topic == f"{base_topic}/{CLAIM_TOPIC}":
        return _claim(devices, payload)
    parts = topic.removeprefix(f"{base_topic}/").split("/", 1)
    if not topic.startswith(f"{base_topic}/") or len(parts) != 2:
        return None
    device_id, sub = parts
    view = devices.setdefault(device_id, DeviceView(device_id))
    text = _text(payload)
    if sub in ("availability", "status", "mode", "mic_mute", "volume"):
        setattr(view, sub, text)
        return f"{device_id} {sub}: {text}"
    if sub in ("transcript/user", "transcript/assistant"):
        role = sub.split("/")[1]
        data = _json(payload)
        if not isinstance(data, dict):
            return None
        view.final[role] = str(data.get("text", ""))
        view.partial.pop(role, None)
        cut = " [interrupted]" if data.get("interrupted") else ""
        return f"{device_id} {role}: {view.final[role]}{cut}"
    if sub in ("transcript/user/partial", "transcript/assistant/partial"):
        role = sub.split("/")[1]
        data = _json(payload)
        if not isinstance(data, dict):
            return None
        view.partial[role] = str(data.get("text", ""))
        return f"{device_id} {role} ...: {view.partial[role]}"
    if sub == "tool_call":
        line = _tool_line(_json(payload))
        view.tool_calls.append(line)
        return f"{device_id} tool: {line}"
    if sub == "wake":
        data = _json(payload)
        if not isinstance(data, dict):
            return None
        view.wake = _wake_line(data)
        return f"{device_id} wake: {view.wake}"
    if sub == "error":
        data = _json(payload)
        if not payload:
            view.error = None
            return f"{device_id} error cleared"
        if isinstance(data, dict):
            view.error = f"{data.get('code')}: {data.get('message')}"
            return f"{device_id} error: {view.error}"
        return None
    if sub == "audio/level":
        data = _json(payload)
        if isinstance(data, dict):
            with contextlib.suppress(TypeError, ValueError):
                view.levels = (float(data["input"]), float(data["output"]))
                view.levels_at = time.monotonic() if now is None else now
        return None
    return None


def _bar(level: float) -> str:
    filled = round(max(0.0, min(1.0, level)) * BAR_WIDTH)
    return "[" + "#" * filled + "-" * (BAR_WIDTH - filled) + f"] {level:4.2f}"


def _cut(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def render(devices: Mapping[str, DeviceView], now: float | None = None) -> str:
    """The whole screen for `devices` (sorted by id); `now` is time.monotonic()."""
    if not devices:
        return "waiting for harkd devices ...\n"
    now = time.monotonic() if now is None else now
    blocks: list[str] = []
    for device_id in sorted(devices):
        v = devices[device_id]
        offline = " (offline)" if v.availability == "offline" else ""
        lines = [
            f"== {device_id}{offline} ==",
            f"  status {v.status or '?'}   mode {v.mode or '?'}   "
            f"mic {'muted' if v.mic_mute == 'ON' else 'on' if v.mic_mute else '?'}   "
            f"volume {v.volume or '?'}",
        ]
        fresh = v.levels_at is not None and now - v.levels_at <= LEVELS_STALE_S
        if v.levels is not None and fresh:
            lines.append(f"  in  {_bar(v.levels[0])}")
            lines.append(f"  out {_bar(v.levels[1])}")
        else:
            lines.append("  levels off")
        for role in ("user", "assistant"):
            if role in v.partial:
                lines.append(f"  {role:9} ... {_cut(v.partial[role])}")
            elif role in v.final:
                lines.append(f"  {role:9} {_cut(v.final[role])}")
        if v.claim:
            lines.append(f"  claim     {v.claim}")
        if v.wake:
            lines.append(f"  wake      {v.wake}")
        lines.extend(f"  tool      {_cut(call)}" for call in v.tool_calls)
        if v.error:
            lines.append(f"  error     {_cut(v.error)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


async def run_monitor(
    mqtt: MqttConfig,
    password: str | None,
    device_id: str | None,
    out: TextIO | None = None,
) -> None:
    """Show one device (`device_id`) or all devices on the broker until cancelled.

    `out` defaults to sys.stdout. On a TTY the screen is redrawn at most 10 times a
    second; otherwise every event is printed as one line (logs, pipes, tests).
    """
    out = sys.stdout if out is None else out
    tty = out.isatty()
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, bytes] | str] = asyncio.Queue(_MAX_PENDING)
    topic_filter = f"{mqtt.base_topic}/{device_id or '+'}/#"
    where = f"{mqtt.host}:{mqtt.port}"

    def post(item: tuple[str, bytes] | str) -> None:
        try:
            inbox.put_nowait(item)
        except asyncio.QueueFull:
            logger.warning("monitor falling behind; dropping a message")

    def handoff(item: tuple[str, bytes] | str) -> None:
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(post, item)

    def on_connect(client: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        if reason.is_failure:
            handoff(f"broker {where} refused the connection: {reason}")
        else:
            client.subscribe(topic_filter, qos=0)
            handoff(f"connected to {where}, watching {topic_filter}")

    client = make_client(mqtt, password, f"harkd-monitor-{uuid.uuid4().hex[:8]}")
    client.on_connect = on_connect
    client.on_connect_fail = lambda *_: handoff(f"broker {where} unreachable, retrying")
    client.on_message = lambda _c, _u, msg: handoff((msg.topic, bytes(msg.payload)))
    client.connect_async(mqtt.host, mqtt.port)
    client.loop_start()

    devices: dict[str, DeviceView] = {}
    header = f"harkd monitor: connecting to {where}"
    dirty, last_draw = True, 0.0
    try:
        while True:
            try:
                async with asyncio.timeout(REDRAW_INTERVAL_S if tty else None):
                    item = await inbox.get()
            except TimeoutError:
                item = None
            if isinstance(item, str):
                header, dirty = f"harkd monitor: {item}", True
                if not tty:
                    out.write(header + "\n")
            elif item is not None:
                line = apply(devices, mqtt.base_topic, *item)
                dirty = True
                if line is not None and not tty:
                    out.write(line + "\n")
            since = loop.time() - last_draw
            # Redraw on news, at most 10 times a second; once a second regardless so
            # meters of a device that went quiet turn into "levels off".
            if tty and ((dirty and since >= REDRAW_INTERVAL_S) or since >= 1.0):
                out.write(f"{_CLEAR}{header}\n\n{render(devices)}")
                dirty, last_draw = False, loop.time()
            out.flush()
    finally:
        client.disconnect()
        await asyncio.to_thread(client.loop_stop)
