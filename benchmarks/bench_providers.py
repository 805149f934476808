"""The same figures for every built-in provider that has a fake, side by side.

Each provider's `harkd run` talks to that provider's fake server (harkd.testing) on
loopback, with the bench's tool-calling script (bench_session.bench_script). The
figures are taken at the provider-neutral seam inside the daemon, so they mean the
same for every protocol and need no knowledge of any of them:

* uplink_ms: ALSA read returns -> the adapter has written that period to its socket
  (`send_audio` returned; matched by a CRC of the PCM: the daemon captures at the
  provider's own input rate, so the bytes pass through). Includes the adapter's
  encoding; excludes the loopback transit, the same for every provider;
* downlink_ms: the websocket frame carrying an item's first audio is received (the
  `recv` that returned before the adapter delivered that `AudioDelta`) -> the ALSA
  thread writes the item's first samples. Includes the adapter's decoding;
* turn_overhead_ms: the frame that told the daemon about a tool call (a `ResponseDone`
  with calls, or a `FunctionCallDone`, whichever came last) -> the command that asks
  for the answer after the tool outputs (`RequestResponse`, or the last `ToolResult`
  where the provider answers by itself);
* cpu_s_per_min: CPU seconds (user + sys) of `harkd run` per minute of conversation:
  all providers' daemons stream the same WAV with two tool-calling turns side by side,
  over the same window; the ratio to openai is taken within each round, then the
  median over rounds is reported (a shared machine can be 20 % off in one round).

Latency runs on paced ALSA (a PulseAudio null sink, tests/pulse_fixture.py), one
provider after another. A provider registered later (Gemini, ElevenLabs) is picked up
from the registry as soon as it names a fake.

Standalone: `python benchmarks/bench_providers.py [--turns N] [--rounds N] [--window S]`
prints a Markdown table and the JSON. Child mode (internal): `--child CONFIG STAMPS`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

import bench_session as bs  # noqa: E402
from harkd.adapters.registry import BUILTIN, build_adapter  # noqa: E402
from harkd.config import parse_config  # noqa: E402
from harkd.testing.fakes import ProviderFake, fake_server  # noqa: E402

API_KEY = bs.API_KEY
BASELINE = "openai"
PERIOD_MS = 20


def providers() -> list[str]:
    """Built-in providers with a fake, the baseline first."""
    named = sorted(name for name, provider in BUILTIN.items() if provider.fake is not None)
    return sorted(named, key=lambda name: name != BASELINE)


def new_fake(provider: str, *, validate: bool = True) -> ProviderFake:
    """`provider`'s fake with the bench's script. `validate=False` turns off checking
    every client event where a fake can (its `strict`): the fake shares the bench's
    event loop, and a fake busy validating reads the daemon's socket late, which would
    count against harkd's uplink (bench_session's latency server does the same)."""
    fake = fake_server(provider, bs.bench_script(), api_keys={API_KEY}, record=False)
    if not validate and hasattr(fake, "strict"):
        fake.strict = False
    return fake


def rates(realtime: dict[str, Any]) -> tuple[int, int]:
    """The provider's (input, output) sample rates, as its adapter declares them."""
    rt = parse_config({"realtime": realtime}, "<bench>", {}).realtime
    traits = build_adapter(rt).traits
    return traits.input_format.rate, traits.output_format.rate


