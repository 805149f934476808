"""Whole-daemon measurements against the fake realtime server on loopback.

* uplink_ms: ALSA read returns (``AudioFrame.captured_at`` in the daemon) -> the
  ``input_audio_buffer.append`` carrying those very samples reaches the server
  (matched by a CRC of the PCM; the daemon captures at 24 kHz, so bytes pass through);
* downlink_ms: the server sends an item's first ``response.output_audio.delta`` ->
  the daemon's ALSA thread writes that item's first samples;
* turn_overhead_ms: the server sends ``response.done`` of a tool-calling response ->
  the daemon's ``response.create`` (after the tool output) reaches the server;
* startup_s: exec of ``harkd run`` -> ``READY=1`` on a NOTIFY_SOCKET owned by the bench;
* cost: CPU (user+sys over wall, from /proc/PID/stat) and peak RSS (VmHWM) of
  ``harkd run`` streaming a 60 s WAV with two tool-calling turns (see ``cost_round``,
  which run.py also uses to measure the peer clients side by side).

Both sides stamp with ``time.monotonic()`` (CLOCK_MONOTONIC, system-wide), so a
daemon in a child process and the fake server in this process share one clock. The
latency child runs the real ``harkd run`` code path (``harkd.cli.main``) with thin
stamping wrappers around ``AlsaInput._put`` and ``AlsaOutput.play/_write``; audio is
real, paced ALSA through a PulseAudio null sink (tests/pulse_fixture.py).

Standalone: ``python benchmarks/bench_session.py`` prints one JSON object.
Child mode (internal): ``python benchmarks/bench_session.py --child CONFIG STAMPS``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time
import wave
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from harkd.audio.resample import StreamResampler  # noqa: E402
from harkd.audio.wav import read_wav  # noqa: E402
from harkd.testing import fake_server as fs  # noqa: E402
from harkd.testing.fake_server import (  # noqa: E402
    FakeRealtimeServer,
    FakeScript,
    ToolRule,
    synthesize_speech,
)

RATE = 24000
TOOL = "get_time"
USER_TEXT = "what time is it"
REPLY = "It is noon, just as you asked."
API_KEY = "sk-bench-not-a-real-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- helpers


def summary(values: Sequence[float], digits: int = 3) -> dict[str, float]:
    """median / p95 / max / n of `values` (empty -> n 0 only)."""
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), digits),
        "p95": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], digits),
        "max": round(ordered[-1], digits),
        "n": len(ordered),
    }


def harkd_bin() -> str:
    """The `harkd` console script of this interpreter's environment."""
    candidate = Path(sys.executable).with_name("harkd")
    return str(candidate) if candidate.exists() else "harkd"


class BenchScript(FakeScript):
    """Every turn asks for the time: one tool call, then a short spoken answer."""

    def next_transcript(self, audio_ms: float) -> str:
        return USER_TEXT


def bench_script() -> FakeScript:
    return BenchScript(
        tool_rules=[ToolRule("time", name=TOOL)],
        tool_reply=lambda outputs: REPLY,
        reply=REPLY,
    )


def noise(ms: float, rms: float = 0.002, seed: int = 7, rate: int = RATE) -> np.ndarray:
    """Faint white noise (a quiet room), far below the fake server's VAD threshold."""
    rng = np.random.default_rng(seed)
    return rng.normal(0.0, rms * 32767, round(ms * rate / 1000))


def timeline(total_ms: float, speech_at_ms: Sequence[float], speech_ms: float) -> bytes:
    """PCM16 24 kHz mono: room noise with speech bursts starting at `speech_at_ms`."""
    signal_ = noise(total_ms)
    for start in speech_at_ms:
        speech = np.frombuffer(synthesize_speech(speech_ms), dtype="<i2").astype(np.float64)
        first = round(start * RATE / 1000)
        signal_[first : first + len(speech)] += speech[: len(signal_) - first]
    return np.clip(np.rint(signal_), -32768, 32767).astype("<i2").tobytes()


def write_wav(path: Path, pcm: bytes, rate: int = RATE) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)
    return path


