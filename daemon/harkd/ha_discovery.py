"""Home Assistant MQTT discovery: one device-based config message per daemon.

Pure functions only (no I/O): the MQTT bridge publishes what `discovery_config`
returns, retained, on `discovery_topic(...)`. Home Assistant then creates one device
with the entities of DESIGN.md ("MQTT contract").
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, metadata
from typing import Any

from .config import DeviceConfig
from .messages import RealtimeMode, RealtimeStatus

__all__ = [
    "AVAILABLE",
    "NOT_AVAILABLE",
    "discovery_config",
    "discovery_topic",
    "package_info",
]

AVAILABLE = "online"
NOT_AVAILABLE = "offline"
# Home Assistant's text entity refuses longer values; sensors cap their state alike.
_HA_MAX_STATE = 255


def discovery_topic(prefix: str, device_id: str) -> str:
    """The retained config topic of this device."""
    return f"{prefix}/device/harkd_{device_id}/config"


def package_info() -> tuple[str, str | None]:
    """harkd's installed version and its first project URL (None when undeclared)."""
    try:
        meta = metadata("harkd")
    except PackageNotFoundError:
        return "0+unknown", None
    # `Project-URL` entries read "Label, https://..."; `Home-page` is the legacy field.
    urls = [u.split(",", 1)[-1].strip() for u in meta.get_all("Project-URL") or []]
    urls += meta.get_all("Home-page") or []
    return meta["Version"], urls[0] if urls else None


def discovery_config(
    device: DeviceConfig,
    base: str,
    sw_version: str,
    support_url: str | None = None,
    *,
    wake_words: Sequence[str] = (),
) -> dict[str, Any]:
    """The device-based discovery payload for the device whose topics start at `base`.

    `wake_words` (those configured, when the wake word is on) adds the "Wake word"
    event, whose event types are the words and `command` (`cmd/listen`).

    `base` is `<base_topic>/<device.id>`. Every component has a `unique_id` that
    depends only on the device id, so entities survive restarts and renames.
    """
    ident = f"harkd_{device.id}"
    origin: dict[str, Any] = {"name": "harkd", "sw_version": sw_version}
    if support_url:
        origin["support_url"] = support_url

    def component(key: str, platform: str, name: str, **options: Any) -> dict[str, Any]:
        return {
            "platform": platform,
            "name": name,
            "unique_id": f"{ident}_{key}",
            # object_id for Home Assistant before 2025.10, default_entity_id after
            # (object_id is deprecated there); both yield e.g. sensor.kitchen_status.
            "object_id": f"{device.id}_{key}",
            "default_entity_id": f"{platform}.{device.id}_{key}",
            **options,
        }

    def transcript(role: str) -> dict[str, Any]:
        topic = f"{base}/transcript/{role}"
        return component(
            f"last_{role}_transcript",
            "sensor",
            f"Last {role} transcript",
            state_topic=topic,
            value_template=f"{{{{ value_json.text[:{_HA_MAX_STATE}] }}}}",
            json_attributes_topic=topic,
            icon="mdi:account-voice" if role == "user" else "mdi:robot",
        )

    components = {
        "status": component(
            "status",
            "sensor",
            "Status",
            state_topic=f"{base}/status",
            device_class="enum",
            options=[s.value for s in RealtimeStatus],
            entity_category="diagnostic",
            icon="mdi:lan-connect",
        ),
        "mode": component(
            "mode",
            "sensor",
            "Mode",
            state_topic=f"{base}/mode",
            device_class="enum",
            options=[m.value for m in RealtimeMode],
            icon="mdi:account-voice",
        ),
        "last_user_transcript": transcript("user"),
        "last_assistant_transcript": transcript("assistant"),
        "listen": component(
            "listen",
            "button",
            "Listen",
            command_topic=f"{base}/cmd/listen",
            icon="mdi:microphone-message",
        ),
        "interrupt": component(
            "interrupt",
            "button",
            "Interrupt",
            command_topic=f"{base}/cmd/interrupt",
            icon="mdi:hand-back-left",
        ),
        "mic_mute": component(
            "mic_mute",
            "switch",
            "Microphone mute",
            state_topic=f"{base}/mic_mute",
            command_topic=f"{base}/cmd/mic_mute",
            payload_on="ON",
            payload_off="OFF",
            icon="mdi:microphone-off",
        ),
        "volume": component(
            "volume",
            "number",
            "Volume",
            state_topic=f"{base}/volume",
            command_topic=f"{base}/cmd/volume",
            min=0,
            max=100,
            step=1,
            mode="slider",
            unit_of_measurement="%",
            icon="mdi:volume-high",
        ),
        "send_text": component(
            "send_text",
            "text",
            "Send text",
            command_topic=f"{base}/cmd/text",
            max=_HA_MAX_STATE,
            icon="mdi:message-text",
        ),
        # notify.send_message speaks the message: "the washing machine is done".
        "announce": component(
            "announce",
            "notify",
            "Announce",
            command_topic=f"{base}/cmd/announce",
            icon="mdi:bullhorn",
        ),
    }
    if wake_words:
        components["wake_word"] = component(
            "wake_word",
            "event",
            "Wake word",
            state_topic=f"{base}/wake",
            event_types=[*wake_words, "command"],
            # Home Assistant wants the type in `event_type`; the rest become attributes.
            value_template=(
                '{{ {"event_type": value_json.word, "score": value_json.score, '
                '"level": value_json.level, "answered": value_json.answered} | to_json }}'
            ),
            icon="mdi:account-voice",
        )
    return {
        "device": {
            "identifiers": [ident],
            "name": device.name,
            "manufacturer": "harkd",
            "model": "harkd voice daemon",
            "sw_version": sw_version,
        },
        "origin": origin,
        "availability": [
            {
                "topic": f"{base}/availability",
                "payload_available": AVAILABLE,
                "payload_not_available": NOT_AVAILABLE,
            }
        ],
        "qos": 1,
        "components": components,
    }
