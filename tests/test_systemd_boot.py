"""harkd under a real systemd: the README's system-service steps in a booted Debian 12.

A debootstrapped bookworm tree boots with systemd 252 as PID 1 (tests/nspawn.py). Inside
it the README's "Install on a Raspberry Pi (system service)" shell blocks run literally
in a copy of this working tree; between them the test edits /etc/harkd/config.yaml as
the README asks (the fake realtime server on the host instead of OpenAI, the bundled
question as the microphone, no speaker, no MQTT). Then what an administrator does:
status, reload, check-config, history, a hung daemon, stop.

Slow (a boot, a pip install from PyPI): run with HARKD_TEST_SYSTEMD=1 (`make test-systemd`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from harkd_process import deep_merge, harkd_env
from mosquitto import free_port
from nspawn import CACHE_DIR, Container, ensure_tree

pytestmark = [
    pytest.mark.systemd_boot,
    pytest.mark.skipif(
        os.environ.get("HARKD_TEST_SYSTEMD") != "1",
        reason="boots a container; set HARKD_TEST_SYSTEMD=1 (make test-systemd)",
    ),
    # The first run builds the tree and pip-installs harkd inside: minutes, not seconds.
    pytest.mark.timeout(1800),
]

REPO = Path(__file__).resolve().parents[1]
SECTION = "## Install on a Raspberry Pi (system service)"
# The README's placeholder key: the fake server accepts only it, so a session that
# connects proves the key went through LoadCredential= and $CREDENTIALS_DIRECTORY.
README_KEY = "sk-..."
CONFIG = "/etc/harkd/config.yaml"
UNIT = "harkd"


def readme_blocks() -> list[str]:
    """The shell blocks of the README's system-service section, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = re.split(r"\n##+ ", text.split(SECTION, 1)[1], maxsplit=1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.S)


@dataclass
class Installed:
    """The container with harkd installed and started the README's way."""

    box: Container

    def systemctl_show(self, prop: str) -> str:
        """One property of the unit, as `systemctl show -p PROP --value` prints it."""
        return self.box.run(f"systemctl show -p {prop} --value {UNIT}").stdout.strip()

    def journal_cursor(self) -> str:
        """A position in the journal: what is logged from now on comes after it."""
        out = self.box.run("journalctl -n 0 --show-cursor --no-pager").stdout
        return out.strip().rsplit("-- cursor: ", 1)[1]

    def unit_log(self, after_cursor: str) -> str:
        """The unit's journal lines (daemon and systemd about it) after the cursor."""
        return self.box.run(
            f"journalctl -u {UNIT} --no-pager -o cat --after-cursor='{after_cursor}'"
        ).stdout

    def wait_log(self, after_cursor: str, text: str, timeout_s: float) -> str:
        """Poll the unit's journal until ``text`` appears after the cursor."""
        deadline = time.monotonic() + timeout_s
        while text not in (log := self.unit_log(after_cursor)):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the journal; it has:\n{log}")
            time.sleep(0.2)
        return log

    def wait_active(self, timeout_s: float) -> None:
        """Poll until the unit is active with a live main process."""
        self.box.poll(f"systemctl is-active {UNIT}", "active", timeout_s)

    def edit_config(self, change: dict[str, Any]) -> None:
        """Merge ``change`` into /etc/harkd/config.yaml, as an administrator's edit."""
        path = self.box.root / CONFIG.lstrip("/")
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        path.write_text(yaml.safe_dump(deep_merge(config, change), sort_keys=False))


