"""harkd's MQTT bridge over TLS, against a real private Mosquitto with a TLS listener.

A throwaway PKI is made with the `openssl` command line: a CA, a broker certificate for
127.0.0.1 / localhost (subjectAltName, as hostname checking requires), a client
certificate signed by the same CA, and a second, unrelated CA. The bridge is harkd's
real `MqttBridge`; what reaches the broker is checked by a `Recorder` that itself
connects over TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harkd.config import DeviceConfig, MqttConfig, TlsFiles
from harkd.mqtt import MqttBridge
from mosquitto import BrokerTls, Mosquitto, Recorder, mosquitto_fixture, read_retained
from test_mqtt import FakeController, until

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"

tls_broker = mosquitto_fixture(tls="server_tls")
mtls_broker = mosquitto_fixture(tls="mutual_tls")


# -- a throwaway PKI -----------------------------------------------------------------

OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A CA that signed nothing the broker uses."""


def _openssl(workdir: Path, *args: str) -> None:
    done = subprocess.run(
        [OPENSSL, *args], cwd=workdir, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"openssl {' '.join(args)} failed:\n{done.stderr}"


def _new_ca(workdir: Path, name: str) -> None:
    _openssl(
        workdir,
        *("req", "-x509", "-new", "-config", "openssl.cnf", "-extensions", "ca"),
        *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2"),
        *("-subj", f"/CN=harkd test {name} {secrets.token_hex(4)}"),
    )


def _new_leaf(workdir: Path, name: str, cn: str, extensions: str) -> None:
    _openssl(
        workdir,
        *("req", "-new", "-config", "openssl.cnf", "-subj", f"/CN={cn}"),
        *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
        *("-keyout", f"{name}.key", "-out", f"{name}.csr"),
    )
    _openssl(
        workdir,
        *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key"),
        *("-set_serial", f"0x{secrets.token_hex(8)}", "-days", "2"),
        *("-extfile", "openssl.cnf", "-extensions", extensions, "-out", f"{name}.crt"),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    workdir = tmp_path_factory.mktemp("pki")
    (workdir / "openssl.cnf").write_text(OPENSSL_CNF)
    _new_ca(workdir, "ca")
    _new_ca(workdir, "other_ca")
    _new_leaf(workdir, "server", "localhost", "server")
    _new_leaf(workdir, "client", "harkd-kitchen", "client")
    return Pki(
        ca=workdir / "ca.crt",
        server_cert=workdir / "server.crt",
        server_key=workdir / "server.key",
        client_cert=workdir / "client.crt",
        client_key=workdir / "client.key",
        other_ca=workdir / "other_ca.crt",
    )


@pytest.fixture
def server_tls(pki: Pki) -> BrokerTls:
    return BrokerTls(pki.ca, pki.server_cert, pki.server_key)


@pytest.fixture
def mutual_tls(pki: Pki) -> BrokerTls:
    return BrokerTls(
        pki.ca,
        pki.server_cert,
        pki.server_key,
        require_certificate=True,
        client_certfile=pki.client_cert,
        client_keyfile=pki.client_key,
    )


# -- helpers -------------------------------------------------------------------------


def tls_bridge(
    broker: Mosquitto,
    device_id: str,
    tls: TlsFiles | bool,
    username: str | None = None,
    password: str | None = None,
) -> MqttBridge:
    config = MqttConfig(host=broker.host, port=broker.port, tls=tls, username=username)
    return MqttBridge(config, DeviceConfig(id=device_id), password, FakeController())


@contextlib.asynccontextmanager
async def running(*bridges: MqttBridge) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Run the bridges; stop them together (each stop may take up to a second)."""
    tasks = [asyncio.create_task(bridge.run()) for bridge in bridges]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def harkd_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("harkd") and text in r.getMessage()]


# -- tests ---------------------------------------------------------------------------


async def test_with_our_ca_harkd_publishes_its_state_over_tls(
    tls_broker: Mosquitto, pki: Pki
) -> None:
    base = "harkd/tlsdev"
    with Recorder(tls_broker, f"{base}/#") as rec:  # itself a TLS client
        bridge = tls_bridge(tls_broker, "tlsdev", TlsFiles(ca_certs=pki.ca))
        async with running(bridge):
            await rec.wait_for(f"{base}/availability", lambda m: m.text == "online")
            await rec.wait_for(f"{base}/status")
            retained = await read_retained(tls_broker, f"{base}/#")
            assert bridge.connected
            assert bridge.status == f"connected to {tls_broker.host}:{tls_broker.port}"
        # A clean shutdown over TLS still says goodbye.
        await rec.wait_for(f"{base}/availability", lambda m: m.text == "offline")
    assert retained[f"{base}/availability"] == b"online"
    assert retained[f"{base}/status"] == b"idle"
    assert retained[f"{base}/mode"] == b"idle"


async def test_a_client_certificate_the_broker_requires_is_presented(
    mtls_broker: Mosquitto, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="harkd")
    base = "harkd/mtlsdev"
    files = TlsFiles(ca_certs=pki.ca, certfile=pki.client_cert, keyfile=pki.client_key)
    # Without the certificate the same broker turns harkd away, and harkd says so.
    without = tls_bridge(mtls_broker, "nocert", TlsFiles(ca_certs=pki.ca))
    with Recorder(mtls_broker, "harkd/#") as rec:  # presents its own client certificate
        async with running(tls_bridge(mtls_broker, "mtlsdev", files), without) as tasks:
            await rec.wait_for(f"{base}/availability", lambda m: m.text == "online")
            status = await rec.wait_for(f"{base}/status")
            await until(lambda: "retrying" in without.status)
            refused_status = without.status
            assert not any(task.done() for task in tasks)
            assert not without.connected
    assert status.text == "idle"
    assert harkd_lines(caplog, "MQTT connected to")

    assert "closed the connection" in refused_status and "certificate" in refused_status
    warnings = harkd_lines(caplog, "closed the connection")
    assert warnings[0].levelno == logging.WARNING
    assert "check mqtt.tls" in warnings[0].getMessage()
    assert not [m for m in rec.messages if m.topic.startswith("harkd/nocert/")]


async def test_a_wrong_ca_is_reported_clearly_and_retried_without_leaking_secrets(
    mtls_broker: Mosquitto, tls_broker: Mosquitto, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="harkd")
    where = f"{mtls_broker.host}:{mtls_broker.port}"
    # Everything right but the CA: it did not sign the broker's certificate.
    files = TlsFiles(ca_certs=pki.other_ca, certfile=pki.client_cert, keyfile=pki.client_key)
    wrong = tls_bridge(mtls_broker, "wrongca", files, "harkd", "s3cret-pass")
    # `tls: true` trusts the system CAs, which did not sign it either.
    system = tls_bridge(tls_broker, "systemca", True)
    async with running(wrong, system) as tasks:
        await until(lambda: "TLS" in wrong.status and "TLS" in system.status)
        first_status, system_status = wrong.status, system.status

        def failures() -> list[logging.LogRecord]:
            return harkd_lines(caplog, f"TLS handshake with {where}")

        # paho's backoff: the second attempt comes about 3 s after the first.
        await until(lambda: len(failures()) >= 2, timeout_s=10)
        # The broker saw each attempt end with harkd's "unknown CA" alert.
        await until(lambda: mtls_broker.log_text().count("unknown ca") >= 2)
        assert not any(task.done() for task in tasks)
        assert not wrong.connected and not system.connected
        assert wrong.status == first_status

    assert first_status.startswith(f"TLS handshake with {where} failed: certificate verify failed")
    assert first_status.endswith("; retrying")
    assert "certificate verify failed" in system_status
    first, *retries = failures()
    assert first.levelno == logging.WARNING
    assert "certificate verify failed" in first.getMessage()
    assert "check mqtt.tls" in first.getMessage()
    assert retries and all(r.levelno == logging.DEBUG for r in retries)  # told once
    assert not harkd_lines(caplog, "unreachable")  # the broker answered: not "unreachable"
    assert not harkd_lines(caplog, "MQTT connected")
    key = pki.client_key.read_text()
    key_body = "".join(line for line in key.splitlines() if "-----" not in line)
    for text in (caplog.text, first_status, system_status):
        assert "s3cret-pass" not in text
        assert "PRIVATE KEY" not in text and key_body[:40] not in text
    assert not await read_retained(mtls_broker, "harkd/#")
