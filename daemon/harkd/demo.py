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
    WakeHeard,
)
from harkd.service import Daemon
from harkd.testing import FakeScript, ToolRule
from harkd.testing.fakes import ProviderFake, fake_server

DEMO_KEY = "sk-harkd-demo-not-a-real-key"
QUESTION = "What time is it?"
WAKE_INPUT = "demo_wake.wav"
"""`--wake`: "I wonder if it will rain later today." then "okay nabu, what time is it?"."""
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

    def __init__(self, out: TextIO, server: ProviderFake) -> None:
        self.out = out
        self.server = server
        self.sent_before_wake_ms: float | None = None
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
        elif isinstance(event, WakeHeard):
            if self.sent_before_wake_ms is None:
                self.sent_before_wake_ms = self.server.audio_ms_received
            self.line(
                f"wake word: {event.word} (score {event.score:.2f}, level {event.level:.3f}); "
                f"audio the provider had received before it: "
                f"{self.server.audio_ms_received:.0f} ms"
            )
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
    wake: bool = False,
) -> int:
    """Run one spoken turn with a tool call through the real daemon against the fake
    server of `provider`; 0 when it worked. `wake`: the microphone first says something
    without the wake word, then "okay nabu, what time is it?", and the demo shows that
    nothing reached the provider before the wake word."""
    with contextlib.ExitStack() as stack:
        root = (
            Path(state_dir)
            if state_dir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="harkd-demo-")))
        )
        if state_dir and not speaker:
            root.mkdir(parents=True, exist_ok=True)
        name = WAKE_INPUT if wake else "demo_question.wav"
        question = stack.enter_context(as_file(files("harkd") / "data" / name))
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
            config = _demo_config(
                server.realtime_config(DEMO_KEY), question, output, root, broker_answers(), wake
            )
            return await _converse(server, config, out)
    return 1


async def _converse(server: ProviderFake, raw: dict[str, Any], out: TextIO) -> int:
    config = parse_config(raw, "<demo>", {})
    printer = ConversationPrinter(out, server)
    mqtt = config.mqtt.enabled
    broker = "broker on localhost:1883, topics harkd/demo/#" if mqtt else "no broker, off"
    output = config.audio.output.device or "none"
    print("harkd demo: the daemon's own code path against a built-in fake server", file=out)
    print(f"  provider    {config.realtime.provider} (fake)", file=out)
    print(f"  microphone  bundled speech: {config.audio.input.device}", file=out)
    print(f"  speaker     {output}", file=out)
    print(f"  MQTT        {broker}", file=out)
    if config.wake.enabled:
        print("  wake word   okay_nabu: nothing leaves the device before it", file=out)
    tasks: list[asyncio.Task[Any]] = []

    def attach(client: RealtimeClient) -> None:
        client.on_state_change(printer.on_state)
        client.on_event(printer.on_event)
        tasks.append(asyncio.create_task(printer.show_levels(client), name="demo-levels"))

    daemon = Daemon(config, None, on_client=attach)
    running = asyncio.create_task(daemon.run(), name="demo-daemon")
    try:
        # An answer is final once it has been heard to the end.
        async with asyncio.timeout(TIMEOUT_S):
            await printer.answered.wait()
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
    if config.wake.enabled:
        before = printer.sent_before_wake_ms
        if before is None:
            printer.line("the wake word was not heard")
            ok = False
        else:
            printer.line(
                f"privacy: {before:.0f} ms of audio reached the provider before the wake word, "
                f"{server.audio_ms_received - before:.0f} ms after it"
            )
            ok = ok and before == 0
    if output.startswith("file:"):
        _describe_wav(Path(output.removeprefix("file:")), out)
    print(f"journal: {config.state_dir / 'transcripts.jsonl'}", file=out)
    return 0 if ok else 1


def _describe_wav(path: Path, out: TextIO) -> None:
    with contextlib.suppress(OSError, wave.Error), wave.open(str(path), "rb") as wav:
        seconds = wav.getnframes() / wav.getframerate()
        print(f"answer audio: {seconds:.1f} s written to {path}", file=out)


def _demo_config(
    realtime: dict[str, Any], question: Path, output: str, root: Path, mqtt: bool, wake: bool
) -> dict[str, Any]:
    return {
        "device": {"id": "demo", "name": "harkd demo"},
        "realtime": {**realtime, "instructions": "Answer briefly."},
        "wake": {"enabled": wake},
        "audio": {"input": {"device": f"file:{question}"}, "output": {"device": output}},
        "mqtt": {"enabled": mqtt, "host": "127.0.0.1"},
        "plugins": {"clock": {}, "timers": {}},
        "state_dir": str(root),
        "log_level": "warning",
    }
