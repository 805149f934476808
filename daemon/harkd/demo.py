"""`harkd demo`: the daemon's own code path on embedded defaults.

No API key, microphone or broker needed: a built-in fake realtime server stands in
for the provider, a bundled speech WAV is the microphone, the answer goes to a WAV
file (or a given ALSA device), the built-in plugins are enabled, and MQTT is used
only when a broker answers on localhost. The conversation is printed as it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import tempfile
import time
import wave
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any, TextIO

from harkd.client import RealtimeClient
from harkd.config import parse_config
from harkd.messages import (
    ClientEvent,
    MessageFinalized,
    RealtimeMode,
    RealtimeState,
    RealtimeStatus,
    ToolCallFinished,
)
from harkd.service import Daemon
from harkd.testing import FakeScript, ToolRule
from harkd.testing.fakes import fake_server

DEMO_KEY = "sk-harkd-demo-not-a-real-key"
QUESTION = "What time is it?"
TIMEOUT_S = 60.0
LEVEL_EVERY_S = 0.25


def broker_answers(host: str = "127.0.0.1", port: int = 1883) -> bool:
    """True when something accepts MQTT connections on localhost."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def _tool_reply(outputs: list[tuple[str, str]]) -> str:
    for name, output in outputs:
        if name == "get_time":
            data = json.loads(output)
            return f"It is {data.get('time', 'unknown')} on {data.get('weekday', 'this day')}."
    return "Done."


class ConversationPrinter:
    """Prints status, mode, transcripts, tool calls and levels as they happen."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = time.monotonic()
        self.status: RealtimeStatus | None = None
        self.mode: RealtimeMode | None = None
        self.tool_calls = 0
        self.answered = asyncio.Event()

    def line(self, text: str) -> None:
        """One timestamped line."""
        print(f"[{time.monotonic() - self.started:5.1f}s] {text}", file=self.out, flush=True)

    def on_state(self, state: RealtimeState) -> None:
        """State subscriber: status and mode changes."""
        if state.status != self.status:
            self.status = state.status
            self.line(f"status: {state.status.value}")
        if state.mode != self.mode:
            self.mode = state.mode
            self.line(f"mode: {state.mode.value}")

    def on_event(self, event: ClientEvent) -> None:
        """Event subscriber: final transcripts and tool calls."""
        if isinstance(event, MessageFinalized) and event.message.text:
            who = "you" if event.message.role == "user" else event.message.role
            self.line(f"{who}: {event.message.text}")
            if event.message.role == "assistant" and self.tool_calls:
                self.answered.set()
        elif isinstance(event, ToolCallFinished):
            self.tool_calls += 1
            result = f"error {event.error}" if event.error else json.dumps(event.output)
            self.line(f"tool: {event.name}({event.arguments}) -> {result}")

    async def show_levels(self, client: RealtimeClient) -> None:
        """Level meters while someone is talking."""
        while True:
            await asyncio.sleep(LEVEL_EVERY_S)
            audio = client.audio
            if audio is None or max(audio.input_level, audio.output_level) < 0.01:
                continue
            self.line(f"levels  mic {_bar(audio.input_level)}  speaker {_bar(audio.output_level)}")


def _bar(level: float, width: int = 12) -> str:
    filled = round(min(1.0, level * 3) * width)  # speech sits well below full scale
    return "#" * filled + "." * (width - filled)


async def run_demo(
    speaker: str | None = None,
    state_dir: str | None = None,
    out: TextIO = sys.stdout,
    provider: str = "openai",
) -> int:
    """Run one spoken turn with a tool call through the real daemon against the fake
    server of `provider`; 0 when it worked."""
    with contextlib.ExitStack() as stack:
        root = (
            Path(state_dir)
            if state_dir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="harkd-demo-")))
        )
        if state_dir and not speaker:
            root.mkdir(parents=True, exist_ok=True)
        question = stack.enter_context(as_file(files("harkd") / "data" / "demo_question.wav"))
        answer = root / "answer.wav"
        output = speaker or f"file:{answer}"
        script = FakeScript(
            user_transcripts=[QUESTION],
            tool_rules=[ToolRule(r"\btime\b", "get_time")],
            tool_reply=_tool_reply,
            pace=4.0,
        )
        server = fake_server(provider, script, api_keys={DEMO_KEY})
        async with server:
            realtime = server.realtime_config(DEMO_KEY)
            return await _converse(realtime, question, output, root, out)
    return 1


async def _converse(
    realtime: dict[str, Any], question: Path, output: str, root: Path, out: TextIO
) -> int:
    mqtt = broker_answers()
    config = parse_config(_demo_config(realtime, question, output, root, mqtt), "<demo>", {})
    printer = ConversationPrinter(out)
    broker = "broker on localhost:1883, topics harkd/demo/#" if mqtt else "no broker, off"
    print("harkd demo: the daemon's own code path against a built-in fake server", file=out)
    print(f"  provider    {config.realtime.provider} (fake)", file=out)
    print(f"  microphone  bundled speech: {question}", file=out)
    print(f"  speaker     {output}", file=out)
    print(f"  MQTT        {broker}", file=out)
    tasks: list[asyncio.Task[Any]] = []

    def attach(client: RealtimeClient) -> None:
        client.on_state_change(printer.on_state)
        client.on_event(printer.on_event)
        tasks.append(asyncio.create_task(printer.show_levels(client), name="demo-levels"))

    daemon = Daemon(config, None, on_client=attach)
    running = asyncio.create_task(daemon.run(), name="demo-daemon")
    try:
        # An answer is final once it has been heard to the end.
        await asyncio.wait_for(printer.answered.wait(), TIMEOUT_S)
        ok = True
    except TimeoutError:
        printer.line(f"no answer within {TIMEOUT_S:.0f} s")
        ok = False
    finally:
        daemon.stop()
        await running
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if output.startswith("file:"):
        _describe_wav(Path(output.removeprefix("file:")), out)
    print(f"journal: {root / 'transcripts.jsonl'}", file=out)
    return 0 if ok else 1


def _describe_wav(path: Path, out: TextIO) -> None:
    with contextlib.suppress(OSError, wave.Error), wave.open(str(path), "rb") as wav:
        seconds = wav.getnframes() / wav.getframerate()
        print(f"answer audio: {seconds:.1f} s written to {path}", file=out)


def _demo_config(
    realtime: dict[str, Any], question: Path, output: str, root: Path, mqtt: bool
) -> dict[str, Any]:
    return {
        "device": {"id": "demo", "name": "harkd demo"},
        "realtime": {**realtime, "instructions": "Answer briefly."},
        "audio": {"input": {"device": f"file:{question}"}, "output": {"device": output}},
        "mqtt": {"enabled": mqtt, "host": "127.0.0.1"},
        "plugins": {"clock": {}, "timers": {}},
        "state_dir": str(root),
        "log_level": "warning",
    }
