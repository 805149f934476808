"""Gemini Live: how long a provider's `goAway` interrupts the conversation.

Each round, between turns, the fake Gemini Live server sends `goAway`; the client moves
to a new connection resumed from its newest handle, and as soon as it is connected
again a question is typed. Two figures, on one clock (client and fake share the
process and `time.monotonic()`):

* resume_ms: `goAway` sent -> the resumed session is connected (setupComplete handled);
* audio_ms: `goAway` sent -> the first audio of the answer reaches the client, i.e.
  when sound can flow again.

The fake answers at once, so this is harkd's own cost plus loopback, not the
service's latency. Standalone: `python benchmarks/bench_providers_gemini.py [ROUNDS]`
prints one JSON object with the median and the worst round.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from e2e import LoggedAdapter, Running, Timeline, until  # noqa: E402
from harkd import events as ev  # noqa: E402
from harkd.adapters.gemini import gemini_live  # noqa: E402
from harkd.adapters.gemini_wire import OUTPUT_RATE  # noqa: E402
from harkd.audio.wav import NullOutput  # noqa: E402
from harkd.backoff import Backoff  # noqa: E402
from harkd.client import RealtimeClient  # noqa: E402
from harkd.messages import RealtimeMode, RealtimeState, RealtimeStatus  # noqa: E402
from harkd.testing import FakeScript  # noqa: E402
from harkd.testing.gemini_fake import GeminiFakeServer  # noqa: E402
from harkd.tokens import static_token  # noqa: E402

KEY = "AIza-bench-gemini"
ROUNDS = 20


async def measure_go_away_resume(rounds: int = ROUNDS) -> dict[str, Any]:
    """Median and worst `resume_ms` and `audio_ms` over `rounds` goAways."""
    timeline = Timeline()
    reconnected = asyncio.Event()
    resume_ms: list[float] = []
    audio_ms: list[float] = []
    script = FakeScript(reply="OK.", audio_ms_per_char=60)
    async with GeminiFakeServer(script=script, api_keys={KEY}) as server:
        client = RealtimeClient(
            get_token=static_token(KEY),
            adapter=LoggedAdapter(gemini_live(url=server.url), timeline),
            instructions="Be brief.",
            voice="Puck",
            audio_output=NullOutput(OUTPUT_RATE, source_rate=OUTPUT_RATE),
            reconnect=Backoff(30, 60),  # a goAway must never wait for a backoff
        )
        connected_at: list[float] = []
        moving = False

        def on_state(state: RealtimeState) -> None:
            # Connected again after having left the old connection.
            nonlocal moving
            if state.status is not RealtimeStatus.CONNECTED:
                moving = True
            elif moving:
                moving = False
                connected_at.append(time.monotonic())
                reconnected.set()

        client.on_state_change(on_state)
        async with Running(client):
            for round_ in range(rounds):
                await until(lambda: client.mode is RealtimeMode.LISTENING, what="between turns")
                reconnected.clear()
                mark = len(timeline)
                started = time.monotonic()
                await server.go_away(time_left_s=10.0)
                await asyncio.wait_for(reconnected.wait(), 10)
                client.send_text(f"question {round_}")
                audio_at = await answer_audio(timeline, mark)
                resume_ms.append((connected_at[-1] - started) * 1000)
                audio_ms.append((audio_at - started) * 1000)
        resumed = sum(1 for s in server.sessions if s.resumed_from is not None)
    return {
        "rounds": rounds,
        "resumed_sessions": resumed,
        "resume_ms_median": round(statistics.median(resume_ms), 1),
        "resume_ms_max": round(max(resume_ms), 1),
        "audio_ms_median": round(statistics.median(audio_ms), 1),
        "audio_ms_max": round(max(audio_ms), 1),
    }


async def answer_audio(timeline: Timeline, start: int) -> float:
    """When the first answer audio after entry `start` was handled (waits for it)."""
    await until(lambda: first_audio(timeline, start) is not None, what="the answer's audio")
    at = first_audio(timeline, start)
    assert at is not None
    return at


def first_audio(timeline: Timeline, start: int) -> float | None:
    """When the first answer audio after entry `start` was handled, if it was."""
    for entry in timeline[start:]:
        if entry.kind == "event" and isinstance(entry.detail, ev.AudioDelta):
            return entry.at
    return None


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else ROUNDS
    print(json.dumps(asyncio.run(measure_go_away_resume(rounds))))


if __name__ == "__main__":
    main()
