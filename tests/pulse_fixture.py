"""A private PulseAudio server with a null sink "room": paced, hardware-like audio.

Importable by tests, benchmarks and end-to-end runs (no pytest needed here):

    with PulseServer.start_new() as pulse:   # sets PULSE_SERVER for this process
        rec = pulse.record(rate=24000)       # what the room hears (room.monitor)
        ... play through the ALSA PCM "pulse" ...
        rec.stop(); rec.samples(), rec.arrivals

The ALSA PCM `pulse` (libasound2-plugins) then plays into the sink and captures from
its monitor. A null sink that nobody asks for low latency renders up to 2 s ahead,
so the server keeps a low-latency recorder on the monitor at all times ("keeper");
with it the sink behaves like a sound card with ~10 ms of latency.

pytest: the session fixture `pulse` in `tests/conftest.py` wraps it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np

SINK = "room"


class PulseUnavailable(RuntimeError):
    """PulseAudio cannot run here (binary missing or the server does not start)."""


@dataclass
class Recording:
    """A running `pacat --record` of room.monitor; chunks stamped on arrival."""

    rate: int
    process: subprocess.Popen[bytes]
    chunks: list[tuple[float, bytes]] = field(default_factory=list)
    _thread: threading.Thread | None = None

    def _pump(self) -> None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while True:
            data = os.read(fd, 4096)
            if not data:
                return
            self.chunks.append((time.monotonic(), data))

    def stop(self) -> None:
        """Stop recording and wait for the last chunk."""
        _terminate(self.process)
        if self._thread is not None:
            self._thread.join(5)

    def samples(self) -> np.ndarray:
        """Everything recorded, as int16 samples."""
        data = b"".join(chunk for _, chunk in self.chunks)
        return np.frombuffer(data[: len(data) - len(data) % 2], dtype="<i2")

    def arrival_of(self, sample_index: int) -> float:
        """`time.monotonic()` when the chunk holding `sample_index` arrived."""
        offset = sample_index * 2
        for stamp, chunk in self.chunks:
            if offset < len(chunk):
                return stamp
            offset -= len(chunk)
        raise IndexError(sample_index)


class PulseServer:
    """One private PulseAudio daemon (anonymous auth on a private socket)."""

    def __init__(self, directory: Path, process: subprocess.Popen[bytes]) -> None:
        self.directory = directory
        self.process = process
        self.socket = directory / "native"
        self.server = f"unix:{self.socket}"
        self._keeper: subprocess.Popen[bytes] | None = None
        self._saved_env: str | None = os.environ.get("PULSE_SERVER")

    @classmethod
    def start_new(cls, timeout_s: float = 10.0) -> PulseServer:
        """Start a server with the null sink "room"; raises PulseUnavailable if it cannot."""
        binary = shutil.which("pulseaudio")
        if binary is None or shutil.which("pactl") is None or shutil.which("pacat") is None:
            raise PulseUnavailable("pulseaudio / pulseaudio-utils are not installed")
        directory = Path(tempfile.mkdtemp(prefix="harkd-pulse-"))
        env = dict(os.environ, XDG_RUNTIME_DIR=str(directory), HOME=str(directory))
        env.pop("PULSE_SERVER", None)
        socket = directory / "native"
        process = subprocess.Popen(
            [
                binary,
                "--daemonize=no",
                "--exit-idle-time=-1",
                "--use-pid-file=no",
                "--disable-shm=yes",
                "--log-level=error",
                "-n",
                f"--load=module-native-protocol-unix auth-anonymous=1 socket={socket}",
                f"--load=module-null-sink sink_name={SINK} rate=48000",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        server = cls(directory, process)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                shutil.rmtree(directory, ignore_errors=True)
                raise PulseUnavailable(f"pulseaudio exited ({process.returncode}): {err.strip()}")
            if socket.exists() and server._pactl("info", check=False).returncode == 0:
                os.environ["PULSE_SERVER"] = server.server
                server._start_keeper()
                server._wait_low_latency(deadline)
                return server
            time.sleep(0.05)
        server.close()
        raise PulseUnavailable(f"pulseaudio did not answer within {timeout_s:.0f} s")

    def __enter__(self) -> PulseServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses that should use this server."""
        return dict(os.environ, PULSE_SERVER=self.server)

    def record(self, rate: int = 24000, latency_ms: int = 5) -> Recording:
        """Start recording what the room hears (mono PCM16 at `rate`)."""
        recording = Recording(rate, self._recorder(rate, latency_ms, subprocess.PIPE))
        recording._thread = threading.Thread(target=recording._pump, daemon=True)
        recording._thread.start()
        return recording

    def _recorder(self, rate: int, latency_ms: int, stdout: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                "pacat",
                "--record",
                f"--server={self.server}",
                f"--device={SINK}.monitor",
                "--raw",
                "--format=s16le",
                f"--rate={rate}",
                "--channels=1",
                f"--latency-msec={latency_ms}",
            ],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
        )

    async def play(self, pcm: bytes, rate: int = 16_000) -> None:
        """Say `pcm` (PCM16 mono) in the room, as a person would; returns once said."""
        process = await asyncio.create_subprocess_exec(
            "pacat",
            "--playback",
            f"--server={self.server}",
            f"--device={SINK}",
            "--raw",
            "--format=s16le",
            f"--rate={rate}",
            "--channels=1",
            "--latency-msec=100",  # a person does not stutter: no underruns under load
            stdin=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        await process.communicate(pcm)
        if process.returncode != 0:
            raise RuntimeError(f"pacat --playback failed ({process.returncode})")

    def unload_sink(self) -> None:
        """Make the room's sink (and its monitor) disappear, as an unplugged card does."""
        self._stop_keeper()
        self._pactl("unload-module", "module-null-sink")

    def load_sink(self) -> None:
        """Bring the sink back."""
        self._load_sink_module()
        self._start_keeper()
        self._wait_low_latency(time.monotonic() + 5)

    def load_sink_and_record(self, rate: int = 24000) -> Recording:
        """Bring the sink back with a recording of it started first (see `record`).

        The recorder is then listening a few tens of ms after the sink appears, before
        a player retrying every half second is likely to find it.
        """
        self._load_sink_module()
        recording = self.record(rate)
        self._start_keeper()
        self._wait_low_latency(time.monotonic() + 5)
        return recording

    def suspend_sink(self, suspended: bool) -> None:
        """Suspend the sink (and its monitor) or resume it.

        A suspended source delivers nothing and reports no error: a capture stream on
        it stops as on a sound card that hangs (a blocking read never returns, even
        after the resume).
        """
        self._pactl("suspend-sink", SINK, "1" if suspended else "0")
        if not suspended:
            self._wait_low_latency(time.monotonic() + 5)

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self._stop_keeper()
        if self.process.poll() is None:
            _terminate(self.process)
        if self._saved_env is None:
            os.environ.pop("PULSE_SERVER", None)
        else:
            os.environ["PULSE_SERVER"] = self._saved_env
        shutil.rmtree(self.directory, ignore_errors=True)

    def _load_sink_module(self) -> None:
        self._pactl("load-module", "module-null-sink", f"sink_name={SINK}", "rate=48000")

    def _start_keeper(self) -> None:
        # Keeps the null sink at ~10 ms latency (see the module docstring).
        self._keeper = self._recorder(8000, 10, subprocess.DEVNULL)

    def _wait_low_latency(self, deadline: float) -> None:
        # An idle null sink has rendered up to 2 s ahead; wait until that has run out.
        while time.monotonic() < deadline:
            listing = self._pactl("list", "sinks", check=False).stdout.decode(errors="replace")
            for line in listing.splitlines():
                if line.strip().startswith("Latency:"):
                    usec = int(line.split()[1])
                    if usec < 50_000:
                        return
            time.sleep(0.05)
        raise PulseUnavailable("the null sink did not settle to a low latency")

    def _stop_keeper(self) -> None:
        keeper, self._keeper = self._keeper, None
        if keeper is not None:
            keeper.terminate()
            keeper.wait(5)

    def _pactl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["pactl", f"--server={self.server}", *args],
            capture_output=True,
            timeout=10,
            check=check,
        )


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still there after 5 s."""
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
