"""systemd integration without libsystemd: sd_notify and a health-gated watchdog.

The notification protocol is one AF_UNIX datagram of ``KEY=value`` lines sent to
``$NOTIFY_SOCKET`` (see sd_notify(3)). Outside systemd the variable is unset and
every call is a no-op, so the daemon calls the notifier unconditionally.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping

__all__ = [
    "LoopLagProbe",
    "SystemdNotifier",
    "run_watchdog",
    "watchdog_interval_s",
]

logger = logging.getLogger(__name__)

# A notification must never stall the event loop for long; systemd drains its
# notify socket promptly, so a full queue for this long means something is wrong.
_SEND_TIMEOUT_S = 0.5


class SystemdNotifier:
    """Sends sd_notify(3) messages to the service manager.

    ``address`` defaults to ``$NOTIFY_SOCKET``: a filesystem path, or an abstract
    socket name written with a leading ``@``. With no address every method is a
    no-op returning False. No method raises; failures are logged at debug level.
    """

    def __init__(self, address: str | None = None) -> None:
        if address is None:
            address = os.environ.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address
        self._sock: socket.socket | None = None
        self._last_status: str | None = None

    @property
    def enabled(self) -> bool:
        """True when a notify socket is configured (running under systemd)."""
        return self._address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` fields in one datagram; keys are upper-cased.

        Returns True when the datagram was sent.
        """
        if self._address is None or not fields:
            return False
        payload = "".join(f"{key.upper()}={value}\n" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.settimeout(_SEND_TIMEOUT_S)
            self._sock.sendto(payload.encode(), self._address)
        except OSError as exc:
            logger.debug("sd_notify %r failed: %s", payload, exc)
            return False
        return True

    def ready(self) -> bool:
        """Tell systemd start-up is complete (``READY=1``)."""
        return self.notify(READY=1)

    def status(self, text: str) -> bool:
        """Set the free-form status shown by ``systemctl status``.

        Only sends when ``text`` differs from the last status sent, so callers may
        report on every state change without flooding the manager.
        """
        text = " ".join(text.splitlines())  # STATUS= is a single line
        if text == self._last_status:
            return False
        sent = self.notify(STATUS=text)
        if sent:
            self._last_status = text
        return sent

    def stopping(self) -> bool:
        """Tell systemd the service is shutting down (``STOPPING=1``)."""
        return self.notify(STOPPING=1)

    def watchdog(self) -> bool:
        """Reset the service watchdog timer (``WATCHDOG=1``)."""
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        """Close the notification socket; a later notify reopens it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s(environ: Mapping[str, str] | None = None) -> float | None:
    """Return how often to ping the watchdog, or None when it is not enabled.

    Half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) recommends. When
    ``$WATCHDOG_PID`` is set and names another process, the watchdog is not ours.
    """
    env = os.environ if environ is None else environ
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


class LoopLagProbe:
    """Measures event-loop responsiveness for the watchdog health check.

    Run :meth:`run` as a task on the loop to watch. It sleeps ``tick_s`` over and
    over and records how late each wake-up was. A blocked loop shows up twice:
    while blocked nothing on it runs (so no ping can be sent), and afterwards
    either the probe reports the lateness or, if the health check runs first,
    the probe's last tick is stale. Either way :meth:`healthy` fails once.
    """

    def __init__(self, tick_s: float = 1.0) -> None:
        self.tick_s = tick_s
        self.last_lag_s = 0.0
        self._worst_lag_s = 0.0
        # Counted from construction so a probe that never runs is unhealthy.
        self._last_tick_at = time.monotonic()
        # Lateness up to here was already judged by healthy() as staleness.
        self._judged_until = 0.0

    async def run(self) -> None:
        """Sample loop lateness forever (until cancelled)."""
        self._last_tick_at = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            due = max(self._last_tick_at + self.tick_s, self._judged_until)
            self.last_lag_s = max(0.0, now - due)
            self._worst_lag_s = max(self._worst_lag_s, self.last_lag_s)
            self._last_tick_at = now

    def healthy(self, max_lag_s: float = 5.0) -> bool:
        """True when no wake-up since the previous call was more than ``max_lag_s`` late.

        Each call starts a new measurement window.
        """
        now = time.monotonic()
        worst = max(self._worst_lag_s, now - self._last_tick_at - self.tick_s)
        self._worst_lag_s = 0.0
        self._judged_until = now
        if worst > max_lag_s:
            logger.warning("event loop lagged %.2f s (limit %.2f s)", worst, max_lag_s)
            return False
        return True


async def run_watchdog(
    notifier: SystemdNotifier,
    health_check: Callable[[], bool | Awaitable[bool]],
    interval_s: float,
) -> None:
    """Ping ``WATCHDOG=1`` every ``interval_s`` while ``health_check`` passes.

    The check may be sync or async; an exception, a falsy result or taking longer
    than ``interval_s`` counts as a failure, and a failure sends nothing, so a
    daemon that stays unhealthy is killed and restarted by systemd. After a
    failure the check is repeated after a quarter interval: with the usual
    interval of half ``WatchdogSec`` one transient failure then does not let the
    timer run out by itself. Runs until cancelled.
    """
    healthy_before = True
    while True:
        healthy = await _check(health_check, interval_s)
        if healthy:
            notifier.watchdog()
            if not healthy_before:
                logger.info("health check passes again; watchdog pings resumed")
        elif healthy_before:
            logger.warning("health check failed; withholding watchdog pings")
        healthy_before = healthy
        await asyncio.sleep(interval_s if healthy else interval_s / 4)


async def _check(health_check: Callable[[], bool | Awaitable[bool]], timeout_s: float) -> bool:
    try:
        async with asyncio.timeout(timeout_s):
            result = health_check()
            if inspect.isawaitable(result):
                result = await result
    except TimeoutError:
        logger.warning("health check did not finish within %.1f s", timeout_s)
        return False
    except Exception:
        logger.exception("health check raised")
        return False
    return bool(result)
