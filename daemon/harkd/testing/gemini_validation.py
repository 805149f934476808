"""Validation of Gemini Live messages against the `google-genai` package's models.

`LiveClientMessage` (pydantic, unknown fields forbidden, camelCase aliases, base64 bytes)
is the wire message the service takes. One gap of the SDK's model is bridged here: the
setup's `realtimeInputConfig` (activity detection, activity handling) is missing from
`LiveClientSetup`, although the SDK itself sends it there from
`LiveConnectConfig.realtime_input_config`; it is validated with that type
(`RealtimeInputConfig`) instead. The package is a test dependency, imported lazily:
without it (the demo's fake server) only a message's shape is checked.
"""

from __future__ import annotations

import functools
import json
import warnings
from collections.abc import Mapping
from typing import Any

MESSAGE_FIELDS = ("setup", "clientContent", "realtimeInput", "toolResponse", "contextUpdate")
"""A client message has exactly one of these (the protocol's `oneof`)."""


class ClientMessageInvalid(Exception):
    """A client message the real service would refuse; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@functools.cache
def genai_available() -> bool:
    """Whether `google-genai` is installed (the `test` extra)."""
    try:
        import google.genai.types  # noqa: F401
    except ImportError:
        return False
    return True


def validate_client_message(message: str | bytes | Mapping[str, Any]) -> dict[str, Any]:
    """The message as JSON data, if it is a valid Gemini Live client message.

    Raises `ClientMessageInvalid` otherwise (not JSON, not exactly one message field,
    an unknown or mistyped field anywhere, bad base64).
    """
    if isinstance(message, Mapping):
        data: Any = dict(message)
    else:
        try:
            data = json.loads(message)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ClientMessageInvalid(f"Invalid JSON payload received. {exc}") from None
    if not isinstance(data, dict):
        raise ClientMessageInvalid("Invalid JSON payload received. Expected an object.")
    present = [key for key in data if key in MESSAGE_FIELDS]
    if len(present) != 1 or len(data) != 1:
        names = ", ".join(sorted(data)) or "none"
        raise ClientMessageInvalid(f"A message needs exactly one of its fields (got: {names})")
    if genai_available():
        _check_fields(data)
    result: dict[str, Any] = data
    return result


def _check_fields(data: dict[str, Any]) -> None:
    from google.genai import types
    from pydantic import ValidationError

    setup = data.get("setup")
    try:
        with warnings.catch_warnings():
            # The SDK only warns of an enum value it does not know; the service refuses it.
            warnings.simplefilter("error", UserWarning)
            if isinstance(setup, dict) and "realtimeInputConfig" in setup:
                setup = dict(setup)
                config = setup.pop("realtimeInputConfig")
                types.RealtimeInputConfig.model_validate_json(json.dumps(config))
                data_without = {"setup": setup}
            else:
                data_without = data
            types.LiveClientMessage.model_validate_json(json.dumps(data_without))
    except UserWarning as exc:
        raise ClientMessageInvalid(f"Invalid value: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ClientMessageInvalid(
            f"Invalid JSON payload received. {where}: {first['msg']}"
        ) from None


def validate_server_message(message: Mapping[str, Any]) -> None:
    """Check a message the fake server is about to send against `LiveServerMessage`
    (the fake must speak the protocol it stands in for); `ValueError` if it does not."""
    if not genai_available():
        return
    from google.genai import types
    from pydantic import ValidationError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            types.LiveServerMessage.model_validate_json(json.dumps(message))
    except (ValidationError, UserWarning) as exc:
        raise ValueError(f"not a valid server message: {exc}") from None
