"""Built-in plugin `clock`: the current time and date, so the assistant never guesses.

Options: `timezone` (an IANA name such as `Europe/Berlin`; default: the system's).
"""

from __future__ import annotations

import os
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from harkd.plugins import PluginConfigError, PluginContext, reject_unknown_options
from harkd.tools import Tool, ToolCall

# English on purpose: strftime("%A") follows the process locale, the model wants one language.
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def plugin(options: dict[str, Any], ctx: PluginContext) -> list[Tool]:
    """Offer `get_time`."""
    reject_unknown_options(options, {"timezone"})
    zone = _zone(options.get("timezone"))
    zone_name = options.get("timezone") or _local_zone_name()

    async def get_time(args: dict[str, Any], call: ToolCall) -> dict[str, str]:
        # No zone configured: astimezone() follows the system zone, DST changes included.
        now = datetime.now(zone) if zone is not None else datetime.now().astimezone()
        return {
            "time": now.strftime("%H:%M"),
            "date": now.date().isoformat(),
            "weekday": _WEEKDAYS[now.weekday()],
            "timezone": zone_name or now.tzname() or "local",
            "iso": now.isoformat(timespec="seconds"),
        }

    ctx.logger.debug("time zone %s", zone_name or "system local")
    return [
        Tool(
            name="get_time",
            description="Get the current local time, date and weekday.",
            parameters={"type": "object", "properties": {}, "additionalProperties": False},
            handler=get_time,
            timeout_s=2.0,
        )
    ]


def _zone(name: Any) -> tzinfo | None:
    if name is None:
        return None
    if not isinstance(name, str) or not name:
        raise PluginConfigError(f"expected an IANA time zone name, got {name!r}", "timezone")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise PluginConfigError(
            f"unknown time zone {name!r} (expected an IANA name such as Europe/Berlin)",
            "timezone",
        ) from None


def _local_zone_name() -> str | None:
    """The system zone's IANA name from $TZ or the /etc/localtime link, if it has one."""
    if tz := os.environ.get("TZ", "").lstrip(":"):
        return tz
    try:
        target = str(Path("/etc/localtime").resolve(strict=True))
    except OSError:
        return None
    _, found, name = target.partition("zoneinfo/")
    return name if found and name else None
