"""Validate client events against the ``openai`` package's Realtime (GA) models.

The ``openai`` SDK ships pydantic models generated from the provider's OpenAPI spec.
Those models *allow* extra fields, so a misspelled or beta-shaped key (``modalities``,
``input_audio_format``, top-level ``turn_detection``...) would slip through plain
validation. :func:`validate_client_event` therefore also walks the parsed model and
rejects any non-empty ``model_extra``, reporting the dotted path of the offending key,
as the real service does (``Unknown parameter: 'session.modalities'``).

``openai`` is a test dependency, not a runtime one: it is imported lazily. When it is
not installed, :func:`validate_client_event` only checks that the event is a JSON object
with a string ``type`` (see :func:`openai_available`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["ClientEventInvalid", "openai_available", "validate_client_event"]


class ClientEventInvalid(ValueError):
    """A client event the real service would reject.

    ``code`` and ``param`` mirror the provider's ``error`` event fields
    (``unknown_parameter`` / ``invalid_value`` / ``invalid_type`` /
    ``missing_required_parameter``; ``param`` is a dotted path such as
    ``session.modalities``).
    """

    def __init__(self, message: str, *, code: str = "invalid_value", param: str | None = None):
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param


@functools.cache
def _adapter() -> Any | None:
    """The pydantic TypeAdapter for client events, or None without ``openai``."""
    try:
        from typing import Annotated

        from openai.types.realtime import RealtimeClientEvent
        from pydantic import Field, TypeAdapter
    except ImportError:
        # Normal outside the test suite (the demo's fake server): not worth a warning.
        logger.debug("openai package not installed: client events are not validated")
        return None
    return TypeAdapter(Annotated[RealtimeClientEvent, Field(discriminator="type")])


def openai_available() -> bool:
    """True when the ``openai`` models are importable (full validation is active)."""
    return _adapter() is not None


def validate_client_event(event: Mapping[str, Any]) -> None:
    """Raise :class:`ClientEventInvalid` if ``event`` is not a valid GA client event.

    Checks the event against ``openai.types.realtime.RealtimeClientEvent`` and rejects
    unknown keys at any depth. Without ``openai`` installed only the basic shape
    (a mapping with a string ``type``) is checked.
    """
    if not isinstance(event, Mapping):
        raise ClientEventInvalid("Event must be a JSON object.", code="invalid_type")
    if not isinstance(event.get("type"), str):
        raise ClientEventInvalid(
            "Missing required parameter: 'type'.", code="missing_required_parameter", param="type"
        )
    adapter = _adapter()
    if adapter is None:
        return
    from pydantic import ValidationError

    try:
        model = adapter.validate_python(dict(event))
    except ValidationError as exc:
        raise from_validation_error(exc, event) from exc
    for path in _extra_paths(model, ()):
        dotted = _dotted(path)
        raise ClientEventInvalid(
            f"Unknown parameter: '{dotted}'.", code="unknown_parameter", param=dotted
        )


def _extra_paths(value: Any, path: tuple[str | int, ...]) -> Iterator[tuple[str | int, ...]]:
    """Yield the path of every key that landed in a ``model_extra``, depth first."""
    from pydantic import BaseModel

    if isinstance(value, BaseModel):
        for key in value.model_extra or {}:
            yield (*path, key)
        for name in type(value).model_fields:
            yield from _extra_paths(getattr(value, name), (*path, name))
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _extra_paths(item, (*path, str(key)))
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        for index, item in enumerate(value):
            yield from _extra_paths(item, (*path, index))


def _dotted(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def from_validation_error(exc: Any, event: Mapping[str, Any]) -> ClientEventInvalid:
    """Turn the first pydantic error into the provider's error vocabulary."""
    error = exc.errors()[0]
    path = _input_path(error["loc"], event)
    dotted = _dotted(path) or "type"
    kind = str(error["type"])
    if kind == "union_tag_invalid":
        return ClientEventInvalid(
            f"Invalid value: '{event.get('type')}'. Unknown client event type.",
            code="invalid_value",
            param="type",
        )
    if kind == "missing":
        return ClientEventInvalid(
            f"Missing required parameter: '{dotted}'.",
            code="missing_required_parameter",
            param=dotted,
        )
    code = "invalid_value" if kind.startswith(("literal", "enum", "union")) else "invalid_type"
    return ClientEventInvalid(f"Invalid '{dotted}': {error['msg']}.", code=code, param=dotted)


def _input_path(loc: Sequence[str | int], event: Mapping[str, Any]) -> list[str | int]:
    """Map a pydantic ``loc`` (which names union branches) onto keys of the input."""
    path: list[str | int] = []
    current: Any = event
    for index, part in enumerate(loc):
        in_mapping = isinstance(current, Mapping) and part in current
        in_list = isinstance(current, list) and isinstance(part, int) and part < len(current)
        if in_mapping or in_list:
            path.append(part)
            current = current[part]
        elif index == len(loc) - 1 and isinstance(part, str) and isinstance(current, Mapping):
            path.append(part)  # a missing key: pydantic names it, the input lacks it
    return path
