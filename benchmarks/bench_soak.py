"""Soak: thousands of tool-calling turns back to back, against the fake realtime server.

Months of uptime must not cost memory or time per turn. A `RealtimeClient` (in a child
process, so its RSS is its own) sends a typed question; the fake answers with a
function call, the client runs the tool and sends its output, the fake answers with
audio and a transcript, and the next question goes out as soon as the answer is
final. The speaker plays instantly (it drains right after the last chunk), and a state
subscriber computes the MQTT state payloads on every change, like the daemon does.

* rss_growth_mb: VmRSS at the end minus VmRSS after the warm-up turns (both after a
  `gc.collect()`);
* turn_ms: `send_text` -> the assistant's answer finalized (`on_message`), per turn;
  drift is median(last 100 turns) / median(turns 11-110).

The fake keeps only the newest items of its conversation (`SERVER_ITEMS`), as the
provider's context window would: its own O(items) searches are not harkd's cost.

Standalone: ``python benchmarks/bench_soak.py [--turns N]`` prints one JSON object.
Child mode (internal): ``python benchmarks/bench_soak.py --child URL TURNS WARMUP``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harkd.audio.base import DeviceListener, MeterReading
from harkd.session import DEFAULT_TRAITS
from harkd.testing import FakeRealtimeServer, FakeScript, ToolRule

TURNS = 3000
WARMUP = 200
SERVER_ITEMS = 64
KEY = "sk-soak-not-a-real-key"
REPLY = "It is noon, just as you asked."
RSS_GROWTH_TARGET_MB = 2.0
BYTES_PER_MS = int(DEFAULT_TRAITS.output_format.bytes_per_ms)
"""Of the answer audio the speaker is given."""
DRIFT_TARGET = 0.10  # the last 100 turns' median within 10 % of turns 11-110


def soak_script() -> FakeScript:
    """Every question asks for the time: one call, then a spoken answer in 20 chunks."""
    return FakeScript(
        tool_rules=[ToolRule("time", name="get_time")],
        tool_reply=lambda outputs: REPLY,
        audio_ms_per_char=40.0,
        delta_ms=60,
    )


def vm_rss_kb() -> int:
    """VmRSS of this process, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


# --------------------------------------------------------------------------- the child


