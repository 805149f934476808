"""A private Mosquitto broker per test (see TESTING.md) and a recording MQTT client.

Usage in a test module::

    from mosquitto import Mosquitto, Recorder, mosquitto_fixture

    broker = mosquitto_fixture()                  # function-scoped, anonymous
    auth_broker = mosquitto_fixture(users={"u": "secret"})
    tls_broker = mosquitto_fixture(tls="broker_tls")  # a fixture returning a BrokerTls

    async def test_x(broker: Mosquitto) -> None:
        with Recorder(broker, "harkd/#") as rec:
            ...
            msg = await rec.wait_for("harkd/kitchen/status")

A broker started with a `BrokerTls` speaks only TLS on its port; the helper's own
clients (`Recorder`, `read_retained`) then connect over TLS with `BrokerTls`'s files.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
HOST = "127.0.0.1"
SYNC_PREFIX = "harkd-test-sync/"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class BrokerTls:
    """A TLS listener: the broker's certificate and key, and the CA clients trust.

    `ca_certs` is the CA that signed `certfile`; with `require_certificate` the broker
    also demands a client certificate signed by it. `client_certfile` and
    `client_keyfile` are what the helper's own clients present (needed with
    `require_certificate`).
    """

    ca_certs: Path
    certfile: Path
    keyfile: Path
    require_certificate: bool = False
    client_certfile: Path | None = None
    client_keyfile: Path | None = None

    def listener_config(self) -> list[str]:
        """Mosquitto options for the listener just declared."""
        return [
            f"cafile {self.ca_certs}",
            f"certfile {self.certfile}",
            f"keyfile {self.keyfile}",
            f"require_certificate {'true' if self.require_certificate else 'false'}",
        ]

    def apply_to(self, client: paho.Client) -> None:
        """Make a helper client connect over TLS, trusting `ca_certs`."""
        client.tls_set(
            ca_certs=str(self.ca_certs),
            certfile=None if self.client_certfile is None else str(self.client_certfile),
            keyfile=None if self.client_keyfile is None else str(self.client_keyfile),
        )


class Mosquitto:
    """One private broker: its own port, config, persistence directory and log."""

    def __init__(
        self,
        workdir: Path,
        *,
        users: Mapping[str, str] | None = None,
        extra_config: tuple[str, ...] = (),
        tls: BrokerTls | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.host = HOST
        self.users = dict(users or {})
        self.extra_config = extra_config
        self.tls = tls
        """With TLS set, the only listener speaks TLS."""
        self.log = workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self._write_config()

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {HOST}",
            *(self.tls.listener_config() if self.tls is not None else ()),
            f"allow_anonymous {'false' if self.users else 'true'}",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "autosave_interval 0",
            f"log_dest file {self.log}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_type subscribe",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # otherwise it drops to `mosquitto` and cannot write
        if self.users:
            passwd = self.workdir / "passwd"
            for i, (user, password) in enumerate(self.users.items()):
                create = ["-c"] if i == 0 else []
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", *create, str(passwd), user, password],
                    check=True,
                    capture_output=True,
                )
            passwd.chmod(0o600)
            lines.append(f"password_file {passwd}")
        lines.extend(self.extra_config)
        (self.workdir / "mosquitto.conf").write_text("\n".join(lines) + "\n")

    def start(self, timeout_s: float = 5.0) -> None:
        """Start (or start again, on the same port and directory) and wait until it accepts."""
        assert self._proc is None, "already running"
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.workdir / "mosquitto.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self._proc.poll() is not None:
                log = self.log.read_text() if self.log.exists() else ""
                self._proc = None
                raise RuntimeError(f"mosquitto exited at start:\n{log}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise RuntimeError(f"mosquitto did not listen on {self.port}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        """Terminate cleanly (persistence is written: retained messages survive)."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def restart(self) -> None:
        """Terminate and start again on the same port and directory."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """Crash the broker (SIGKILL): nothing since the last save is persisted."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def mosquitto_fixture(
    *,
    scope: Any = "function",
    users: Mapping[str, str] | None = None,
    extra_config: tuple[str, ...] = (),
    tls: str | None = None,
) -> Any:
    """A pytest fixture factory: a started private broker, stopped at teardown.

    `tls` names a fixture (of the same or a wider scope) that returns a `BrokerTls`.
    """

    @pytest.fixture(scope=scope)
    def fixture(
        request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
    ) -> Iterator[Mosquitto]:
        broker = Mosquitto(
            tmp_path_factory.mktemp("mosquitto"),
            users=users,
            extra_config=extra_config,
            tls=None if tls is None else request.getfixturevalue(tls),
        )
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()

    return fixture


