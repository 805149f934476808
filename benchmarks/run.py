"""`make bench`: every harkd benchmark in one invocation, against one fake realtime server.

Phases (all on loopback, same machine, same run; about 21 minutes on 2 cores):

1. latency   `harkd run` on paced ALSA (PulseAudio null sink), 20 tool-calling turns:
             uplink, downlink and turn overhead (benchmarks/bench_session.py);
2. start-up  exec of `harkd run` -> READY=1 on the bench's NOTIFY_SOCKET, 7 times;
             exec of `harkd --help` -> exit beside `python -c pass`, 7 times each;
3. barge-in  benchmarks/bench_audio.py's barge-in: stop -> room silent, and the
             played-ms the daemon would truncate at minus what the room heard;
   echo      benchmarks/bench_echo.py: echo cancellation in the room where the mic
             hears the speaker (ERLE, convergence, double talk, CPU, barge-in, the
             wake word over an answer);
4. cost      5 rounds; in each, `harkd run` on the default config (the WAV at 16 kHz,
             resampled to 24 kHz) and the peers (benchmarks/peers.py: the `bare`
             websockets + json + base64 client, the floor of issue 19, the `openai`
             SDK realtime connection and an `openai-agents` RealtimeRunner session)
             stream the same 64 s WAV with two tool-calling turns side by side;
             `harkd_24k` is harkd on the peers' 24 kHz WAV itself (no resampling),
             and `harkd_wake` harkd with the wake word armed and connected on its
             own WAV with three wake-word requests; CPU and peak RSS over the same
             60 s window. Ratios are taken within each round, then the median over
             rounds is reported (5 rounds: on a shared machine one round can be 20%
             off either way);
5. wake      benchmarks/bench_wake.py: CPU of `harkd run` waiting for a wake word
             (silent room, non-wake speech) beside the engine's own CLI, no traffic
             with `connect: on_demand`; wake word end -> B/wake, first audio, session
             open in the room; detection rate and false wakes on generated audio;
             whether "okay nabu, <command>" in one breath starts a turn, chime or not,
             and whether the chime alone does in reverberant rooms;
6. components bench_vad.py and bench_resample.py (CPU of the audio helpers);
7. soak      benchmarks/bench_soak.py: 3000 tool-calling turns back to back; RSS
             growth after the warm-up and the drift of the median turn latency;
8. providers benchmarks/bench_providers.py: every built-in provider with a fake, the
             same latency and CPU figures side by side (about 5 minutes);
9. gemini    benchmarks/bench_providers_gemini.py: goAway -> resumed session and audio;
10. arbitration benchmarks/bench_arbitration.py: wake word -> verdict with 1, 2 and 5
             devices on one broker.

Prints a Markdown table and writes benchmarks/results/latest.json and latest.md.
Every number in them is measured in this invocation.

`python benchmarks/run.py --only cost` runs the cost phase alone (about 6 minutes) and
writes latest-cost.json and latest-cost.md instead, marked partial, so a full run's
results are never overwritten by a partial one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

import bench_arbitration  # noqa: E402
import bench_audio  # noqa: E402
import bench_echo  # noqa: E402
import bench_providers  # noqa: E402
import bench_providers_gemini  # noqa: E402
import bench_session as bs  # noqa: E402
import bench_soak  # noqa: E402
import bench_vad  # noqa: E402
import bench_wake  # noqa: E402
from pulse_fixture import PulseServer  # noqa: E402

RESULTS = HERE / "results"
LATENCY_TURNS = 20
STARTUP_RUNS = 7
BARGE_IN_RUNS = 7
COST_ROUNDS = 5
ECHO_ROUNDS = 3
COST_WINDOW_S = 60.0
PEERS = ("bare", "openai", "agents")
HARKD_CLIENTS = ("harkd", "harkd_24k", "harkd_wake")
"""The daemon's clients of a cost round: default config, on the peers' WAV, wake armed."""
PEER_LABELS = {
    "bare": "bare websockets client (floor)",
    "openai": "openai SDK",
    "agents": "openai-agents",
}
ALL_PHASES = (
    "latency",
    "startup",
    "barge_in",
    "echo",
    "cost",
    "wake",
    "components",
    "soak",
    "providers",
    "arbitration",
)
PHASES = ("cost",)  # the phases --only can run alone
# harkd CPU / peer CPU, (inclusive, limit): issue 19's default config is within 1.5x the
# bare floor; the SDK clients do less (no resampling, meters, plugins) and cost more.
CPU_RATIO_TARGETS = {"bare": (True, 1.5), "openai": (False, 1.0), "agents": (False, 1.0)}
PEAK_RSS_TARGET_MB = 55.0  # issue 19, default config: absolute
WAKE_CPU_RATIO_TARGET = 2.5  # issue 19, wake word armed, connected, 3 turns: x the bare floor
WAKE_PEAK_RSS_TARGET_MB = 75.0  # issue 19, same workload: absolute
PERIOD_MS = 20  # audio.input.period_ms of the bench configs
READY_TARGET_S = 0.5  # issue 19: exec -> READY
HELP_TARGET_S = 0.15  # issue 19: importing harkd for `harkd --help` (timed as exec -> exit)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                cpu = value.strip()
                break
    versions = {}
    for package in ("harkd", "openai", "openai-agents", "websockets", "numpy", "pymicro-wakeword"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "commit": commit or None,
        "versions": versions,
    }


def peer_client(kind: str, url: str, wav: Path) -> bs.Client:
    argv = [sys.executable, str(HERE / "peers.py"), kind, "--url", url, "--wav", str(wav)]
    return bs.Client(kind, argv)


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summarize_cost(rounds: list[dict[str, Any]], workdir: Path) -> dict[str, Any]:
    names = [*HARKD_CLIENTS, *PEERS]
    per_client: dict[str, Any] = {}
    for name in names:
        ok = [r[name] for r in rounds if "cpu_percent" in r.get(name, {})]
        errors = [r[name] for r in rounds if "error" in r.get(name, {})]
        per_client[name] = {
            "cpu_percent": median([r["cpu_percent"] for r in ok]),
            "peak_rss_mb": median([r["peak_rss_mb"] for r in ok]),
            "tool_turns": [r["tool_turns"] for r in ok],
            "responses": [r["responses"] for r in ok],
            "rounds_ok": len(ok),
        }
        if errors:
            per_client[name]["errors"] = errors
        out = workdir / f"{name}.out"
        if name in PEERS and out.exists():
            with contextlib.suppress(ValueError):
                lines = out.read_text().strip().splitlines()
                per_client[name]["last_summary"] = json.loads(lines[-1]) if lines else None
    return {
        "clients": per_client,
        "harkd_ratio_to": {peer: ratio_to(rounds, "harkd", peer) for peer in PEERS},
        "wake_ratio_to_bare": ratio_to(rounds, "harkd_wake", "bare"),
        "same_audio_ratio_to": {peer: ratio_to(rounds, "harkd_24k", peer) for peer in PEERS},
    }


def ratio_to(rounds: list[dict[str, Any]], name: str, peer: str) -> dict[str, Any]:
    """Client `name`'s CPU and peak RSS over `peer`'s, per round, then the median."""
    cpu, rss = [], []
    for r in rounds:
        h, p = r.get(name, {}), r.get(peer, {})
        if "cpu_percent" in h and "cpu_percent" in p and p["cpu_percent"] > 0:
            cpu.append(h["cpu_percent"] / p["cpu_percent"])
            rss.append(h["peak_rss_mb"] / p["peak_rss_mb"])
    return {
        "cpu": median(cpu),
        "cpu_range": [round(min(cpu), 3), round(max(cpu), 3)] if cpu else None,
        "peak_rss": median(rss),
        "rounds": len(cpu),
    }


async def measure(workdir: Path, log: Any) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with PulseServer.start_new() as pulse:
        server = bs.StampedServer(bs.bench_script(), strict=False, record=False)
        async with server:
            log(f"fake server {server.url}; latency: {LATENCY_TURNS} turns on ALSA (pulse)")
            result["latency"] = await bs.latency(server, pulse, workdir, LATENCY_TURNS)
            log(f"start-up: {STARTUP_RUNS} runs")
            result["startup"] = await bs.startup(server.url, pulse, workdir, STARTUP_RUNS)
            log(f"barge-in: {BARGE_IN_RUNS} runs (bench_audio.barge_in)")
            result["barge_in"] = await bench_audio.barge_in(pulse, 24000, BARGE_IN_RUNS)
            log(f"echo cancellation: {ECHO_ROUNDS} rounds (bench_echo)")
            result["echo"] = await bench_echo.measure(pulse, ECHO_ROUNDS, workdir)
            result.update(await measure_cost(server, workdir, log))
        log("wake: idle cost, latency in the room, accuracy (bench_wake)")
        result["wake"] = await bench_wake.run(pulse, workdir, log)
    log("components: bench_vad, bench_resample")
    result["components"] = {"vad": bench_vad.run(seconds=60.0, repeats=3)}
    resample = subprocess.run(
        [sys.executable, str(HERE / "bench_resample.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    result["components"]["resample_report"] = resample.stdout
    log(f"soak: {bench_soak.TURNS} tool-calling turns (bench_soak)")
    result["soak"] = await bench_soak.soak()
    with PulseServer.start_new() as pulse:
        result["providers"] = await bench_providers.measure(pulse, workdir, log)
    log("gemini: goAway -> resumed audio (bench_providers_gemini)")
    result["gemini_resume"] = await bench_providers_gemini.measure_go_away_resume()
    log("arbitration: 1, 2 and 5 devices on one broker (bench_arbitration)")
    result["arbitration"] = await bench_arbitration.measure()
    return result


async def measure_cost(server: bs.StampedServer, workdir: Path, log: Any) -> dict[str, Any]:
    """The cost phase: `harkd run` and every peer side by side, COST_ROUNDS times."""
    server.strict = True  # every client event of the cost rounds is validated
    wav = bs.cost_audio(workdir)
    rounds = []
    for index in range(COST_ROUNDS):
        clients = [bs.harkd_client(server.url, wav, workdir)]
        clients.append(bs.harkd_client(server.url, wav, workdir, capture_rate=None))
        clients.append(bs.harkd_wake_client(server.url, workdir))
        clients += [peer_client(kind, server.url, wav) for kind in PEERS]
        log(f"cost round {index + 1}/{COST_ROUNDS}: {', '.join(c.name for c in clients)}")
        # Rotate the start order: the first one started streams longest before
        # the window opens.
        first = index % len(clients)
        clients = clients[first:] + clients[:first]
        rounds.append(await bs.cost_round(server, clients, workdir, COST_WINDOW_S))
    return {"cost_rounds": rounds, "cost": summarize_cost(rounds, workdir)}


async def measure_cost_only(workdir: Path, log: Any) -> dict[str, Any]:
    """The cost phase alone, against its own fake server (`--only cost`)."""
    server = bs.StampedServer(bs.bench_script(), strict=True, record=False)
    async with server:
        log(f"fake server {server.url}; cost phase only")
        return await measure_cost(server, workdir, log)


# --------------------------------------------------------------------------- report


def _fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _pi(cpu_percent: float | None) -> str:
    """The Pi Zero 2 W projection of a CPU figure (bench_wake.pi_projection's factor)."""
    if cpu_percent is None:
        return ""
    return f"; Pi Zero 2 W ~{cpu_percent * bench_wake.PI_FACTOR:.0f} % (x{bench_wake.PI_FACTOR:g})"


def _range(ratio: dict[str, Any]) -> str:
    low_high = ratio.get("cpu_range")
    return f" ({low_high[0]:.2f}-{low_high[1]:.2f})" if low_high else ""


def verdicts(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """(metric, measured, p95/detail, target, pass) rows of the phases in `r`."""
    rows: list[tuple[str, str, str, str, bool | None]] = []
    if "latency" in r:
        rows += session_rows(r)
    if "cost" in r:
        rows += cost_rows(r["cost"])
    if "echo" in r:
        rows += echo_rows(r["echo"])
    if "wake" in r:
        rows += bench_wake.rows(r["wake"])
    if "arbitration" in r:
        rows += bench_arbitration.rows(r["arbitration"])
    if "gemini_resume" in r:
        rows.append(gemini_resume_row(r["gemini_resume"]))
    if "soak" in r:
        rows += soak_rows(r["soak"])
    return rows


def session_rows(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """Latency, barge-in and start-up of `harkd run`."""
    lat, up = r["latency"], r["startup"]["startup_s"]
    barge = r["barge_in"]
    rows: list[tuple[str, str, str, str, bool | None]] = []

    def latency_row(name: str, key: str, target: float) -> None:
        s = lat[key]
        ok = s.get("median") is not None and s["median"] < target
        detail = f"p95 {_fmt(s.get('p95'), ' ms')}, n={s['n']}"
        rows.append((name, _fmt(s.get("median"), " ms"), detail, f"< {target:g} ms", ok))

    latency_row("Uplink: ALSA read -> append at server", "uplink_ms", 2)
    latency_row("Downlink: first delta sent -> written to ALSA", "downlink_ms", 5)
    latency_row("Turn overhead: response.done -> response.create", "turn_overhead_ms", 5)
    silent = barge["silent_after_stop_ms"]
    limit = PERIOD_MS + 10
    rows.append(
        (
            "Barge-in: stop -> sink silent",
            _fmt(silent["median"], " ms"),
            f"max {_fmt(silent['max'], ' ms')}, n={silent['n']} (recorder latency included)",
            f"<= {limit} ms (period + 10)",
            silent["median"] <= limit,
        )
    )
    err = barge["played_minus_heard_ms"]
    rows.append(
        (
            "Truncate error: reported - heard played ms",
            _fmt(err["median"], " ms"),
            f"max |error| {_fmt(barge['abs_error_ms_max'], ' ms', 1)}, n={err['n']}",
            "< 40 ms (max |error|)",
            barge["abs_error_ms_max"] < 40,
        )
    )
    rows.append(
        (
            "Start-up: exec -> READY=1",
            _fmt(up.get("median"), " s", 3),
            f"p95 {_fmt(up.get('p95'), ' s', 3)}, n={up['n']}",
            f"<= {READY_TARGET_S:g} s",
            up.get("median") is not None and up["median"] <= READY_TARGET_S,
        )
    )
    help_s, python_s = r["startup"].get("help_s"), r["startup"].get("python_s")
    if help_s and python_s:
        rows.append(
            (
                "Start-up: exec `harkd --help` -> exit",
                _fmt(help_s.get("median"), " s", 3),
                f"p95 {_fmt(help_s.get('p95'), ' s', 3)}, n={help_s['n']}; the interpreter "
                f"alone (python -c pass) {_fmt(python_s.get('median'), ' s', 3)}",
                f"<= {HELP_TARGET_S:g} s",
                help_s.get("median") is not None and help_s["median"] <= HELP_TARGET_S,
            )
        )
    return rows


def cost_rows(cost: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """harkd's CPU and peak RSS, absolute and as per-round ratios to each peer; the
    targets are issue 19's for the default config, against the bare floor."""
    h = cost["clients"]["harkd"]
    ratios = cost["harkd_ratio_to"]
    rss = h["peak_rss_mb"]
    rows: list[tuple[str, str, str, str, bool | None]] = [
        (
            f"harkd CPU (user+sys / wall), {COST_WINDOW_S:g} s, 2 turns",
            _fmt(h["cpu_percent"], " %"),
            f"median of {h['rounds_ok']} rounds{_pi(h['cpu_percent'])}",
            "-",
            None,
        ),
        (
            "harkd peak RSS (VmHWM)",
            _fmt(rss, " MB", 1),
            f"median of {h['rounds_ok']} rounds",
            f"<= {PEAK_RSS_TARGET_MB:g} MB",
            None if rss is None else rss <= PEAK_RSS_TARGET_MB,
        ),
    ]
    for peer in PEERS:
        ratio = ratios[peer]
        inclusive, limit = CPU_RATIO_TARGETS[peer]
        value = ratio["cpu"]
        ok = None if value is None else (value <= limit if inclusive else value < limit)
        rows.append(
            (
                f"CPU ratio harkd / {PEER_LABELS[peer]}",
                _fmt(value, "x"),
                f"median of {ratio['rounds']} per-round ratios{_range(ratio)}",
                f"{'<=' if inclusive else '<'} {limit:.1f}x",
                ok,
            )
        )
    same = cost.get("same_audio_ratio_to", {})
    for peer in PEERS:
        if peer in same:
            rows.append(
                (
                    f"CPU ratio harkd on the peers' 24 kHz WAV (no resampling) / "
                    f"{PEER_LABELS[peer]}",
                    _fmt(same[peer]["cpu"], "x"),
                    f"median of {same[peer]['rounds']} per-round ratios{_range(same[peer])}",
                    "-",
                    None,
                )
            )
    rows += wake_cost_rows(cost)
    for peer in PEERS:
        note = (
            f"; the RSS target is absolute (<= {PEAK_RSS_TARGET_MB:g} MB)" if peer == "bare" else ""
        )
        rows.append(
            (
                f"RSS ratio harkd / {PEER_LABELS[peer]}",
                _fmt(ratios[peer]["peak_rss"], "x"),
                f"median of {ratios[peer]['rounds']} per-round ratios{note}",
                "-",
                None,
            )
        )
    return rows


def echo_rows(echo: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """Echo cancellation in the PulseAudio room (bench_echo.py), medians over rounds."""
    n = f"median of {len(echo['rounds'])} rounds"
    erle, share = echo["erle_db"], echo["double_talk_share"]
    return [
        (
            "Echo removed (ERLE) after convergence",
            _fmt(erle, " dB", 1),
            f"AEC3 alone {_fmt(echo['erle_aec3_db'], ' dB', 1)}, {n}",
            ">= 25 dB",
            erle is not None and erle >= 25,
        ),
        (
            "Echo canceller: converged after",
            _fmt(echo["converge_s"], " s", 1),
            f"seconds of speaker audio, {n}",
            "-",
            None,
        ),
        (
            "Double talk: user frames voiced while the assistant speaks",
            _fmt(share, "", 3),
            f"of those voiced in a quiet room; AEC3 alone "
            f"{_fmt(echo['double_talk_share_aec3'], '', 3)}, {n}",
            ">= 0.9",
            share is not None and share >= 0.9,
        ),
        (
            "Double talk, frame by frame: the user's voiced frames kept",
            _fmt(echo.get("double_talk_share_aligned"), "", 3),
            f"at the same place as in the quiet room; AEC3 alone "
            f"{_fmt(echo.get('double_talk_share_aec3_aligned'), '', 3)} (the double-talk "
            f"filter replaces its output), {n}",
            "-",
            None,
        ),
        (
            "Echo cancellation CPU per second of audio",
            _fmt(echo["cpu_percent"], " %", 2),
            f"of one core, 16 kHz mono, {n}",
            "-",
            None,
        ),
        (
            "Barge-in latency with echo cancellation",
            _fmt(echo["barge_in_ms"], " ms", 0),
            f"user's speech onset -> speaker silent (fake server VAD), {n}",
            "-",
            None,
        ),
        *wake_over_answer_rows(echo),
    ]


def wake_over_answer_rows(echo: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """The user's wake word over an answer, with echo cancellation (older results
    have no such figure)."""
    heard = echo.get("wake_over_answer")
    if heard is None:
        return []
    rounds = len(echo["rounds"])
    return [
        (
            "Wake word over an answer, heard (echo cancellation)",
            f"{heard['full']}/{rounds}",
            f"echo as loud as the user (speaker at full volume); {heard['minus_6db']}/{rounds} "
            "with the echo 6 dB under the user",
            "-",
            None,
        )
    ]


def gemini_resume_row(resume: dict[str, Any]) -> tuple[str, str, str, str, bool | None]:
    """How long Gemini's goAway costs: a resumed session, then the next answer's audio."""
    return (
        "Gemini: goAway -> resumed session -> next answer's audio",
        _fmt(resume["audio_ms_median"], " ms"),
        f"resumed {resume['resume_ms_median']} ms (max {resume['resume_ms_max']}); "
        f"{resume['resumed_sessions']}/{resume['rounds']} sessions resumed by handle",
        "-",
        None,
    )


def soak_rows(soak: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """The soak's verdicts; a soak that did not finish fails both."""
    growth_name = "Soak: RSS growth after warm-up"
    drift_name = "Soak: turn latency drift (last 100 / turns 11-110)"
    growth_target = f"<= {bench_soak.RSS_GROWTH_TARGET_MB:g} MB"
    drift_target = f"{1 - bench_soak.DRIFT_TARGET:.2f}-{1 + bench_soak.DRIFT_TARGET:.2f}x"
    if "error" in soak:
        return [
            (growth_name, "n/a", soak["error"], growth_target, False),
            (drift_name, "n/a", soak["error"], drift_target, False),
        ]
    growth, drift = soak["rss_growth_mb"], soak["drift"]
    turns = soak["turns"]
    return [
        (
            growth_name,
            _fmt(growth, " MB"),
            f"turn {soak['warmup_turns']} -> {turns}: {soak['rss_warm_mb']} -> "
            f"{soak['rss_end_mb']} MB, {soak['messages_in_memory']} messages in memory",
            growth_target,
            growth <= bench_soak.RSS_GROWTH_TARGET_MB,
        ),
        (
            drift_name,
            _fmt(drift, "x", 3),
            f"{_fmt(soak['turn_ms_last_100'], ' ms')} vs {_fmt(soak['turn_ms_11_110'], ' ms')}"
            f" (send -> answer final), {turns} turns in {soak['duration_s']:g} s",
            drift_target,
            drift is not None and abs(drift - 1) <= bench_soak.DRIFT_TARGET,
        ),
    ]


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# harkd benchmarks",
        "",
        f"- date: {m['date']} (took {r['duration_s']:.0f} s)",
        f"- machine: {m['cpu_model']}, {m['cores']} cores, {m['kernel']}, {m['python']}, "
        f"load average at start {m['loadavg_at_start']}",
        f"- commit: {m['commit']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        "- fake realtime server on loopback (harkd.testing), same process as the bench; "
        "CLOCK_MONOTONIC stamps on both sides",
    ]
    if "partial" in r:
        lines.append(
            f"- **partial run** (`--only {' '.join(r['partial']['only'])}`): "
            f"skipped {', '.join(r['partial']['skipped'])}"
        )
    lines += [
        "",
        "| metric | median | spread | target | ok |",
        "|---|---|---|---|---|",
    ]
    for name, value, detail, target, ok in verdicts(r):
        mark = (
            ("-" if target == "-" else "not measured")
            if ok is None
            else ("yes" if ok else "**no**")
        )
        lines.append(f"| {name} | {value} | {detail} | {target} | {mark} |")
    if "cost" in r:
        lines += cost_table(r["cost"])
    if "wake" in r:
        pi = r["wake"]["idle"]["pi"]
        lines += [
            "",
            f"Wake word: Pi Zero 2 W figures multiply this machine's by {pi['factor']:g} "
            f"(plausible range {pi['range'][0]:g}-{pi['range'][1]:g}): {pi['basis']}",
        ]
    if "components" in r:
        vad = r["components"]["vad"]
        lines += [
            "",
            f"Components: local VAD endpointer {vad['cpu_percent_of_core']:.4f} % of a core "
            "(bench_vad.py); resampler report in latest.json (bench_resample.py).",
        ]
    if "providers" in r:
        lines += ["", bench_providers.markdown(r["providers"])]
    return "\n".join(lines)


def wake_cost_rows(cost: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """The wake-word workload (armed, connected, three requests): issue 19's targets."""
    w = cost["clients"].get("harkd_wake")
    ratio = cost.get("wake_ratio_to_bare")
    if not w or not ratio:
        return []
    value, rss = ratio["cpu"], w["peak_rss_mb"]
    return [
        (
            "wake armed, connected, 3 requests: CPU ratio / bare floor",
            _fmt(value, "x"),
            f"harkd_wake {_fmt(w['cpu_percent'], ' %')}{_pi(w['cpu_percent'])}, "
            f"tool turns {w['tool_turns']}, "
            f"median of {ratio['rounds']} per-round ratios{_range(ratio)}",
            f"<= {WAKE_CPU_RATIO_TARGET:.1f}x",
            None if value is None else value <= WAKE_CPU_RATIO_TARGET,
        ),
        (
            "wake armed, connected, 3 requests: peak RSS",
            _fmt(rss, " MB", 1),
            f"median of {w['rounds_ok']} rounds",
            f"<= {WAKE_PEAK_RSS_TARGET_MB:g} MB",
            None if rss is None else rss <= WAKE_PEAK_RSS_TARGET_MB,
        ),
    ]


def cost_table(cost: dict[str, Any]) -> list[str]:
    """Each client's medians over the cost rounds."""
    lines = [
        "",
        f"Cost rounds: {COST_ROUNDS} x {COST_WINDOW_S:g} s window, "
        f"all {len(HARKD_CLIENTS) + len(PEERS)} "
        "clients streaming side by side (harkd_wake its own WAV with 3 wake-word requests, "
        "the others the same one) (medians over rounds):",
        "",
        "| client | CPU % | peak RSS MB | tool turns per round | responses per round |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "harkd": "harkd run, default config (16 kHz WAV mic, null speaker)",
        "harkd_24k": "harkd run, default config, the peers' 24 kHz WAV (no resampling)",
        "harkd_wake": "harkd run, wake word armed, 3 requests (16 kHz WAV mic)",
        "bare": "bare websockets + json + base64 client (floor)",
        "openai": "openai SDK realtime.connect",
        "agents": "openai-agents RealtimeRunner",
    }
    for name, c in cost["clients"].items():
        extra = f" ({c['errors'][0].get('error')})" if c.get("errors") else ""
        lines.append(
            f"| {labels[name]}{extra} | {_fmt(c['cpu_percent'])} | {_fmt(c['peak_rss_mb'], '', 1)}"
            f" | {c['tool_turns']} | {c['responses']} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--only",
        choices=PHASES,
        help="run this phase alone; writes latest-PHASE.json/.md, marked partial",
    )
    args = parser.parse_args()
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    result: dict[str, Any] = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="harkd-bench-") as tmp:
        if args.only:
            result.update(asyncio.run(measure_cost_only(Path(tmp), log)))
            skipped = [phase for phase in ALL_PHASES if phase != args.only]
            result["partial"] = {"only": [args.only], "skipped": skipped}
        else:
            result.update(asyncio.run(measure(Path(tmp), log)))
    result["duration_s"] = round(time.monotonic() - started, 1)
    result["targets"] = [
        {"metric": name, "median": value, "detail": detail, "target": target, "ok": ok}
        for name, value, detail, target, ok in verdicts(result)
    ]
    report = markdown(result)
    # A partial run never overwrites the full run's results.
    stem = f"latest-{args.only}" if args.only else "latest"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(report)
    print(report)
    log(f"wrote {RESULTS / f'{stem}.json'} and {RESULTS / f'{stem}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
