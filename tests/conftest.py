"""Fixtures shared across test files."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pulse_fixture import PulseServer, PulseUnavailable


@pytest.fixture(scope="session")
def pulse() -> Iterator[PulseServer]:
    """A private PulseAudio server whose null sink "room" stands in for a sound card."""
    try:
        server = PulseServer.start_new()
    except PulseUnavailable as exc:
        pytest.skip(f"PulseAudio cannot start here: {exc}")
    with server:
        yield server