def write_config(
    path: Path,
    realtime: dict[str, Any],
    state_dir: Path,
    input_device: str,
    output_device: str | None,
    log_level: str = "warning",
) -> Path:
    in_rate, out_rate = rates(realtime)
    config = {
        "device": {"id": "bench", "name": "Bench"},
        "realtime": {**realtime, "turn_detection": "server_vad", "transcription_model": None},
        "audio": {
            "input": {"device": input_device, "rate": in_rate, "period_ms": PERIOD_MS},
            "output": {"device": output_device, "rate": out_rate},
        },
        "mqtt": {"enabled": False},
        "plugins": {"clock": {}},
        "state_dir": str(state_dir),
        "log_level": log_level,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------- the child


def child_main(config_path: str, stamps_path: str) -> int:
    """`harkd run` with stamps at the ALSA edges and at the adapter seam."""
    import websockets.asyncio.connection as wsconn

    from harkd import events as ev
    from harkd import service
    from harkd.cli import main

    captured, first_write = bs.stamp_alsa()
    sent: list[tuple[float, int]] = []
    first_delta: dict[str, float] = {}
    marks: list[tuple[float, str]] = []  # "calls", "result", "ask"
    last_recv = [0.0]

    original_recv = wsconn.Connection.recv

    async def recv(self: Any, *args: Any, **kwargs: Any) -> Any:
        message = await original_recv(self, *args, **kwargs)
        last_recv[0] = time.monotonic()
        return message

    wsconn.Connection.recv = recv  # type: ignore[method-assign]

    class Connection:
        def __init__(self, inner: Any) -> None:
            self._inner = inner

        def send(self, command: ev.Command) -> None:
            self._inner.send(command)
            if isinstance(command, ev.ToolResult):
                marks.append((time.monotonic(), "result"))
            elif isinstance(command, ev.RequestResponse):
                marks.append((time.monotonic(), "ask"))

        async def send_audio(self, pcm: bytes) -> None:
            await self._inner.send_audio(pcm)
            sent.append((time.monotonic(), zlib.crc32(pcm)))

        def update_session(self, settings: ev.SessionSettings) -> None:
            self._inner.update_session(settings)

        async def serve(self, on_event: Callable[[ev.ServerEvent], None]) -> None:
            def handled(event: ev.ServerEvent) -> None:
                if isinstance(event, ev.AudioDelta):
                    first_delta.setdefault(event.item_id, last_recv[0])
                elif isinstance(event, ev.FunctionCallDone) or (
                    isinstance(event, ev.ResponseDone) and event.function_calls
                ):
                    marks.append((last_recv[0], "calls"))
                on_event(event)

            await self._inner.serve(handled)

        async def close(self) -> None:
            await self._inner.close()

    class Adapter:
        def __init__(self, inner: Any) -> None:
            self._inner = inner
            self.name = inner.name
            self.traits = inner.traits

        async def connect(self, *args: Any, **kwargs: Any) -> Connection:
            return Connection(await self._inner.connect(*args, **kwargs))

    original_build = service.build_adapter
    service.build_adapter = lambda config: Adapter(original_build(config))  # type: ignore[assignment]
    try:
        return main(["run", "-c", config_path])
    finally:
        stamps = {
            "captured": captured,
            "sent": sent,
            "first_delta": first_delta,
            "first_write": first_write,
            "marks": marks,
        }
        Path(stamps_path).write_text(json.dumps(stamps))


# --------------------------------------------------------------------------- analysis


def uplink(captured: list[list[float]], sent: list[list[float]]) -> list[float]:
    """Capture -> written to the socket, for periods captured and sent exactly once."""
    seen: dict[int, list[float]] = {}
    for stamp, crc in captured:
        seen.setdefault(int(crc), []).append(stamp)
    out: dict[int, list[float]] = {}
    for stamp, crc in sent:
        out.setdefault(int(crc), []).append(stamp)
    return [
        (out[crc][0] - stamps[0]) * 1000
        for crc, stamps in seen.items()
        if len(stamps) == 1 and len(out.get(crc, ())) == 1
    ]


def downlink(first_delta: dict[str, float], first_write: dict[str, float]) -> list[float]:
    return [(first_write[i] - t) * 1000 for i, t in first_delta.items() if i in first_write]


def turn_overhead(marks: list[list[Any]]) -> list[float]:
    """Last call notice -> the ask for the answer (or the last tool result)."""
    overheads: list[float] = []
    notice: float | None = None
    last_result: float | None = None
    for stamp, kind in sorted(marks, key=lambda m: float(m[0])):
        if kind == "calls":
            if notice is not None and last_result is not None:
                overheads.append((last_result - notice) * 1000)  # answered by itself
                last_result = None
            notice = float(stamp)
        elif kind == "result" and notice is not None:
            last_result = float(stamp)
        elif kind == "ask" and notice is not None:
            overheads.append((float(stamp) - notice) * 1000)
            notice, last_result = None, None
    if notice is not None and last_result is not None:
        overheads.append((last_result - notice) * 1000)
    return overheads


# --------------------------------------------------------------------------- measurements


class Notifications:
    """A NOTIFY_SOCKET owned by the bench, read for as long as the daemon runs: a
    daemon blocks on a full notification socket, so nobody reading it would stall the
    very loop being measured. `connected` is set when the daemon says so."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connected = asyncio.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.setblocking(False)
        self._task: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if b"STATUS=connected" in await loop.sock_recv(self._sock, 4096):
                self.connected.set()

    async def __aenter__(self) -> Notifications:
        self._task = asyncio.create_task(self._read(), name=f"notify-{self.path.name}")
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sock.close()
        self.path.unlink(missing_ok=True)


async def latency(provider: str, pulse: Any, workdir: Path, turns: int) -> dict[str, Any]:
    """Uplink, downlink and turn overhead of `harkd run` on ALSA against `provider`'s fake."""
    period_ms, speech_ms, lead_ms = 3000.0, 800.0, 1500.0
    pcm = bs.timeline(
        lead_ms + turns * period_ms, [lead_ms + i * period_ms for i in range(turns)], speech_ms
    )
    stamps_path = workdir / f"stamps-{provider}.json"
    async with new_fake(provider, validate=False) as fake:
        config = write_config(
            workdir / f"latency-{provider}.yaml",
            fake.realtime_config(API_KEY),
            workdir / f"state-l-{provider}",
            "pulse",
            "pulse",
        )
        async with Notifications(workdir / f"notify-l-{provider}.sock") as notes:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--child",
                str(config),
                str(stamps_path),
                env=dict(pulse.env, NOTIFY_SOCKET=str(notes.path)),
                stderr=(workdir / f"latency-{provider}.log").open("wb"),
            )
            try:
                await asyncio.wait_for(notes.connected.wait(), 30)
                await asyncio.sleep(0.3)
                await bs._play_into_room(pulse, pcm)
                await asyncio.sleep(1.5)
            finally:
                code = await bs._terminate(proc)
    stamps = json.loads(stamps_path.read_text())
    return {
        "uplink_ms": bs.summary(uplink(stamps["captured"], stamps["sent"])),
        "downlink_ms": bs.summary(downlink(stamps["first_delta"], stamps["first_write"])),
        "turn_overhead_ms": bs.summary(turn_overhead(stamps["marks"])),
        "turns_planned": turns,
        "child_exit": code,
    }


