"""sd_notify over real AF_UNIX datagram sockets, the health-gated watchdog, unit files."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harkd.systemd import LoopLagProbe, SystemdNotifier, run_watchdog, watchdog_interval_s
from harkd_process import NotifySocket

UNIT_DIR = Path(__file__).resolve().parent.parent / "systemd"


class NotifyReceiver(NotifySocket):
    """The notify socket with counting helpers for the watchdog cadence tests."""

    def payloads(self) -> list[str]:
        return [payload for _, payload in self.messages]

    def pings(self) -> list[float]:
        return [t for t, payload in self.messages if payload == "WATCHDOG=1\n"]

    def wait_for_count(self, count: int, timeout_s: float = 2.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.005)


@pytest.fixture(params=["path", "abstract"])
def receiver(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[NotifyReceiver]:
    if request.param == "path":
        # A short directory: AF_UNIX paths are limited to 108 bytes.
        directory = tempfile.mkdtemp(prefix="harkd-")
        address = os.path.join(directory, "notify")
    else:
        directory = None
        address = f"@harkd-test-{uuid.uuid4().hex}"
    rx = NotifyReceiver(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    yield rx
    rx.close()
    if directory is not None:
        shutil.rmtree(directory)


def test_notify_messages(receiver: NotifyReceiver) -> None:
    notifier = SystemdNotifier()
    assert notifier.enabled
    assert notifier.ready()
    assert notifier.status("connecting")
    assert not notifier.status("connecting")  # unchanged: not resent
    assert notifier.status("connected\nto server")
    assert notifier.watchdog()
    assert notifier.stopping()
    assert notifier.notify(errno=5, status="failed")
    receiver.wait_for_count(6)
    notifier.close()
    assert receiver.payloads() == [
        "READY=1\n",
        "STATUS=connecting\n",
        "STATUS=connected to server\n",
        "WATCHDOG=1\n",
        "STOPPING=1\n",
        "ERRNO=5\nSTATUS=failed\n",
    ]


def test_no_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("x")


def test_send_failure_never_raises(tmp_path: Path) -> None:
    notifier = SystemdNotifier(str(tmp_path / "missing"))
    assert notifier.enabled
    assert not notifier.ready()
    assert not notifier.status("idle")
    assert not notifier.status("idle")  # a failed status is not remembered as sent


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "nonsense"}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    own = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval_s(own) == 0.5
    assert watchdog_interval_s({**own, "WATCHDOG_PID": "1"}) is None
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval_s() == 0.1


async def test_watchdog_cadence_is_half_of_watchdog_usec(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    interval_s = watchdog_interval_s()
    assert interval_s == 0.1
    task = asyncio.create_task(run_watchdog(SystemdNotifier(), lambda: True, interval_s))
    await asyncio.sleep(0.55)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    receiver.wait_for_count(6)
    pings = receiver.pings()
    assert 5 <= len(pings) <= 7
    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
    assert all(0.07 < gap < 0.2 for gap in gaps), gaps


async def test_no_pings_while_health_check_fails(receiver: NotifyReceiver) -> None:
    ok = True

    async def check() -> bool:
        return ok

    task = asyncio.create_task(run_watchdog(SystemdNotifier(), check, 0.05))
    await asyncio.sleep(0.2)
    ok = False
    failed_at = time.monotonic()
    await asyncio.sleep(0.4)
    recovered_at = time.monotonic()
    ok = True
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pings = receiver.pings()
    assert any(t < failed_at for t in pings)
    # 20 ms of slack for a datagram sent just before the flip and read late.
    assert not [t for t in pings if failed_at + 0.02 < t < recovered_at]
    assert any(t > recovered_at for t in pings)


async def test_raising_health_check_withholds_pings(receiver: NotifyReceiver) -> None:
    calls = 0

    def check() -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("audio thread is gone")

    task = asyncio.create_task(run_watchdog(SystemdNotifier(), check, 0.04))
    await asyncio.sleep(0.2)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls >= 2
    assert receiver.pings() == []


async def test_blocked_event_loop_stops_pings(receiver: NotifyReceiver) -> None:
    probe = LoopLagProbe(tick_s=0.01)
    checks: list[tuple[float, bool]] = []

    def check() -> bool:
        result = probe.healthy(max_lag_s=0.2)
        checks.append((time.monotonic(), result))
        return result

    blocked: list[float] = []

    def block() -> None:
        blocked.append(time.monotonic())
        time.sleep(1.0)  # a blocking call on the loop, as a buggy handler would do
        blocked.append(time.monotonic())

    probe_task = asyncio.create_task(probe.run())
    watchdog_task = asyncio.create_task(run_watchdog(SystemdNotifier(), check, 0.1))
    await asyncio.sleep(0.35)
    asyncio.get_running_loop().call_soon(block)
    await asyncio.sleep(0.05)  # returns only after the stall
    await asyncio.sleep(0.5)
    for task in (watchdog_task, probe_task):
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    start, end = blocked
    pings = receiver.pings()
    assert any(t < start for t in pings)
    assert not [t for t in pings if start <= t <= end]
    after = [(t, ok) for t, ok in checks if t >= end]
    assert after[0][1] is False, "the first check after the stall must not ping"
    first_pass = next(t for t, ok in after if ok)
    assert not [t for t in pings if end <= t < first_pass]
    assert any(t >= first_pass for t in pings), "pings resume once the loop is responsive"


def test_probe_that_never_runs_is_unhealthy() -> None:
    probe = LoopLagProbe(tick_s=0.01)
    time.sleep(0.1)
    assert not probe.healthy(max_lag_s=0.05)


async def test_probe_reports_a_stall_once() -> None:
    probe = LoopLagProbe(tick_s=0.01)
    task = asyncio.create_task(probe.run())
    await asyncio.sleep(0.05)
    assert probe.healthy(max_lag_s=0.1)

    # The check runs first after the stall: the probe's last tick is stale.
    time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop is the point
    assert not probe.healthy(max_lag_s=0.1)
    await asyncio.sleep(0.05)
    assert probe.healthy(max_lag_s=0.1), "the same stall must not be counted twice"

    # The probe runs first after the stall: it measures the lateness.
    time.sleep(0.3)  # noqa: ASYNC251
    await asyncio.sleep(0.02)  # the probe ticks again, so nothing is stale now
    assert not probe.healthy(max_lag_s=0.1)
    await asyncio.sleep(0.05)
    assert probe.healthy(max_lag_s=0.1)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def _verify_unit(source: Path, tmp_path: Path, user: bool) -> None:
    # verify insists that ExecStart's binary exists: point it at this venv's harkd.
    harkd = Path(sys.executable).parent / "harkd"
    binary = str(harkd) if harkd.exists() else shutil.which("true") or "/bin/true"
    text = re.sub(r"(?m)^ExecStart=\S+", lambda _: f"ExecStart={binary}", source.read_text())
    unit = tmp_path / source.name
    unit.write_text(text)
    env = dict(os.environ)
    cmd = ["systemd-analyze", "verify", str(unit)]
    if user:
        # The user manager needs a runtime directory even to verify.
        runtime = tmp_path / "runtime"
        runtime.mkdir(mode=0o700)
        env["XDG_RUNTIME_DIR"] = str(runtime)
        cmd.insert(1, "--user")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown keys and bad values are only warnings: any line about our unit fails.
    assert unit.name not in output, output


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize(("name", "user"), [("harkd.service", False), ("harkd-user.service", True)])
def test_unit_files_verify(name: str, user: bool, tmp_path: Path) -> None:
    _verify_unit(UNIT_DIR / name, tmp_path, user)


def test_system_unit_contract() -> None:
    text = (UNIT_DIR / "harkd.service").read_text()
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30",
        "ExecStart=/opt/harkd/venv/bin/harkd run -c /etc/harkd/config.yaml",
        "DynamicUser=yes",
        "SupplementaryGroups=audio",
        "StateDirectory=harkd",
        "LoadCredential=openai_api_key:/etc/harkd/credentials/openai_api_key",
        "DeviceAllow=char-alsa rw",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    ]:
        assert re.search(rf"(?m)^{re.escape(line)}$", text), line
