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
from collections.abc import Callable, Iterator
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

    def wait_for_count(self, count: int, timeout_s: float = 20.0) -> None:
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


class LoggedNotifier(SystemdNotifier):
    """The real notifier, also noting each ping in `log`: an ordered record, kept on
    the loop's own thread, of what the watchdog did (no clocks, no time windows)."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log
        self.ping_times: list[float] = []

    def watchdog(self) -> bool:
        self.log.append("ping")
        self.ping_times.append(time.monotonic())
        return super().watchdog()


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    """Poll for `condition`; the deadline only decides when to give up."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def stop(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def received_pings(notifier: SystemdNotifier, receiver: NotifyReceiver) -> int:
    """How many pings `notifier` delivered: a marker datagram sent last arrives last
    (AF_UNIX datagrams keep their order), so once it is in nothing is on its way."""
    marker = f"flush {uuid.uuid4().hex}"
    assert notifier.notify(status=marker)
    await until(lambda: f"STATUS={marker}\n" in receiver.payloads(), "the flush marker")
    return len(receiver.pings())


async def test_watchdog_cadence_is_half_of_watchdog_usec(
    receiver: NotifyReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    interval_s = watchdog_interval_s()
    assert interval_s == 0.1
    notifier = LoggedNotifier([])
    task = asyncio.create_task(run_watchdog(notifier, lambda: True, interval_s))
    await until(lambda: len(notifier.ping_times) >= 6, "6 pings")
    await stop(task)
    assert await received_pings(notifier, receiver) == len(notifier.ping_times)
    gaps = [b - a for a, b in zip(notifier.ping_times, notifier.ping_times[1:], strict=False)]
    # A sleep never ends early, so no gap is under the interval on any machine; a
    # load-delayed wake-up only lengthens gaps, so the shortest one shows the cadence
    # asked for (a cadence of WATCHDOG_USEC or slower would let systemd kill us).
    assert min(gaps) >= interval_s - 0.002, gaps
    assert min(gaps) < 1.5 * interval_s, gaps


async def test_no_pings_while_health_check_fails(receiver: NotifyReceiver) -> None:
    log: list[str] = []
    script = [True, True, False, False, False, True, True]
    checks = 0

    async def check() -> bool:
        nonlocal checks
        ok = script[checks] if checks < len(script) else True
        checks += 1
        log.append("ok" if ok else "failed")
        return ok

    notifier = LoggedNotifier(log)
    task = asyncio.create_task(run_watchdog(notifier, check, 0.05))
    await until(lambda: checks >= len(script), "the scripted checks")
    await stop(task)
    # A ping follows each passing check, none a failing one: withheld while unhealthy,
    # resumed as soon as the check passes again.
    assert log[:11] == [
        *["ok", "ping", "ok", "ping"],
        *["failed", "failed", "failed"],
        *["ok", "ping", "ok", "ping"],
    ], log
    assert await received_pings(notifier, receiver) == log.count("ping")


async def test_raising_health_check_withholds_pings(receiver: NotifyReceiver) -> None:
    calls = 0

    def check() -> bool:
        nonlocal calls
        calls += 1
        raise RuntimeError("audio thread is gone")

    notifier = LoggedNotifier([])
    task = asyncio.create_task(run_watchdog(notifier, check, 0.04))
    # Three checks ran, so a ping would have had its chances; the watchdog survives.
    await until(lambda: calls >= 3, "three checks")
    assert not task.done()
    await stop(task)
    assert notifier.log == []
    assert await received_pings(notifier, receiver) == 0


async def test_blocked_event_loop_stops_pings(receiver: NotifyReceiver) -> None:
    probe = LoopLagProbe(tick_s=0.01)
    log: list[str] = []

    def check() -> bool:
        ok = probe.healthy(max_lag_s=0.3)
        log.append("ok" if ok else "failed")
        return ok

    def block() -> None:
        log.append("block")
        time.sleep(1.0)  # a blocking call on the loop, as a buggy handler would do
        log.append("unblock")

    notifier = LoggedNotifier(log)
    probe_task = asyncio.create_task(probe.run())
    watchdog_task = asyncio.create_task(run_watchdog(notifier, check, 0.1))
    await until(lambda: "ping" in log, "a first ping")
    asyncio.get_running_loop().call_soon(block)
    await until(
        lambda: "unblock" in log and "ping" in log[log.index("unblock") :], "pings to resume"
    )
    await stop(watchdog_task, probe_task)

    blocked = log.index("block")
    assert "ping" in log[:blocked]
    assert log[blocked + 1] == "unblock", "nothing runs on a blocked loop"
    after = log[blocked + 2 :]
    assert after[0] == "failed", f"the first check after the stall must not ping: {log}"
    assert after.index("ok") < after.index("ping"), log
    # Throughout, a ping only ever follows a passing check.
    assert all(log[i - 1] == "ok" for i, entry in enumerate(log) if entry == "ping"), log
    assert await received_pings(notifier, receiver) == log.count("ping")


def test_probe_that_never_runs_is_unhealthy() -> None:
    probe = LoopLagProbe(tick_s=0.01)
    time.sleep(0.1)  # at least this long, on any machine
    assert not probe.healthy(max_lag_s=0.05)


async def test_probe_reports_a_stall_once() -> None:
    # Stalls are twice the limit (a sleep never ends early); the limit is 30 ticks,
    # so a loaded machine's late wake-ups do not count as stalls.
    limit_s, stall_s = 0.3, 0.6
    probe = LoopLagProbe(tick_s=0.01)
    task = asyncio.create_task(probe.run())
    await asyncio.sleep(0.05)
    assert probe.healthy(max_lag_s=limit_s)

    # The check runs first after the stall: the probe's last tick is stale.
    time.sleep(stall_s)  # noqa: ASYNC251 - blocking the loop is the point
    assert not probe.healthy(max_lag_s=limit_s)
    await asyncio.sleep(0.05)
    assert probe.healthy(max_lag_s=limit_s), "the same stall must not be counted twice"

    # The probe runs first after the stall (its timer is due before this sleep's):
    # it measures the lateness.
    time.sleep(stall_s)  # noqa: ASYNC251
    await asyncio.sleep(0.02)
    assert not probe.healthy(max_lag_s=limit_s)
    await asyncio.sleep(0.05)
    assert probe.healthy(max_lag_s=limit_s)

    await stop(task)


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
