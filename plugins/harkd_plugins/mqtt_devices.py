"""Built-in plugin `mqtt`: let the assistant drive MQTT devices (zigbee2mqtt, Tasmota...).

Options:

```yaml
plugins:
  mqtt:
    allow: ["zigbee2mqtt/+/set", "zigbee2mqtt/+"]   # required: topic filters (+ and #)
    read_timeout_s: 2                                # how long a read waits for a first value
```

`mqtt_publish` publishes only to topics matching `allow`; `mqtt_read_state` returns the
last payload seen (retained or live) on an allowed topic. Everything else is refused
with an error result. Needs `mqtt.enabled`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harkd.plugins import PluginConfigError, PluginContext, reject_unknown_options
from harkd.tools import Tool, ToolCall, ToolError


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether `topic` matches the MQTT `topic_filter` (MQTT 3.1.1 section 4.7).

    `+` matches exactly one level (possibly empty), `#` (last) any number of levels
    including none (`a/#` matches `a`). Wildcards at the first level never match a topic
    starting with `$` (`$SYS/...`).
    """
    filter_levels = topic_filter.split("/")
    topic_levels = topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for i, level in enumerate(filter_levels):
        if level == "#":
            return True
        if i >= len(topic_levels):
            return False
        if level != "+" and level != topic_levels[i]:
            return False
    return len(filter_levels) == len(topic_levels)


def filter_problem(topic_filter: str) -> str | None:
    """Why `topic_filter` is not a valid MQTT topic filter, or None."""
    if not topic_filter:
        return "must not be empty"
    if "\0" in topic_filter:
        return "must not contain NUL"
    levels = topic_filter.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level, and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def topic_problem(topic: str) -> str | None:
    """Why `topic` cannot be published to, or None."""
    if not topic:
        return "must not be empty"
    if "\0" in topic:
        return "must not contain NUL"
    if "+" in topic or "#" in topic:
        return "must not contain wildcards (+ or #)"
    return None


@dataclass(frozen=True)
class _Seen:
    payload: bytes
    retained: bool


def plugin(options: dict[str, Any], ctx: PluginContext) -> list[Tool]:
    """Offer `mqtt_publish` and `mqtt_read_state`, limited to the `allow` filters."""
    reject_unknown_options(options, {"allow", "read_timeout_s"})
    allow = _allow_option(options.get("allow"))
    read_timeout_s = options.get("read_timeout_s", 2)
    if isinstance(read_timeout_s, bool) or not isinstance(read_timeout_s, int | float):
        raise PluginConfigError(f"expected a number, got {read_timeout_s!r}", "read_timeout_s")
    if not 0 < read_timeout_s <= 30:
        raise PluginConfigError(f"must be in (0, 30], got {read_timeout_s!r}", "read_timeout_s")
    devices = MqttDevices(ctx, allow, float(read_timeout_s))
    devices.subscribe()
    return devices.tools()


def _allow_option(value: Any) -> tuple[str, ...]:
    if value is None:
        raise PluginConfigError(
            "required: a list of MQTT topic filters the assistant may use", "allow"
        )
    if not isinstance(value, list) or not value:
        raise PluginConfigError(
            f"expected a non-empty list of topic filters, got {value!r}", "allow"
        )
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise PluginConfigError(f"expected a topic filter string, got {item!r}", f"allow.{i}")
        if problem := filter_problem(item):
            raise PluginConfigError(f"{item!r}: {problem}", f"allow.{i}")
    return tuple(value)