@dataclass(frozen=True)
class Received:
    """One message a `Recorder` saw."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    at: float
    """time.monotonic() on arrival."""

    @property
    def text(self) -> str:
        return self.payload.decode()


class Recorder:
    """A separate paho client that records every message on `topic_filter`.

    With `session` set, it keeps a persistent session (clean_session false) under that
    client id, so the broker stores QoS 1 messages for it while it is disconnected
    (across broker restarts, too). It reconnects by itself. It connects over TLS when
    the broker has `tls` set.
    """

    def __init__(self, broker: Mosquitto, topic_filter: str, *, session: str | None = None):
        self.broker = broker
        self.topic_filter = topic_filter
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        # Its own topic, for `sync`: what the broker sends it comes back in order.
        self._sync_topic = f"{SYNC_PREFIX}{uuid.uuid4().hex}"
        self._synced: set[str] = set()
        self._subscribed = threading.Event()
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=session or f"rec-{uuid.uuid4().hex[:8]}",
            clean_session=session is None,
        )
        if broker.tls is not None:
            broker.tls.apply_to(self._client)
        self._client.reconnect_delay_set(1, 1)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = lambda *_: self._subscribed.set()
        self._client.on_message = self._on_message

    def _on_connect(self, client: paho.Client, *_: Any) -> None:
        client.subscribe([(self.topic_filter, 1), (self._sync_topic, 1)])

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            if msg.topic.startswith(SYNC_PREFIX):  # markers, ours or another recorder's
                if msg.topic == self._sync_topic:
                    self._synced.add(msg.payload.decode())
                return
            self.messages.append(
                Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), time.monotonic())
            )

    def __enter__(self) -> Recorder:
        self._client.connect_async(self.broker.host, self.broker.port)
        self._client.loop_start()
        if not self._subscribed.wait(5):
            raise RuntimeError("recorder could not subscribe")
        return self

    def __exit__(self, *_: Any) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish from the recorder's connection and wait until the broker has it."""
        self._client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def on(self, topic: str) -> list[Received]:
        """Messages seen so far on exactly `topic`."""
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def last(self, topic: str) -> Received | None:
        found = self.on(topic)
        return found[-1] if found else None

    def clear(self) -> None:
        with self._lock:
            self.messages.clear()

    async def sync(self, timeout_s: float = 20.0) -> None:
        """Wait until the broker has delivered everything it had for this recorder when
        this was called (retained messages, Last Wills, what others published before).

        A marker published now comes back after all of that: the broker delivers to a
        client in order. Use it, not a sleep, before asserting that nothing else came.
        """
        marker = uuid.uuid4().hex
        self._client.publish(self._sync_topic, marker, qos=1)
        deadline = time.monotonic() + timeout_s
        while True:
            with self._lock:
                if marker in self._synced:
                    return
            if time.monotonic() > deadline:
                raise AssertionError(f"the broker did not echo a marker within {timeout_s} s")
            await asyncio.sleep(0.02)

    async def wait_for(
        self,
        topic: str,
        predicate: Callable[[Received], bool] = lambda _: True,
        timeout_s: float = 10.0,
    ) -> Received:
        """The first message on `topic` that satisfies `predicate` (polls; loop stays free)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for msg in self.on(topic):
                if predicate(msg):
                    return msg
            if time.monotonic() > deadline:
                seen = sorted({m.topic for m in self.messages})
                raise AssertionError(
                    f"nothing matching on {topic} within {timeout_s} s; saw {seen}"
                )
            await asyncio.sleep(0.02)

    def wait_for_blocking(
        self,
        topic: str,
        predicate: Callable[[Received], bool] = lambda _: True,
        timeout_s: float = 10.0,
    ) -> Received:
        """`wait_for` for synchronous tests."""
        return asyncio.run(self.wait_for(topic, predicate, timeout_s))


async def read_retained(broker: Mosquitto, topic_filter: str) -> dict[str, bytes]:
    """The retained messages under `topic_filter`, as a fresh subscriber gets them."""
    with Recorder(broker, topic_filter) as rec:
        await rec.sync()  # retained messages come right after the subscription
        return {m.topic: m.payload for m in rec.messages if m.retain}
