"""The Home Assistant configuration the tests run: written before its first start.

``configuration.yaml`` sets the location, units and the HTTP port; the integrations
come from config entries in ``.storage/core.config_entries``, as if added in the UI:

* ``demo`` without its YAML key, so only the demo platforms of its config entry load
  (lights, switches, ...), not the YAML extras (scripts, scenes, TTS, device trackers);
* ``mqtt`` pointing at the tests' private Mosquitto, with discovery on;
* ``mcp_server`` serving the Assist API at ``/api/mcp``.

The entry shapes are Home Assistant 2026.2's: mqtt writes version 1.2 (data holds the
broker, options the discovery settings), mcp_server keeps a list of LLM API ids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["DISCOVERY_PREFIX", "write_config"]

DISCOVERY_PREFIX = "homeassistant"
# The oldest storage format Home Assistant 2026.2 migrates on load: it fills in what
# later versions added (creation times, discovery keys, subentries) itself.
_CONFIG_ENTRIES_MINOR_VERSION = 1

CONFIGURATION_YAML = """\
homeassistant:
  name: harkd test home
  latitude: 52.52
  longitude: 13.40
  elevation: 34
  unit_system: metric
  time_zone: UTC
  country: DE
  currency: EUR
  language: en
http:
  server_host: 127.0.0.1
  server_port: {http_port}
logger:
  default: warning
  logs:
    # "Home Assistant initialized in ..." tells the tests it finished starting.
    homeassistant.bootstrap: info
    homeassistant.components.mqtt: info
    homeassistant.components.mcp_server: info
"""


def _entry(entry_id: str, domain: str, title: str, **fields: Any) -> dict[str, Any]:
    return {
        "entry_id": entry_id,
        "version": 1,
        "minor_version": 1,
        "domain": domain,
        "title": title,
        "data": {},
        "options": {},
        "source": "user",
        "unique_id": None,
        "disabled_by": None,
        "pref_disable_new_entities": False,
        "pref_disable_polling": False,
        **fields,
    }


def config_entries(mqtt_host: str, mqtt_port: int) -> list[dict[str, Any]]:
    """The config entries: demo, MQTT on the test broker, the MCP server on Assist."""
    return [
        _entry("harkdtestdemo0000000000000000001", "demo", "Demo", source="import"),
        _entry(
            "harkdtestmqtt0000000000000000001",
            "mqtt",
            mqtt_host,
            minor_version=2,
            data={"broker": mqtt_host, "port": mqtt_port},
            options={"discovery": True, "discovery_prefix": DISCOVERY_PREFIX},
        ),
        _entry(
            "harkdtestmcp00000000000000000001",
            "mcp_server",
            "Assist",
            data={"llm_hass_api": ["assist"]},
        ),
    ]


def write_config(
    config: Path, *, http_port: int, mqtt_port: int, mqtt_host: str = "127.0.0.1"
) -> None:
    """Write a fresh Home Assistant configuration folder at ``config``."""
    config.mkdir(parents=True, exist_ok=True)
    (config / "configuration.yaml").write_text(
        CONFIGURATION_YAML.format(http_port=http_port), encoding="utf-8"
    )
    storage = config / ".storage"
    storage.mkdir(exist_ok=True)
    entries = {
        "version": 1,
        "minor_version": _CONFIG_ENTRIES_MINOR_VERSION,
        "key": "core.config_entries",
        "data": {"entries": config_entries(mqtt_host, mqtt_port)},
    }
    (storage / "core.config_entries").write_text(json.dumps(entries, indent=2), encoding="utf-8")