class MqttDevices:
    """The allowlist, the last payload seen per topic, and the two tools."""

    def __init__(self, ctx: PluginContext, allow: Sequence[str], read_timeout_s: float) -> None:
        self._ctx = ctx
        self.allow = tuple(allow)
        self._read_timeout_s = read_timeout_s
        self._seen: dict[str, _Seen] = {}
        self._waiting: dict[str, asyncio.Event] = {}

    def allowed(self, topic: str) -> bool:
        """Whether `topic` matches one of the `allow` filters."""
        return any(topic_matches(f, topic) for f in self.allow)

    def subscribe(self) -> None:
        """Subscribe to every allowed filter (the daemon keeps them across reconnects)."""
        for topic_filter in self.allow:
            self._ctx.subscribe(topic_filter, self.on_message)

    def on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        """Remember the last payload of `topic`; an empty retained one clears it."""
        if retained and not payload:
            self._seen.pop(topic, None)
            return
        self._seen[topic] = _Seen(payload, retained)
        if event := self._waiting.pop(topic, None):
            event.set()

    def tools(self) -> list[Tool]:
        """`mqtt_publish` and `mqtt_read_state`."""
        allowed = ", ".join(self.allow)
        return [
            Tool(
                name="mqtt_publish",
                description=(
                    "Publish an MQTT message to control a device, e.g. topic "
                    '\'zigbee2mqtt/kitchen_light/set\' with payload {"state": "ON"}. '
                    f"Allowed topics: {allowed}."
                ),
                parameters={
                    "type": "object",
                    "properties": {
                        "topic": {"type": "string", "minLength": 1},
                        "payload": {
                            "description": "A string, or a JSON object sent as JSON.",
                            "anyOf": [{"type": "string"}, {"type": "object"}],
                        },
                        "retain": {"type": "boolean", "default": False},
                    },
                    "required": ["topic", "payload"],
                    "additionalProperties": False,
                },
                handler=self._publish,
                timeout_s=5.0,
            ),
            Tool(
                name="mqtt_read_state",
                description=(
                    "Read the last known state (payload) of an MQTT topic, e.g. "
                    f"'zigbee2mqtt/kitchen_light'. Allowed topics: {allowed}."
                ),
                parameters={
                    "type": "object",
                    "properties": {"topic": {"type": "string", "minLength": 1}},
                    "required": ["topic"],
                    "additionalProperties": False,
                },
                handler=self._read_state,
                timeout_s=self._read_timeout_s + 1.0,
            ),
        ]

    async def _publish(self, args: dict[str, Any], call: ToolCall) -> dict[str, Any]:
        topic: str = args["topic"]
        self._check_topic(topic)
        payload = args["payload"]
        text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
        retain = bool(args.get("retain", False))
        self._ctx.publish(topic, text, qos=1, retain=retain)
        self._ctx.logger.info("published to %s (retain=%s)", topic, retain)
        return {"published": topic, "retain": retain}

    async def _read_state(self, args: dict[str, Any], call: ToolCall) -> dict[str, Any]:
        topic: str = args["topic"]
        self._check_topic(topic)
        seen = self._seen.get(topic)
        if seen is None:
            # Right after start the broker may still be sending retained messages.
            event = self._waiting.setdefault(topic, asyncio.Event())
            try:
                async with asyncio.timeout(self._read_timeout_s):
                    await event.wait()
            except TimeoutError:
                raise ToolError(
                    f"no state known for {topic} (nothing received in {self._read_timeout_s:g} s)"
                ) from None
            finally:
                if self._waiting.get(topic) is event and not event.is_set():
                    del self._waiting[topic]
            seen = self._seen.get(topic)
            if seen is None:  # cleared again (empty retained message) meanwhile
                raise ToolError(f"no state known for {topic}")
        return {"topic": topic, "payload": _decode(seen.payload), "retained": seen.retained}

    def _check_topic(self, topic: str) -> None:
        if problem := topic_problem(topic):
            raise ToolError(f"invalid topic {topic!r}: {problem}")
        if not self.allowed(topic):
            raise ToolError(f"topic not allowed: {topic} (allowed: {', '.join(self.allow)})")


def _decode(payload: bytes) -> Any:
    """JSON when it parses, else text (what the model reads best)."""
    text = payload.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text