async def cost_round(
    names: list[str], wav: Path, workdir: Path, window_s: float
) -> dict[str, dict[str, Any]]:
    """Every provider's `harkd run` streaming `wav` at once, each against its own fake;
    CPU and peak RSS over the same window."""
    results: dict[str, dict[str, Any]] = {}
    async with contextlib.AsyncExitStack() as stack:
        running: dict[str, tuple[asyncio.subprocess.Process, Path]] = {}
        for name in names:
            fake = await stack.enter_async_context(new_fake(name))
            config = write_config(
                workdir / f"cost-{name}.yaml",
                fake.realtime_config(API_KEY),
                workdir / f"state-c-{name}",
                f"file:{wav}",
                None,
                log_level="info",  # each tool call is logged: the turns are counted
            )
            notes = await stack.enter_async_context(
                Notifications(workdir / f"notify-c-{name}.sock")
            )
            log = workdir / f"cost-{name}.log"
            proc = await asyncio.create_subprocess_exec(
                bs.harkd_bin(),
                "run",
                "-c",
                str(config),
                env=dict(_plain_env(), NOTIFY_SOCKET=str(notes.path)),
                stderr=log.open("wb"),
            )
            stack.push_async_callback(bs._terminate, proc)
            try:
                await asyncio.wait_for(notes.connected.wait(), 30)
            except TimeoutError:
                results[name] = {"error": f"never connected: {_tail(log)}"}
                await bs._terminate(proc)
                continue
            running[name] = (proc, log)
        await asyncio.sleep(0.5)
        ticks = {name: bs.proc_cpu_ticks(proc.pid) for name, (proc, _) in running.items()}
        begin = time.monotonic()
        await asyncio.sleep(window_s)
        wall = time.monotonic() - begin
        for name, (proc, log) in running.items():
            if proc.returncode is not None:
                results[name] = {"error": f"exited early ({proc.returncode}): {_tail(log)}"}
                continue
            cpu_s = (bs.proc_cpu_ticks(proc.pid) - ticks[name]) / bs.CLK_TCK
            results[name] = {
                "cpu_s_per_min": round(cpu_s / wall * 60, 3),
                "cpu_percent": round(cpu_s / wall * 100, 2),
                "peak_rss_mb": round(bs.proc_memory_kb(proc.pid)["VmHWM"] / 1024, 1),
            }
    for name in running:
        if "cpu_s_per_min" in results.get(name, {}):
            text = (workdir / f"cost-{name}.log").read_text(errors="replace")
            results[name]["tool_turns"] = text.count("tool get_time(")
    return results