def _copy_work_tree(destination: Path) -> None:
    # What `git ls-files` shows is the working tree a user would have checked out:
    # tracked files as edited now plus new ones, nothing ignored (.venv, caches).
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _wait_port(port: int, proc: subprocess.Popen[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the fake realtime server did not start") from None
            time.sleep(0.05)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """Boot the container, follow the README's install steps, start harkd."""
    for tool in ("systemd-nspawn", "debootstrap", "nsenter", "git"):
        assert shutil.which(tool), f"{tool} is missing (make test-systemd installs it)"
    logs = tmp_path_factory.mktemp("systemd-boot")
    with (logs / "debootstrap.log").open("w") as log:
        tree = ensure_tree(log)
    pip_cache = CACHE_DIR / "pip"
    pip_cache.mkdir(exist_ok=True)

    # On the host: the container shares its network, so the daemon inside reaches it.
    port = free_port()
    fake = subprocess.Popen(
        [sys.executable, "-m", "harkd.cli", "fake-server", "--port", str(port)]
        + ["--api-key", README_KEY],
        env=harkd_env(),
        stdin=subprocess.DEVNULL,
        stdout=(logs / "fake-server.log").open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_port(port, fake, 30)
        binds = [(pip_cache, "/root/.cache/pip")]  # later runs install from the cache
        began = time.monotonic()
        with Container.boot(tree, logs / "console.log", binds=binds) as box:
            boot_s = time.monotonic() - began
            _copy_work_tree(box.root / "root/harkd")
            install, start = readme_blocks()
            began = time.monotonic()
            box.run(install, cwd="/root/harkd", timeout_s=900)
            install_s = time.monotonic() - began
            service = Installed(box)
            # "Then edit /etc/harkd/config.yaml": devices and server for this box.
            wav = box.run(
                "/opt/harkd/venv/bin/python -c "
                "'import harkd, pathlib; print(pathlib.Path(harkd.__file__).parent)'"
            ).stdout.strip()
            service.edit_config(
                {
                    "realtime": {
                        "url": f"ws://127.0.0.1:{port}/v1/realtime",
                        "reconnect": {"initial_delay_s": 0.2, "max_delay_s": 1},
                    },
                    "audio": {
                        "input": {"device": f"file:{wav}/data/demo_question.wav"},
                        "output": {"device": None},
                    },
                    "mqtt": {"enabled": False},
                }
            )
            began = time.monotonic()
            box.run(start, cwd="/root/harkd", timeout_s=120)
            start_s = time.monotonic() - began
            print(
                f"measured: boot to 'running' {boot_s:.2f} s, README install {install_s:.1f} s, "
                f"enable --now until READY {start_s:.2f} s"
            )
            yield service
    finally:
        fake.terminate()
        fake.wait(10)


def test_starts_ready_with_status_as_its_dynamic_user(installed: Installed) -> None:
    box = installed.box
    # Type=notify: enable --now returned after READY=1, so the unit is active now.
    assert box.run(f"systemctl is-active {UNIT}", check=False).stdout.strip() == "active"
    # STATUS= reaches `systemctl status`; "connected" needs the key from the credential.
    status = box.poll(f"systemctl status {UNIT} --no-pager", 'Status: "connected', 30)
    assert "Active: active (running)" in status
    # DynamicUser=: a uid from systemd's dynamic range (61184-65519), not root.
    uid = int(box.run(f"ps -o uid= -p {installed.systemctl_show('MainPID')}").stdout)
    assert 61184 <= uid <= 65519


def test_reload_applies_an_edited_config(installed: Installed) -> None:
    pid = installed.systemctl_show("MainPID")
    cursor = installed.journal_cursor()
    installed.edit_config({"audio": {"output": {"volume": 40}}})

    reload = installed.box.run(f"systemctl reload {UNIT}", check=False)
    assert reload.returncode == 0, reload.stderr

    log = installed.wait_log(cursor, "SIGHUP: applied audio.output.volume", 15)
    assert "service: SIGHUP: applied audio.output.volume" in log  # no "harkd.service:"
    assert installed.systemctl_show("MainPID") == pid  # reloaded, not restarted
    assert installed.box.run(f"systemctl is-active {UNIT}").stdout.strip() == "active"


def test_check_config_as_the_administrator(installed: Installed) -> None:
    result = installed.box.run(f"sudo harkd check-config -c {CONFIG}", check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"# {CONFIG}: valid\n")
    resolved = yaml.safe_load(result.stdout)
    assert resolved["realtime"]["api_key_file"] == "/etc/harkd/credentials/openai_api_key"
    [note] = result.stderr.splitlines()
    assert "CREDENTIALS_DIRECTORY is not set" in note and "/etc/harkd/credentials" in note


def test_history_is_on_path(installed: Installed) -> None:
    box = installed.box
    assert box.run("command -v harkd").stdout.strip() == "/usr/local/bin/harkd"
    # The microphone (the bundled WAV) spoke once; the fake server answered it.
    shown = box.poll(f"sudo harkd history -c {CONFIG}", " assistant: ", 60)
    assert re.search(r"(?m)^\d\d:\d\d:\d\d user: \(speech \d", shown), shown


def test_watchdog_kills_and_restarts_a_hung_daemon(installed: Installed) -> None:
    box = installed.box
    # 30 s is the shipped value; a drop-in shortens it so the test does not wait that long.
    box.run(
        f"mkdir -p /etc/systemd/system/{UNIT}.service.d && printf '%s\\n' "
        f"'[Service]' 'WatchdogSec=3' 'RestartSec=1' "
        f"> /etc/systemd/system/{UNIT}.service.d/test-watchdog.conf && "
        f"systemctl daemon-reload && systemctl restart {UNIT}"
    )
    pid = installed.systemctl_show("MainPID")
    restarts = int(installed.systemctl_show("NRestarts"))
    cursor = installed.journal_cursor()

    box.run(f"kill -STOP {pid}")  # hung: no WATCHDOG=1 any more

    log = installed.wait_log(cursor, "Watchdog timeout", 15)
    deadline = time.monotonic() + 30
    while installed.systemctl_show("MainPID") in ("0", pid) or (
        box.run(f"systemctl is-active {UNIT}", check=False).stdout.strip() != "active"
    ):
        assert time.monotonic() < deadline, installed.unit_log(cursor)
        time.sleep(0.2)
    assert int(installed.systemctl_show("NRestarts")) == restarts + 1
    assert "Failed with result 'watchdog'" in installed.unit_log(cursor), log
    box.run(
        f"rm /etc/systemd/system/{UNIT}.service.d/test-watchdog.conf && systemctl daemon-reload"
    )


def test_stop_is_quick_and_clean(installed: Installed) -> None:
    box = installed.box
    box.run(f"systemctl start {UNIT}")
    installed.wait_active(30)
    # Let it be connected, as a service normally is when someone stops it.
    box.poll(f"systemctl show -p StatusText --value {UNIT}", "connected", 30)
    invocation = installed.systemctl_show("InvocationID")

    began = time.monotonic()
    box.run(f"systemctl stop {UNIT}")
    stop_s = time.monotonic() - began
    print(f"measured: systemctl stop {stop_s:.2f} s")

    assert box.run(f"systemctl is-active {UNIT}", check=False).stdout.strip() == "inactive"
    assert installed.systemctl_show("Result") == "success"
    log = box.run(f"journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID={invocation}").stdout
    assert "harkd stopped" in log
    assert "Traceback" not in log, log
    assert stop_s < 2.0, log