def write_config(
    path: Path,
    url: str,
    state_dir: Path,
    input_device: str,
    output_device: str | None,
    **sections: Any,
) -> Path:
    config: dict[str, Any] = {
        "device": {"id": "bench", "name": "Bench"},
        "realtime": {
            "url": url,
            "api_key": API_KEY,
            "turn_detection": "server_vad",
            "transcription_model": None,
        },
        "audio": {
            "input": {"device": input_device, "rate": RATE, "period_ms": 20},
            "output": {"device": output_device, "rate": RATE},
        },
        "mqtt": {"enabled": False},
        "plugins": {"clock": {}},
        "state_dir": str(state_dir),
        "log_level": "warning",
        **sections,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- stamping server


class StampedServer(FakeRealtimeServer):
    """The fake server, noting when client events arrive and chosen events leave."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stamping = False
        # (monotonic, session index, event type, payload of interest)
        self.inbound: list[tuple[float, int, str, Any]] = []
        self.outbound: list[tuple[float, int, str, Any]] = []
        self.updates: dict[int, float] = {}

    async def _record(self, index: int, event: dict[str, Any]) -> None:
        now = time.monotonic()
        kind = str(event.get("type"))
        if kind == "session.update":
            self.updates.setdefault(index, now)
        if self.stamping:
            extra = event.get("audio") if kind == "input_audio_buffer.append" else None
            self.inbound.append((now, index, kind, extra))
        await super()._record(index, event)

    async def wait_updates(self, count: int, timeout_s: float) -> None:
        """Until `count` sessions have sent their first session.update."""
        deadline = time.monotonic() + timeout_s
        while len(self.updates) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.updates)} of {count} clients configured")
            await asyncio.sleep(0.02)


_original_send = fs._Connection.send


async def _stamped_send(self: Any, event: dict[str, Any]) -> None:
    server = self.server
    if isinstance(server, StampedServer) and server.stamping:
        kind = event.get("type")
        if kind == "response.output_audio.delta":
            server.outbound.append((time.monotonic(), self.state.index, kind, event["item_id"]))
        elif kind == "response.done":
            output = event["response"].get("output") or []
            calls = any(item.get("type") == "function_call" for item in output)
            server.outbound.append((time.monotonic(), self.state.index, kind, calls))
    await _original_send(self, event)


fs._Connection.send = _stamped_send  # type: ignore[method-assign]


# --------------------------------------------------------------------------- the child


def child_main(config_path: str, stamps_path: str) -> int:
    """`harkd run` with stamps at the ALSA edges; writes them to `stamps_path` on exit."""
    from harkd.cli import main

    captured, first_write = stamp_alsa()
    try:
        return main(["run", "-c", config_path])
    finally:
        Path(stamps_path).write_text(json.dumps({"captured": captured, "first_write": first_write}))


def stamp_alsa() -> tuple[list[tuple[float, int]], dict[str, float]]:
    """Wrap this process's ALSA edges: the lists it returns fill with (captured_at, CRC
    of the PCM) of every captured period and the time each item's first samples were
    written to the device."""
    from harkd.audio import alsa

    captured: list[tuple[float, int]] = []
    first_write: dict[str, float] = {}
    pending: list[str | None] = [None]

    original_put = alsa.AlsaInput._put
    original_play = alsa.AlsaOutput.play
    original_write = alsa.AlsaOutput._write

    def put(self: Any, frame: Any) -> None:
        if frame is not None:
            captured.append((frame.captured_at, zlib.crc32(frame.pcm)))
        original_put(self, frame)

    def play(self: Any, item_id: str, pcm: bytes) -> None:
        if item_id not in first_write and pending[0] != item_id:
            pending[0] = item_id
        original_play(self, item_id, pcm)

    def write(self: Any, pcm: Any, data: bytes, *, meter: bool) -> int:
        written: int = original_write(self, pcm, data, meter=meter)
        item = pending[0]
        if meter and written and item is not None:
            first_write[item] = time.monotonic()
            pending[0] = None
        return written

    alsa.AlsaInput._put = put  # type: ignore[method-assign]
    alsa.AlsaOutput.play = play  # type: ignore[method-assign]
    alsa.AlsaOutput._write = write  # type: ignore[method-assign]
    return captured, first_write


# --------------------------------------------------------------------------- latency


def _uplink(server: StampedServer, captured: list[list[float]]) -> list[float]:
    sent: dict[int, list[float]] = {}
    for stamp, _, kind, audio in server.inbound:
        if kind == "input_audio_buffer.append":
            sent.setdefault(zlib.crc32(base64.b64decode(audio)), []).append(stamp)
    seen: dict[int, list[float]] = {}
    for stamp, crc in captured:
        seen.setdefault(int(crc), []).append(stamp)
    return [
        (sent[crc][0] - stamps[0]) * 1000
        for crc, stamps in seen.items()
        if len(stamps) == 1 and len(sent.get(crc, ())) == 1
    ]


def _downlink(server: StampedServer, first_write: Mapping[str, float]) -> list[float]:
    first_delta: dict[str, float] = {}
    for stamp, _, kind, item in server.outbound:
        if kind == "response.output_audio.delta":
            first_delta.setdefault(item, stamp)
    return [(first_write[i] - t) * 1000 for i, t in first_delta.items() if i in first_write]


def _turn_overhead(server: StampedServer) -> list[float]:
    events = sorted(
        [(t, "out", kind, extra) for t, _, kind, extra in server.outbound]
        + [(t, "in", kind, None) for t, _, kind, _ in server.inbound if kind == "response.create"]
    )
    overheads, done_at = [], None
    for stamp, direction, kind, extra in events:
        if direction == "out" and kind == "response.done" and extra:
            done_at = stamp
        elif direction == "in" and done_at is not None:
            overheads.append((stamp - done_at) * 1000)
            done_at = None
    return overheads


async def _play_into_room(pulse: Any, pcm: bytes) -> None:
    """Speak `pcm` into the null sink in real time (pacat paces it)."""
    proc = await asyncio.create_subprocess_exec(
        "pacat",
        "--playback",
        f"--server={pulse.server}",
        "--device=room",
        "--raw",
        "--format=s16le",
        f"--rate={RATE}",
        "--channels=1",
        "--latency-msec=20",
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdin is not None
    proc.stdin.write(pcm)
    await proc.stdin.drain()
    proc.stdin.close()
    await proc.wait()


async def _terminate(proc: asyncio.subprocess.Process, timeout_s: float = 8.0) -> int:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    return proc.returncode if proc.returncode is not None else -1


async def latency(
    server: StampedServer, pulse: Any, workdir: Path, turns: int = 14
) -> dict[str, Any]:
    """Uplink, downlink and turn overhead of `harkd run` on ALSA (pulse), `turns` turns."""
    period_ms, speech_ms, lead_ms = 3000.0, 800.0, 1500.0
    total = lead_ms + turns * period_ms
    pcm = timeline(total, [lead_ms + i * period_ms for i in range(turns)], speech_ms)
    config = write_config(
        workdir / "latency.yaml", server.url, workdir / "state-l", "pulse", "pulse"
    )
    stamps_path = workdir / "stamps.json"
    server.inbound.clear()
    server.outbound.clear()
    server.updates.clear()
    first = len(server.sessions)
    server.stamping = True
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--child",
        str(config),
        str(stamps_path),
        env=pulse.env,
        stderr=(workdir / "latency-child.log").open("wb"),
    )
    try:
        await server.wait_updates(1, 20)
        await asyncio.sleep(0.3)
        await _play_into_room(pulse, pcm)
        await asyncio.sleep(1.5)
    finally:
        code = await _terminate(proc)
        server.stamping = False
    stamps = json.loads(stamps_path.read_text())
    sessions = server.sessions[first:]
    tool_turns = sum(
        1
        for s in sessions
        for r in s.responses
        if any(i.get("type") == "function_call" for i in r.get("output") or [])
    )
    return {
        "uplink_ms": summary(_uplink(server, stamps["captured"])),
        "downlink_ms": summary(_downlink(server, stamps["first_write"])),
        "turn_overhead_ms": summary(_turn_overhead(server)),
        "turns_planned": turns,
        "tool_turns_seen": tool_turns,
        "child_exit": code,
    }


# --------------------------------------------------------------------------- start-up


async def startup(url: str, pulse: Any, workdir: Path, runs: int = 5) -> dict[str, Any]:
    """exec `harkd run` -> READY=1 on our NOTIFY_SOCKET, `runs` times (ALSA via pulse)."""
    config = write_config(workdir / "startup.yaml", url, workdir / "state-s", "pulse", "pulse")
    loop = asyncio.get_running_loop()
    times: list[float] = []
    for run in range(runs):
        path = workdir / f"notify-{run}.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        sock.setblocking(False)
        env = dict(pulse.env, NOTIFY_SOCKET=str(path))
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(
            harkd_bin(),
            "run",
            "-c",
            str(config),
            env=env,
            stderr=(workdir / f"startup-{run}.log").open("wb"),
        )
        try:
            async with asyncio.timeout(15):
                while b"READY=1" not in await loop.sock_recv(sock, 4096):
                    pass
            times.append(time.monotonic() - started)
        finally:
            await _terminate(proc)
            sock.close()
            path.unlink(missing_ok=True)
    return {"startup_s": summary(times), **await help_startup(runs)}


async def help_startup(runs: int) -> dict[str, Any]:
    """exec `harkd --help` -> exit, beside the interpreter alone (`python -c pass`, the
    floor every Python program pays), alternating, `runs` times each."""
    commands = {
        "help_s": [harkd_bin(), "--help"],
        "python_s": [sys.executable, "-c", "pass"],
    }
    times: dict[str, list[float]] = {key: [] for key in commands}
    for _ in range(runs):
        for key, argv in commands.items():
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
            )
            if await proc.wait() != 0:
                raise RuntimeError(f"{' '.join(argv)} failed")
            times[key].append(time.monotonic() - started)
    return {key: summary(values) for key, values in times.items()}


# --------------------------------------------------------------------------- cost


def proc_cpu_ticks(pid: int) -> int:
    """utime + stime of `pid` (all threads), in clock ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def proc_memory_kb(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS) and VmRSS of `pid`, in kB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0])
    return values


