"""Run `harkd` the way a user (or systemd) does: as a subprocess with a config file.

Usage in a test module::

    from harkd_process import Harkd, harkd_env, run_harkd, write_config

    cfg = write_config(tmp_path, daemon_config(tmp_path, server.url, KEY))
    async with Harkd(cfg, env=harkd_env()) as daemon:
        await daemon.wait_log("harkd ready")
        assert await daemon.stop() == 0
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

import harkd

HARKD = [sys.executable, "-m", "harkd.cli"]
DEMO_WAV = Path(harkd.__file__).resolve().parent / "data" / "demo_question.wav"

# Variables of the test runner's environment that would change what harkd does.
_DROPPED = (
    "OPENAI_API_KEY",
    "HARKD_CONFIG",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "JOURNAL_STREAM",
    "STATE_DIRECTORY",
    "CREDENTIALS_DIRECTORY",
)


def harkd_env(**extra: str) -> dict[str, str]:
    """The runner's environment without anything harkd reads, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `over` merged in (mappings recursively, everything else replaced)."""
    out = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def daemon_config(tmp_path: Path, url: str, api_key: str, **over: Any) -> dict[str, Any]:
    """A config.yaml (as data) for a daemon against the fake server at `url`.

    The bundled question as the microphone, no speaker, no MQTT, state in tmp_path.
    """
    base: dict[str, Any] = {
        "device": {"id": "testroom", "name": "Test room"},
        "realtime": {
            "url": url,
            "api_key": api_key,
            "instructions": "Answer briefly.",
            "turn_detection": "server_vad",
            "reconnect": {"initial_delay_s": 0.2, "max_delay_s": 1},
        },
        "audio": {"input": {"device": f"file:{DEMO_WAV}"}, "output": {"device": None}},
        "mqtt": {"enabled": False},
        "plugins": {"clock": {}, "timers": {}},
        "state_dir": str(tmp_path / "state"),
        "log_level": "info",
    }
    return deep_merge(base, over)


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    """Write `data` as YAML to `path` (a directory gets `config.yaml`)."""
    if path.is_dir():
        path = path / "config.yaml"
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    return path


def run_harkd(
    *args: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """`harkd ARGS...` to completion (blocking: for commands that end by themselves)."""
    return subprocess.run(
        [*HARKD, *args],
        env=dict(env) if env is not None else harkd_env(),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


class Harkd:
    """A `harkd run -c CONFIG` subprocess whose output is collected line by line."""

    def __init__(
        self, config: Path, *, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        self.config = config
        self.env = dict(env) if env is not None else harkd_env()
        self.cwd = cwd or config.parent
        self.lines: list[str] = []
        """stdout and stderr lines, in arrival order."""
        self.started_at = 0.0
        self.exited_at: float | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self.started_at = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *HARKD,
            "run",
            "-c",
            str(self.config),
            env=self.env,
            cwd=self.cwd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            asyncio.create_task(self._read(self.proc.stdout)),
            asyncio.create_task(self._read(self.proc.stderr)),
        ]

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait_log(self, pattern: str, timeout_s: float = 20.0, *, after: int = 0) -> str:
        """The first output line from index `after` on matching regex `pattern`."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.lines[after:]:
                if regex.search(line):
                    return line
            if not self.running and all(r.done() for r in self._readers):
                raise AssertionError(f"harkd exited without logging {pattern!r}:\n{self.output}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line {pattern!r} in {timeout_s} s:\n{self.output}")
            await asyncio.sleep(0.02)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout_s: float = 20.0) -> int:
        """The exit code (and all output read)."""
        assert self.proc is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout_s)
        if self.exited_at is None:
            self.exited_at = time.monotonic()
        await asyncio.gather(*self._readers)
        return code

    async def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, then the exit code (fails the test when it takes over `timeout_s`:
        a hang, not a slow machine; systemd itself waits 90 s)."""
        self.send_signal(signal.SIGTERM)
        return await self.wait(timeout_s)

    async def __aenter__(self) -> Harkd:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        if exc is not None:
            # The daemon's side of the story, in pytest's captured output.
            print(f"--- harkd output ---\n{self.output}")


class NotifySocket:
    """The service manager's end of $NOTIFY_SOCKET: an AF_UNIX datagram socket (a
    path, or abstract when it starts with '@'; a fresh abstract one by default) read
    by a thread, so datagrams are timestamped on arrival even while the event loop
    under test is blocked."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address or f"@harkd-test-{uuid.uuid4().hex}"
        self.messages: list[tuple[float, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.address[1:] if self.address.startswith("@") else self.address)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def fields(self) -> list[tuple[float, str, str]]:
        """Every KEY=value line received, with its arrival time."""
        return [
            (at, *line.split("=", 1))  # type: ignore[misc]
            for at, payload in list(self.messages)
            for line in payload.splitlines()
            if "=" in line
        ]

    def times(self, key: str, value: str | None = None) -> list[float]:
        return [at for at, k, v in self.fields() if k == key and (value is None or v == value)]

    def values(self, key: str) -> list[str]:
        return [v for _, k, v in self.fields() if k == key]

    async def wait_for(self, key: str, value: str | None = None, timeout_s: float = 20.0) -> float:
        """Arrival time of the first `KEY=value` (any value when None)."""
        deadline = time.monotonic() + timeout_s
        while not (found := self.times(key, value)):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {key}={value or '*'} within {timeout_s} s")
            await asyncio.sleep(0.01)
        return found[0]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self._sock.close()