class InstantSpeaker:
    """An `AudioOutput` that plays everything at once and drains on the next tick."""

    name = "instant"
    sample_rate = source_rate = 24000

    def __init__(self) -> None:
        self._played: dict[str, int] = {}
        self._drained: list[Callable[[], None]] = []
        self._pending: asyncio.Handle | None = None

    async def start(self, listener: DeviceListener) -> None:
        """Nothing to open."""

    async def stop(self) -> None:
        """Nothing to release."""
        self.stop_playback()

    def play(self, item_id: str, pcm: bytes) -> None:
        """Count the item's audio as heard; drain once this burst of chunks is over."""
        self._played[item_id] = self._played.get(item_id, 0) + len(pcm) // BYTES_PER_MS
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_soon(self._drain)

    def stop_playback(self) -> dict[str, int]:
        """Everything queued was heard already."""
        played, self._played = self._played, {}
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        return played

    def played_ms(self, item_id: str) -> int:
        """Milliseconds of the item heard."""
        return self._played.get(item_id, 0)

    @property
    def is_playing(self) -> bool:
        """True until the drain callback ran."""
        return self._pending is not None

    def set_volume(self, volume: int) -> None:
        """No gain to set."""

    def on_drained(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever the queued audio has been heard."""
        self._drained.append(callback)

    def on_abandoned(self, callback: Callable[[dict[str, int]], None]) -> None:
        """Never called: this speaker cannot lose its device."""

    def meter(self) -> MeterReading:
        """Silence."""
        return MeterReading()

    def _drain(self) -> None:
        self._pending = None
        self._played.clear()
        for callback in self._drained:
            callback()


async def child(url: str, turns: int, warmup: int) -> dict[str, Any]:
    """Run `turns` tool-calling turns; return latencies, RSS and the message count."""
    from harkd.adapters.openai import openai_realtime
    from harkd.client import RealtimeClient
    from harkd.messages import RealtimeMessage, RealtimeState, RealtimeStatus, ToolCallPart
    from harkd.mqtt import state_payloads
    from harkd.tokens import static_token
    from harkd.tools import Tool, ToolCall

    async def get_time(args: dict[str, Any], call: ToolCall) -> dict[str, str]:
        return {"time": "12:00"}

    answered = asyncio.Event()
    answered_at = [0.0]

    def on_message(message: RealtimeMessage) -> None:
        if message.role == "assistant" and not any(
            isinstance(p, ToolCallPart) for p in message.parts
        ):
            answered_at[0] = time.perf_counter()
            answered.set()

    state_changes = [0]

    def on_state(state: RealtimeState) -> None:
        state_payloads(state)  # what the MQTT bridge does with every change
        state_changes[0] += 1

    client = RealtimeClient(
        get_token=static_token(KEY),
        adapter=openai_realtime(url=url),
        tools=[Tool("get_time", "Current time", {"type": "object"}, get_time)],
        instructions="Be brief.",
        audio_output=InstantSpeaker(),
        on_message=on_message,
    )
    client.on_state_change(on_state)
    connected = asyncio.Event()
    client.on_state_change(
        lambda state: connected.set() if state.status is RealtimeStatus.CONNECTED else None
    )
    run = asyncio.create_task(client.run(), name="client")  # as the daemon's supervisor
    await asyncio.wait_for(connected.wait(), 10.0)
    latencies_ms: list[float] = []
    rss_warm_kb = 0
    try:
        for turn in range(turns):
            answered.clear()
            sent_at = time.perf_counter()
            client.send_text(f"what time is it? ({turn})")
            await asyncio.wait_for(answered.wait(), 10.0)
            latencies_ms.append((answered_at[0] - sent_at) * 1000)
            if turn + 1 == warmup:
                gc.collect()
                rss_warm_kb = vm_rss_kb()
        gc.collect()
        rss_end_kb = vm_rss_kb()
        messages = len(client.messages)
    finally:
        run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run
    return {
        "turn_ms": latencies_ms,
        "rss_warm_kb": rss_warm_kb,
        "rss_end_kb": rss_end_kb,
        "messages_in_memory": messages,
        "state_changes": state_changes[0],
    }


# --------------------------------------------------------------------------- the parent


async def _trim(server: FakeRealtimeServer) -> None:
    while True:
        for session in server.sessions:
            if len(session.items) > SERVER_ITEMS:
                del session.items[:-SERVER_ITEMS]
        await asyncio.sleep(0.05)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


async def soak(turns: int = TURNS, warmup: int = WARMUP) -> dict[str, Any]:
    """Run the child against a fake server in this process; summarize what it measured."""
    started = time.monotonic()
    async with FakeRealtimeServer(soak_script(), strict=False, record=False) as server:
        trimmer = asyncio.create_task(_trim(server), name="trim")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--child",
                server.url,
                str(turns),
                str(warmup),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await proc.communicate()
        finally:
            trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trimmer
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip()[-2000:]
        return {"error": f"soak child exited {proc.returncode}", "log_tail": tail}
    data = json.loads(out)
    latencies: list[float] = data.pop("turn_ms")
    early, late = _median(latencies[10:110]), _median(latencies[-100:])
    return {
        "turns": len(latencies),
        "warmup_turns": warmup,
        "duration_s": round(time.monotonic() - started, 1),
        "rss_warm_mb": round(data["rss_warm_kb"] / 1024, 1),
        "rss_end_mb": round(data["rss_end_kb"] / 1024, 1),
        "rss_growth_mb": round((data["rss_end_kb"] - data["rss_warm_kb"]) / 1024, 2),
        "turn_ms_11_110": early,
        "turn_ms_last_100": late,
        "turn_ms_all": _median(latencies),
        "drift": round(late / early, 3) if early and late else None,
        "messages_in_memory": data["messages_in_memory"],
        "state_changes": data["state_changes"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=3, metavar=("URL", "TURNS", "WARMUP"))
    parser.add_argument("--turns", type=int, default=TURNS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    args = parser.parse_args()
    if args.child:
        url, turns, warmup = args.child
        print(json.dumps(asyncio.run(child(url, int(turns), int(warmup)))))
        return
    print(json.dumps(asyncio.run(soak(args.turns, args.warmup)), indent=2))


if __name__ == "__main__":
    main()