@dataclass
class Client:
    """One client process of a cost round."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    proc: asyncio.subprocess.Process | None = None
    session_index: int = -1
    ticks: list[int] = field(default_factory=list)
    log: Path | None = None


async def cost_round(
    server: StampedServer,
    clients: list[Client],
    workdir: Path,
    window_s: float = 60.0,
    connect_timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Start `clients` one after another (each until it configured its session), then
    measure CPU and peak RSS of each over the same `window_s` of streaming."""
    results: dict[str, Any] = {}
    started: list[Client] = []
    try:
        for client in clients:
            expected = len(server.updates) + 1
            client.log = workdir / f"{client.name}.log"
            client.proc = await asyncio.create_subprocess_exec(
                *client.argv,
                env=client.env,
                stdout=(workdir / f"{client.name}.out").open("wb"),
                stderr=client.log.open("wb"),
            )
            started.append(client)
            try:
                await server.wait_updates(expected, connect_timeout_s)
            except TimeoutError:
                code = client.proc.returncode
                tail = client.log.read_text(errors="replace").strip()
                last = tail.splitlines()[-1] if tail else "no output"
                results[client.name] = {
                    "error": f"never configured a session (exit {code}): {last[:300]}",
                    "log_tail": tail[-2000:],
                }
                await _terminate(client.proc)
                started.remove(client)
                continue
            client.session_index = max(server.updates)
        await asyncio.sleep(0.5)
        live = [c for c in started if c.proc is not None and c.proc.returncode is None]
        begin = time.monotonic()
        for c in live:
            assert c.proc is not None
            c.ticks.append(proc_cpu_ticks(c.proc.pid))
        await asyncio.sleep(window_s)
        wall = time.monotonic() - begin
        for c in live:
            assert c.proc is not None
            if c.proc.returncode is not None:
                results[c.name] = {"error": f"exited early ({c.proc.returncode})"}
                continue
            c.ticks.append(proc_cpu_ticks(c.proc.pid))
            memory = proc_memory_kb(c.proc.pid)
            session = server.sessions[c.session_index]
            tool_turns = sum(
                1
                for r in session.responses
                if any(i.get("type") == "function_call" for i in r.get("output") or [])
            )
            results[c.name] = {
                "cpu_percent": round((c.ticks[1] - c.ticks[0]) / CLK_TCK / wall * 100, 2),
                "peak_rss_mb": round(memory["VmHWM"] / 1024, 1),
                "rss_mb": round(memory["VmRSS"] / 1024, 1),
                "responses": len(session.responses),
                "tool_turns": tool_turns,
                "audio_in_s": round(session.audio_ms_received / 1000, 1),
                "errors_sent": [e["error"].get("code") for e in session.errors_sent][:5],
            }
    finally:
        for c in started:
            if c.proc is not None:
                await _terminate(c.proc)
    return results