def _plain_env() -> dict[str, str]:
    from harkd_process import harkd_env

    return harkd_env()


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else "no output"


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize(names: list[str], rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Medians over rounds, and each provider's CPU ratio to the baseline within rounds."""
    out: dict[str, Any] = {}
    for name in names:
        ok = [r[name] for r in rounds if "cpu_s_per_min" in r.get(name, {})]
        ratios = [
            r[name]["cpu_s_per_min"] / r[BASELINE]["cpu_s_per_min"]
            for r in rounds
            if "cpu_s_per_min" in r.get(name, {})
            and r.get(BASELINE, {}).get("cpu_s_per_min", 0) > 0
        ]
        out[name] = {
            "cpu_s_per_min": median([r["cpu_s_per_min"] for r in ok]),
            "peak_rss_mb": median([r["peak_rss_mb"] for r in ok]),
            "tool_turns": [r["tool_turns"] for r in ok],
            "cpu_ratio_to_openai": median(ratios),
            "rounds_ok": len(ok),
            "errors": [r[name]["error"] for r in rounds if "error" in r.get(name, {})],
        }
    return out


async def measure(
    pulse: Any,
    workdir: Path,
    log: Callable[[str], None],
    turns: int = 10,
    rounds: int = 3,
    window_s: float = 60.0,
) -> dict[str, Any]:
    """Latency per provider (one after another), then the cost rounds (side by side)."""
    names = providers()
    result: dict[str, Any] = {"providers": names, "latency": {}}
    for name in names:
        log(f"providers: latency of {name}, {turns} tool-calling turns on ALSA (pulse)")
        result["latency"][name] = await latency(name, pulse, workdir, turns)
    wav = bs.cost_audio(workdir)
    cost_rounds = []
    for index in range(rounds):
        log(f"providers: cost round {index + 1}/{rounds}: {', '.join(names)} side by side")
        order = names[index % len(names) :] + names[: index % len(names)]
        cost_rounds.append(await cost_round(order, wav, workdir, window_s))
    result["cost_rounds"] = cost_rounds
    result["cost"] = summarize(names, cost_rounds)
    result["settings"] = {"turns": turns, "rounds": rounds, "window_s": window_s}
    return result


# --------------------------------------------------------------------------- report


def _ms(summary: dict[str, Any]) -> str:
    if not summary.get("n"):
        return "n/a"
    return f"{summary['median']:.2f} (p95 {summary['p95']:.2f}, n={summary['n']})"


def markdown(result: dict[str, Any]) -> str:
    """The side-by-side table."""
    settings = result["settings"]
    lines = [
        f"Providers against their fakes: latency medians in ms over {settings['turns']} "
        f"turns each; CPU medians over {settings['rounds']} rounds of "
        f"{settings['window_s']:g} s side by side.",
        "",
        "| provider | uplink ms | downlink ms | turn overhead ms | CPU s / min | "
        "CPU vs openai | peak RSS MB | tool turns per round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in result["providers"]:
        lat, cost = result["latency"][name], result["cost"][name]
        cpu, ratio = cost["cpu_s_per_min"], cost["cpu_ratio_to_openai"]
        lines.append(
            f"| {name} | {_ms(lat['uplink_ms'])} | {_ms(lat['downlink_ms'])} | "
            f"{_ms(lat['turn_overhead_ms'])} | {'n/a' if cpu is None else f'{cpu:.2f}'} | "
            f"{'n/a' if ratio is None else f'{ratio:.2f}x'} | {cost['peak_rss_mb']} | "
            f"{cost['tool_turns']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "STAMPS"))
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=float, default=60.0)
    args = parser.parse_args()
    if args.child:
        sys.exit(child_main(*args.child))
    from pulse_fixture import PulseServer

    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    with (
        tempfile.TemporaryDirectory(prefix="harkd-bench-providers-") as tmp,
        PulseServer.start_new() as pulse,
    ):
        result = asyncio.run(measure(pulse, Path(tmp), log, args.turns, args.rounds, args.window))
    print(markdown(result))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
