"""Peer clients for the cost comparison: the same workload as `harkd run` in a cost round.

Each peer connects to the fake realtime server (``--url``, a ``ws://.../v1/realtime``),
configures a server-VAD audio session that declares the same ``get_time`` tool the
daemon's clock plugin offers, streams ``--wav`` (PCM16 24 kHz mono) at real-time pace in
20 ms appends and then silence until SIGTERM (as harkd's WAV microphone does), answers
each tool call with one output and one ``response.create``, and reads every response
(audio deltas decoded and counted, not played). On SIGTERM it prints a JSON summary.

* ``bare``: the floor (issue 19): only ``websockets``, ``json`` and ``base64``; the same
  handshake the SDK makes (``?model=``, ``Authorization: Bearer``, no deflate), the same
  ``session.update``, appends and tool answers, every event parsed.
* ``openai``: the ``openai`` SDK's own realtime connection
  (``AsyncOpenAI(websocket_base_url=...).realtime.connect``).
* ``agents``: an ``openai-agents`` ``RealtimeAgent`` + ``RealtimeRunner`` session, pointed
  at the server with ``model_config={"url": ...}`` (OpenAIRealtimeWebSocketModel),
  audio through ``session.send_audio``; the SDK runs the tool itself.

Run: ``python benchmarks/peers.py {bare,openai,agents} --url URL --wav PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import signal
import sys
import time
import wave
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

RATE = 24000
PERIOD_MS = 20
TOOL = "get_time"
API_KEY = "sk-bench-not-a-real-key"
INSTRUCTIONS = "You are a helpful voice assistant in a home."


def read_wav(path: Path) -> bytes:
    with wave.open(str(path), "rb") as src:
        if (src.getframerate(), src.getnchannels(), src.getsampwidth()) != (RATE, 1, 2):
            raise SystemExit(f"{path}: expected PCM16 mono {RATE} Hz")
        return src.readframes(src.getnframes())


async def paced_chunks(pcm: bytes, stop: asyncio.Event) -> AsyncIterator[bytes]:
    """20 ms chunks of `pcm` on a monotonic schedule, then silence until `stop`."""
    size = RATE * PERIOD_MS // 1000 * 2
    anchor, count = time.monotonic(), 0
    while not stop.is_set():
        delay = anchor + (count + 1) * PERIOD_MS / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        chunk = pcm[count * size : (count + 1) * size]
        count += 1
        yield chunk + bytes(size - len(chunk))


def get_time_result() -> dict[str, str]:
    now = datetime.now().astimezone()
    return {"time": now.strftime("%H:%M"), "date": now.date().isoformat()}


class Stats:
    def __init__(self) -> None:
        self.responses = 0
        self.tool_calls = 0
        self.audio_bytes = 0
        self.errors: list[str] = []

    def as_dict(self, client: str) -> dict[str, Any]:
        return {
            "client": client,
            "responses": self.responses,
            "tool_calls": self.tool_calls,
            "audio_out_ms": round(self.audio_bytes / (RATE * 2 / 1000)),
            "errors": self.errors[:5],
        }


def session_config() -> dict[str, Any]:
    """The ``session`` of the ``session.update`` the ``bare`` and ``openai`` peers send."""
    return {
        "type": "realtime",
        "output_modalities": ["audio"],
        "instructions": INSTRUCTIONS,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": RATE},
                "turn_detection": {"type": "server_vad"},
            },
            "output": {"format": {"type": "audio/pcm", "rate": RATE}, "voice": "marin"},
        },
        "tools": [
            {
                "type": "function",
                "name": TOOL,
                "description": "Get the current local time, date and weekday.",
                "parameters": {"type": "object", "properties": {}},
            }
        ],
    }


# --------------------------------------------------------------------------- bare floor


async def run_bare(url: str, pcm: bytes, stop: asyncio.Event, stats: Stats) -> None:
    from websockets.asyncio.client import connect

    async with connect(
        f"{url}?model=gpt-realtime",
        additional_headers={"Authorization": f"Bearer {API_KEY}"},
        max_size=None,
        compression=None,  # as the SDK and harkd: no deflate on audio
    ) as ws:
        await ws.send(json.dumps({"type": "session.update", "session": session_config()}))

        async def stream() -> None:
            async for chunk in paced_chunks(pcm, stop):
                audio = base64.b64encode(chunk).decode()
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))

        async def read() -> None:
            async for message in ws:
                event = json.loads(message)
                kind = event.get("type")
                if kind == "response.output_audio.delta":
                    stats.audio_bytes += len(base64.b64decode(event["delta"]))
                elif kind == "error":
                    stats.errors.append(str(event.get("error", {}).get("code")))
                elif kind == "response.done":
                    stats.responses += 1
                    output = event.get("response", {}).get("output") or []
                    calls = [i for i in output if i.get("type") == "function_call"]
                    for call in calls:
                        stats.tool_calls += 1
                        item = {
                            "type": "function_call_output",
                            "call_id": call.get("call_id") or "",
                            "output": json.dumps(get_time_result()),
                        }
                        await ws.send(
                            json.dumps({"type": "conversation.item.create", "item": item})
                        )
                    if calls:
                        await ws.send(json.dumps({"type": "response.create"}))

        await _until_stopped(stop, stream(), read())


# --------------------------------------------------------------------------- openai SDK


async def run_openai(url: str, pcm: bytes, stop: asyncio.Event, stats: Stats) -> None:
    from openai import AsyncOpenAI

    base = url.removesuffix("/realtime")  # the SDK appends /realtime?model=...
    client = AsyncOpenAI(api_key=API_KEY, websocket_base_url=base)
    async with client.realtime.connect(model="gpt-realtime") as conn:
        await conn.session.update(session=session_config())

        async def stream() -> None:
            async for chunk in paced_chunks(pcm, stop):
                await conn.input_audio_buffer.append(audio=base64.b64encode(chunk).decode())

        async def read() -> None:
            async for event in conn:
                if event.type == "response.output_audio.delta":
                    stats.audio_bytes += len(base64.b64decode(event.delta))
                elif event.type == "error":
                    stats.errors.append(str(event.error.code))
                elif event.type == "response.done":
                    stats.responses += 1
                    calls = [i for i in event.response.output or [] if i.type == "function_call"]
                    for call in calls:
                        stats.tool_calls += 1
                        await conn.conversation.item.create(
                            item={
                                "type": "function_call_output",
                                "call_id": call.call_id or "",
                                "output": json.dumps(get_time_result()),
                            }
                        )
                    if calls:
                        await conn.response.create()

        await _until_stopped(stop, stream(), read())


# --------------------------------------------------------------------------- openai-agents


async def run_agents(url: str, pcm: bytes, stop: asyncio.Event, stats: Stats) -> None:
    from agents import function_tool
    from agents.realtime import RealtimeAgent, RealtimeRunner

    @function_tool(name_override=TOOL)
    def get_time() -> str:
        """Get the current local time, date and weekday."""
        stats.tool_calls += 1
        return json.dumps(get_time_result())

    agent: RealtimeAgent[Any] = RealtimeAgent(
        name="bench", instructions=INSTRUCTIONS, tools=[get_time]
    )
    runner = RealtimeRunner(
        agent,
        config={
            "tracing_disabled": True,
            "model_settings": {
                "model_name": "gpt-realtime",
                "voice": "marin",
                "output_modalities": ["audio"],
                "input_audio_format": "pcm16",
                "output_audio_format": "pcm16",
                "input_audio_transcription": None,  # type: ignore[typeddict-item]
                "turn_detection": {"type": "server_vad"},
            },
        },
    )
    session = await runner.run(model_config={"url": url, "api_key": API_KEY})
    async with session:

        async def stream() -> None:
            async for chunk in paced_chunks(pcm, stop):
                await session.send_audio(chunk)

        async def read() -> None:
            async for event in session:
                if event.type == "audio":
                    stats.audio_bytes += len(event.audio.data)
                elif event.type == "agent_end":
                    stats.responses += 1
                elif event.type == "error":
                    stats.errors.append(str(event.error)[:200])

        await _until_stopped(stop, stream(), read())


# --------------------------------------------------------------------------- common


async def _until_stopped(stop: asyncio.Event, *jobs: Any) -> None:
    tasks = [asyncio.ensure_future(job) for job in jobs]
    stopper = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper:
                task.result()  # a client that ends early raises its reason here
    finally:
        for task in [*tasks, stopper]:
            task.cancel()
        await asyncio.gather(*tasks, stopper, return_exceptions=True)


async def amain(kind: str, url: str, wav: Path) -> dict[str, Any]:
    pcm = read_wav(wav)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stats = Stats()
    runner = {"bare": run_bare, "openai": run_openai, "agents": run_agents}[kind]
    try:
        await runner(url, pcm, stop, stats)
    except Exception as exc:
        if not stop.is_set():
            stats.errors.append(f"{type(exc).__name__}: {exc}"[:300])
    return stats.as_dict(kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["bare", "openai", "agents"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--wav", type=Path, required=True)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        print(json.dumps(asyncio.run(amain(args.kind, args.url, args.wav))), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