def cost_audio(workdir: Path, seconds: float = 64.0) -> Path:
    """The shared workload: `seconds` of room noise with two spoken turns (12 s, 36 s)."""
    return write_wav(workdir / "session.wav", timeline(seconds * 1000, [12000, 36000], 1500))


def harkd_client(url: str, wav: Path, workdir: Path, capture_rate: int | None = 16000) -> Client:
    """`harkd run` on the default config with the WAV as microphone and a paced null
    speaker (like the peers, which play nothing). The microphone is the WAV at the
    default capture rate, 16 kHz, so harkd resamples to the provider's 24 kHz as a
    default install does (the peers stream the 24 kHz original); `capture_rate=None`
    gives harkd the peers' WAV itself (client `harkd_24k`: the same audio, no
    resampling)."""
    name = "harkd" if capture_rate else "harkd_24k"
    mic = (
        to_capture_rate(wav, workdir / f"session-{capture_rate}.wav", capture_rate)
        if capture_rate
        else wav
    )
    config = write_config(
        workdir / f"cost-{name}.yaml", url, workdir / f"state-{name}", f"file:{mic}", None
    )
    return Client(name, [harkd_bin(), "run", "-c", str(config)])


WAKE_TURNS_AT_S = (4.0, 24.0, 44.0)
"""Where the wake-word client's three requests start in its 64 s microphone."""


