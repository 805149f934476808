"""The supervisor reports health truthfully: a crash loop keeps its error shown, and
no restart waits longer than the systemd watchdog allows."""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import pytest

from e2e import until
from harkd import service
from harkd.config import parse_config
from harkd.messages import RealtimeState
from harkd.service import Daemon, restart_ceiling_s
from harkd.systemd import watchdog_interval_s


def test_no_restart_wait_outlasts_a_watchdog_ping() -> None:
    # The shipped unit's WatchdogSec=30 gives a 15 s ping interval.
    unit = Path(__file__).parents[1] / "systemd" / "harkd.service"
    line = next(x for x in unit.read_text().splitlines() if x.startswith("WatchdogSec="))
    watchdog_usec = int(line.split("=", 1)[1]) * 1_000_000
    ping_s = watchdog_interval_s({"WATCHDOG_USEC": str(watchdog_usec)})
    assert ping_s is not None
    assert restart_ceiling_s(ping_s) < ping_s
    assert restart_ceiling_s(None) == service.RESTART_MAX_DELAY_S  # no watchdog: no cap


async def test_a_crash_loop_keeps_its_error_until_the_part_stays_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "RECOVERED_AFTER_S", 0.5)
    monkeypatch.setattr(service, "RESTART_MAX_DELAY_S", 0.05)
    monkeypatch.setattr(service, "watchdog_interval_s", lambda: None)
    wav = tmp_path / "mic.wav"
    with wave.open(str(wav), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes(bytes(3200))
    config = parse_config(
        {
            "realtime": {"api_key": "sk-test", "url": "ws://127.0.0.1:9/v1/realtime"},
            "audio": {"input": {"device": "file:" + str(wav)}, "output": {"device": None}},
            "mqtt": {"enabled": False},
            "state_dir": str(tmp_path),
        },
        "test",
    )
    daemon = Daemon(config)
    errors: list[bool] = []

    def note(state: RealtimeState) -> None:
        shown = state.error is not None and "flaky" in state.error.message
        if not errors or errors[-1] != shown:
            errors.append(shown)

    daemon.client.on_state_change(note)
    failures = 0

    async def flaky() -> None:
        nonlocal failures
        if failures < 4:
            await asyncio.sleep(0.01)
            failures += 1  # counted in the same step as the supervisor sees the crash
            raise RuntimeError("crashed")
        await asyncio.Event().wait()  # then it stays up

    async with asyncio.TaskGroup() as tasks:
        daemon._supervise(tasks, "flaky", flaky)
        await until(lambda: failures == 4, timeout_s=30, what="four crashes")
        assert daemon._parts["flaky"].restarts == 4
        await until(lambda: errors[-1:] == [False], timeout_s=30, what="recovered")
        daemon._parts["flaky"].task.cancel()
    # Shown once through all four crashes, cleared once when it stayed up.
    assert errors == [True, False]