def harkd_wake_client(url: str, workdir: Path, seconds: float = 64.0) -> Client:
    """`harkd run` with the wake word armed on a connected session (issue 19's second
    workload): room noise with three requests, each a sentence without the wake word
    and then "okay nabu, what time is it" (the demo's bundled recording)."""
    from harkd.demo import WAKE_INPUT

    speech, rate = read_wav(Path(str(files("harkd") / "data" / WAKE_INPUT)))
    mixed = noise(seconds * 1000, rate=rate)
    voice = np.frombuffer(speech, dtype="<i2")
    for start_s in WAKE_TURNS_AT_S:
        first = round(start_s * rate)
        mixed[first : first + len(voice)] += voice[: len(mixed) - first]
    pcm = np.clip(np.rint(mixed), -32768, 32767).astype("<i2").tobytes()
    mic = write_wav(workdir / "wake-session.wav", pcm, rate)
    config = write_config(
        workdir / "cost-wake.yaml",
        url,
        workdir / "state-w",
        f"file:{mic}",
        None,
        # No arbitration (it needs MQTT, which is off) and the built-in chime.
        wake={"enabled": True, "arbitration": False},
    )
    return Client("harkd_wake", [harkd_bin(), "run", "-c", str(config)])


def to_capture_rate(wav: Path, out: Path, rate: int = 16000) -> Path:
    """`wav` as a `rate` WAV."""
    pcm, in_rate = read_wav(wav)
    return write_wav(out, to_rate(pcm, in_rate, rate), rate)


def to_rate(pcm: bytes, in_rate: int, out_rate: int) -> bytes:
    """PCM16 mono resampled whole (HQ, with the filter's tail)."""
    resampler = StreamResampler(in_rate, out_rate, quality="HQ")
    return resampler.process(pcm) + resampler.flush()


# --------------------------------------------------------------------------- standalone


def _median_of(rounds: list[dict[str, Any]], name: str, key: str) -> float | None:
    values = [r[name][key] for r in rounds if key in r.get(name, {})]
    return round(statistics.median(values), 2) if values else None


async def run(rounds: int = 1, window_s: float = 60.0) -> dict[str, Any]:
    """All of this module's measurements (harkd alone), as one dict."""
    from pulse_fixture import PulseServer

    result: dict[str, Any] = {}
    with (
        tempfile.TemporaryDirectory(prefix="harkd-bench-") as tmp,
        PulseServer.start_new() as pulse,
    ):
        workdir = Path(tmp)
        server = StampedServer(bench_script(), strict=False, record=False)
        async with server:
            result.update(await latency(server, pulse, workdir))
            result.update(await startup(server.url, pulse, workdir))
            wav = cost_audio(workdir)
            runs = [
                await cost_round(
                    server, [harkd_client(server.url, wav, workdir)], workdir, window_s
                )
                for _ in range(rounds)
            ]
            result["cost_rounds"] = runs
            result["cost"] = {
                "cpu_percent": _median_of(runs, "harkd", "cpu_percent"),
                "peak_rss_mb": _median_of(runs, "harkd", "peak_rss_mb"),
            }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "STAMPS"))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--window", type=float, default=60.0)
    args = parser.parse_args()
    if args.child:
        sys.exit(child_main(*args.child))
    print(json.dumps(asyncio.run(run(args.rounds, args.window)), indent=2))


if __name__ == "__main__":
    main()
