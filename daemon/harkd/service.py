"""The daemon supervisor: builds every part from the config and owns all of its tasks
in one TaskGroup.

A part that crashes is logged, shown as the client's error and restarted with
backoff; the process lives on. SIGTERM/SIGINT shut down in order (stop audio,
publish offline, close the session, flush the journal) within 5 s. SIGHUP reloads
config.yaml and applies what can change live.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from harkd.adapters.registry import build_adapter, token_source
from harkd.aio import cancel_and_wait
from harkd.arbitration import MqttArbiter
from harkd.audio import open_input, open_output
from harkd.audio.base import AudioInput, AudioOutput
from harkd.audio.pipeline import Stage
from harkd.backoff import Backoff
from harkd.capture import reads_in_batches
from harkd.client import RealtimeClient
from harkd.config import Config, ConfigError, load_config
from harkd.journal import TranscriptJournal
from harkd.logsetup import configure_logging, register_secret
from harkd.messages import (
    ClientEvent,
    ImagePart,
    MessageFinalized,
    RealtimeMessage,
    RealtimeState,
    RealtimeStatus,
    ToolCallFinished,
    is_url,
)
from harkd.mqtt import MqttBridge
from harkd.plugins import BackgroundTask, LiveTools, LoadedPlugins, PluginHost, load_plugins
from harkd.systemd import LoopLagProbe, SystemdNotifier, run_watchdog, watchdog_interval_s

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET_S = 5.0
READY_WAIT_S = 3.0
RESTART_MAX_DELAY_S = 60.0
RECOVERED_AFTER_S = 10.0
"""A restarted part counts as recovered (its error cleared) once it stayed up this long."""

# What SIGHUP applies without a restart; every other difference is reported.
LIVE_KEYS = (
    "realtime.instructions",
    "realtime.voice",
    "audio.output.volume",
    "plugins",
    "mqtt",
    "log_level",
)


@dataclass
class _Part:
    """A supervised long-lived task and whether it is healthy right now."""

    name: str
    task: asyncio.Task[None]
    alive: bool = True
    restarts: int = 0


@dataclass
class Daemon:
    """All parts of one running harkd, wired from a config."""

    config: Config
    config_path: Path | None = None
    notifier: SystemdNotifier = field(default_factory=SystemdNotifier)
    on_client: Callable[[RealtimeClient], None] | None = None
    """Hook for `harkd demo` (and tests): called once the client exists."""

    def __post_init__(self) -> None:
        self.client = _build_client(self.config)
        self.journal = TranscriptJournal(
            self.config.state_dir / "transcripts.jsonl",
            self.config.journal.max_bytes,
            self.config.journal.keep,
        )
        self.bridge: MqttBridge | None = None
        self.plugins = LoadedPlugins()
        self.live_tools = LiveTools(self._apply_tools)
        self._parts: dict[str, _Part] = {}
        self._plugin_tasks: list[asyncio.Task[None]] = []
        self._service_tasks: list[asyncio.Task[None]] = []
        self._plugin_subscriptions: list[Callable[[], None]] = []
        self._tasks: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._journal_queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._session_id = f"{int(time.time())}"
        self._probe = LoopLagProbe()
        self._started = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (or `stop()`); returns the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            # The bridge exists before plugins load: they subscribe while loading.
            self.bridge = self._make_bridge(self.config)
            self._load_plugins(self.config)
            self.client.update_settings(tools=self.live_tools.tools)
            self.client.on_event(self._on_event)
            self.client.on_state_change(self._on_state)
            if self.on_client is not None:
                self.on_client(self.client)
            async with asyncio.TaskGroup() as tasks:
                self._tasks = tasks
                self._start(tasks)
                await self._announce_ready()
                await self._stop.wait()
                await self._shutdown()
        finally:
            self._tasks = None
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.journal.close()
        log.info("harkd stopped")
        return 0

    def stop(self) -> None:
        """Begin an orderly shutdown."""
        if not self._stop.is_set():
            log.info("shutting down")
            self.notifier.stopping()
            self._stop.set()

    def _start(self, tasks: asyncio.TaskGroup) -> None:
        self._supervise(tasks, "session", self.client.run)
        self._start_mqtt(tasks)
        self._start_plugin_tasks(tasks, self.plugins.background)
        self._service_tasks = [tasks.create_task(self._write_journal(), name="journal")]
        interval = watchdog_interval_s()
        if interval:
            # The probe only feeds the watchdog's check: without a watchdog its ticks
            # would be wake-ups for nothing on a board that should sleep between frames.
            watchdog = run_watchdog(self.notifier, self.healthy, interval)
            self._service_tasks += [
                tasks.create_task(self._probe.run(), name="loop-probe"),
                tasks.create_task(watchdog, name="watchdog"),
            ]

    async def _announce_ready(self) -> None:
        """READY=1 once audio, session and MQTT are up or retrying (an on-demand
        session opens only when needed: nothing to wait for)."""
        if self.config.realtime.connect == "always":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READY_WAIT_S):
                    await self._started.wait()
        self.notifier.ready()
        self._on_state(self.client.state)
        log.info("harkd ready (device %s)", self.config.device.id)

    async def _shutdown(self) -> None:
        """Stop audio, publish offline, close the session, flush the journal."""
        try:
            async with asyncio.timeout(SHUTDOWN_BUDGET_S - 0.5):
                await self.client.stop_audio()
                if "mqtt" in self._parts:
                    await cancel_and_wait(self._parts.pop("mqtt").task)
                await self.client.disconnect()
                await self._journal_queue.join()
        except TimeoutError:
            log.warning("shutdown took too long; stopping the rest now")
        # Whatever is left (plugins, journal writer, probe, watchdog) ends with the group.
        parts = [p.task for p in self._parts.values()]
        for task in parts + self._plugin_tasks + self._service_tasks:
            task.cancel()

    def healthy(self) -> bool:
        """The watchdog's check: loop responsive and every part running."""
        return self._probe.healthy(max_lag_s=5.0) and all(p.alive for p in self._parts.values())

    # --- supervision ----------------------------------------------------------------

    def _supervise(
        self, tasks: asyncio.TaskGroup, name: str, factory: Callable[[], Awaitable[None]]
    ) -> None:
        part = _Part(name, tasks.create_task(self._keep_running(name, factory), name=name))
        self._parts[name] = part

    async def _keep_running(self, name: str, factory: Callable[[], Awaitable[None]]) -> None:
        loop = asyncio.get_running_loop()
        # No jitter: a part restarts on its own device, nobody else's retries to spread.
        backoff = Backoff(1.0, restart_ceiling_s(watchdog_interval_s()), jitter=0)
        recovery: asyncio.TimerHandle | None = None
        while True:
            started = time.monotonic()
            try:
                await factory()
                return
            except Exception as exc:
                part = self._parts.get(name)
                if part is not None:
                    part.alive = False
                    part.restarts += 1
                if time.monotonic() - started >= RECOVERED_AFTER_S:
                    backoff.reset()  # it had been working: a new failure, not a crash loop
                delay = backoff.next()
                log.exception("%s failed; restarting in %.0f s", name, delay)
                self.client.problems.report_failure(name, f"{type(exc).__name__}: {exc}")
            finally:
                if recovery is not None:
                    recovery.cancel()
            await asyncio.sleep(delay)
            if (part := self._parts.get(name)) is not None:
                part.alive = True  # running again: the watchdog may ping
            # The error stays shown until the part has stayed up, so B/error does not
            # flap clear-and-set through a crash loop.
            recovery = loop.call_later(
                RECOVERED_AFTER_S, self.client.problems.report_recovered, name
            )

    # --- MQTT and plugins -------------------------------------------------------------

    def _make_bridge(self, config: Config) -> MqttBridge | None:
        if not config.mqtt.enabled:
            self.client.arbiter = None  # alone: every wake word is this device's
            return None
        words = [Path(w.model).stem for w in config.wake.words] if config.wake.enabled else []
        bridge = MqttBridge(
            config.mqtt, config.device, config.mqtt_password(), self.client, wake_words=words
        )
        self.client.arbiter = None
        if config.wake.enabled and config.wake.arbitration:
            arbiter = MqttArbiter(
                config.device.id,
                config.mqtt.base_topic,
                publish=lambda topic, payload: bridge.publish(topic, payload, qos=1),
                connected=lambda: bridge.connected,
            )
            bridge.subscribe(arbiter.topic, arbiter.received)
            self.client.arbiter = arbiter
        return bridge

    def _start_mqtt(
        self, tasks: asyncio.TaskGroup, after: asyncio.Task[None] | None = None
    ) -> None:
        """Supervise the current bridge (subscriptions made before it connects are kept)."""
        bridge = self.bridge
        if bridge is None:
            return

        async def run() -> None:
            if after is not None:
                # Same client id: connecting before the old bridge has published offline
                # and disconnected makes the broker take its session over (Last Will,
                # a "connection lost" warning and a reconnect fight until it stops).
                await asyncio.wait([after])
            await bridge.run()

        self._supervise(tasks, "mqtt", run)

    def _load_plugins(self, config: Config) -> None:
        mqtt_on = config.mqtt.enabled
        self.live_tools.close()  # the old plugin instances' offers are void from now on
        live = self.live_tools = LiveTools(self._apply_tools)
        host = PluginHost(
            config.device.id,
            config.state_dir,
            base_topic=f"{config.mqtt.base_topic}/{config.device.id}",
            say=self.client.say,
            announce=self.client.announce,
            publish=self._publish if mqtt_on else None,
            subscribe=self._subscribe if mqtt_on else None,
            offer=live.offer,
        )
        source = str(self.config_path or "config")
        self.plugins = load_plugins(config.plugins, host, source=source)  # logs problems
        live.start(self.plugins)

    def _apply_tools(self) -> None:
        """A plugin changed its tools or instructions: the session gets them in one update."""
        self.client.update_settings(
            instructions=self.live_tools.instructions(self.config.realtime.instructions),
            tools=self.live_tools.tools,
        )

    # Plugins keep these two even when SIGHUP replaces the bridge.
    def _publish(
        self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False
    ) -> None:
        if self.bridge is None:
            raise RuntimeError("MQTT is not running")
        self.bridge.publish(topic, payload, qos, retain)

    def _subscribe(self, topic_filter: str, callback: Callable[[str, bytes, bool], None]) -> None:
        if self.bridge is None:
            raise RuntimeError("MQTT is not running")
        self._plugin_subscriptions.append(self.bridge.subscribe(topic_filter, callback))

    def _start_plugin_tasks(
        self, tasks: asyncio.TaskGroup, background: tuple[BackgroundTask, ...]
    ) -> None:
        self._plugin_tasks = [tasks.create_task(b.run(), name=b.name) for b in background]

    # --- subscribers --------------------------------------------------------------------

    def _on_event(self, event: ClientEvent) -> None:
        if isinstance(event, MessageFinalized):
            _log_message(event.message)
            record = {**_journal_form(event.message), "session": self._session_id}
            try:
                self._journal_queue.put_nowait(record)
            except asyncio.QueueFull:
                log.warning("transcript journal is behind; message %s not kept", event.message.id)
        elif isinstance(event, ToolCallFinished):
            outcome = f"error: {event.error}" if event.error else f"= {event.output}"
            log.info(
                "tool %s(%s) %s (%.0f ms)", event.name, event.arguments, outcome, event.duration_ms
            )

    def _on_state(self, state: RealtimeState) -> None:
        if state.status is not RealtimeStatus.IDLE:
            self._started.set()
        words = [state.status.value, state.mode.value]
        if state.mic_muted:
            words.append("mic muted")
        if state.error is not None:
            words.append(f"error: {state.error.message}")
        self.notifier.status(", ".join(words))

    async def _write_journal(self) -> None:
        while True:
            record = await self._journal_queue.get()
            try:
                await self.journal.append_async(record)
            except OSError as exc:
                log.error("cannot write the transcript journal: %s", exc)
            finally:
                self._journal_queue.task_done()

    # --- SIGHUP -------------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read config.yaml; apply live changes, name those that need a restart."""
        if self.config_path is None:
            log.warning("SIGHUP: running on built-in defaults, nothing to reload")
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("SIGHUP: config not reloaded, keeping the running one:\n%s", exc)
            return
        for secret in (new.api_key(), new.mqtt_password()):
            if secret:
                register_secret(secret)
        changed = config_differences(self.config, new)
        if not changed:
            log.info("SIGHUP: config unchanged")
            return
        live = [k for k in changed if k.startswith(LIVE_KEYS)]
        later = [k for k in changed if not k.startswith(LIVE_KEYS)]
        old, self.config = self.config, new
        self._apply_live(old, new)
        if live:
            log.info("SIGHUP: applied %s", ", ".join(live))
        if later:
            log.warning("SIGHUP: these changes need a restart: %s", ", ".join(later))

    def _apply_live(self, old: Config, new: Config) -> None:
        if new.log_level != old.log_level:
            configure_logging(new.log_level)
        if new.audio.output.volume != old.audio.output.volume:
            self.client.set_volume(new.audio.output.volume)
        tasks = self._tasks
        reload_plugins = new.plugins != old.plugins or new.mqtt != old.mqtt
        if reload_plugins:
            for task in self._plugin_tasks:
                task.cancel()
            # The old plugin instances' subscriptions go with them.
            for unsubscribe in self._plugin_subscriptions:
                unsubscribe()
            self._plugin_subscriptions.clear()
        if new.mqtt != old.mqtt and tasks is not None:
            part = self._parts.pop("mqtt", None)
            if part is not None:
                part.task.cancel()  # publishes offline; the group awaits it
            # The new bridge must exist before the reloaded plugins subscribe to it.
            self.bridge = self._make_bridge(new)
            self._start_mqtt(tasks, after=part.task if part is not None else None)
        if reload_plugins:
            self._load_plugins(new)
            if tasks is not None:
                self._start_plugin_tasks(tasks, self.plugins.background)
        self.client.update_settings(
            instructions=self.live_tools.instructions(new.realtime.instructions),
            voice=new.realtime.voice,
            tools=self.live_tools.tools,
        )


def restart_ceiling_s(watchdog_ping_s: float | None) -> float:
    """The longest wait before restarting a failed part.

    A waiting part fails the watchdog's health check, so under a systemd watchdog the
    wait stays well inside one ping interval (half of WatchdogSec): systemd must not
    kill a daemon that is only waiting to retry.
    """
    if watchdog_ping_s is None:
        return RESTART_MAX_DELAY_S
    return max(1.0, min(RESTART_MAX_DELAY_S, watchdog_ping_s / 2))


def config_differences(old: Config, new: Config) -> list[str]:
    """Dotted paths of every setting that differs (secrets compared, never shown)."""
    return _diff(old.model_dump(), new.model_dump(), ())


def _diff(old: Any, new: Any, path: tuple[str, ...]) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict) and path != ("plugins",):
        keys = list(dict.fromkeys([*old, *new]))
        return [d for k in keys for d in _diff(old.get(k), new.get(k), (*path, str(k)))]
    return [".".join(path)] if old != new else []


def _build_client(config: Config) -> RealtimeClient:
    rt = config.realtime
    key = config.api_key() or ""
    register_secret(key)
    modes = {"server_vad": "server", "semantic_vad": "semantic", "manual": "manual"}
    assert rt.voice is not None  # the config filled in the provider's default or refused
    adapter = build_adapter(rt)
    batched = reads_in_batches(config.wake.enabled, config.audio.processing.echo_cancellation)
    audio_input = open_input(config.audio.input, batched=batched)
    audio_output = open_output(config.audio.output, adapter.traits.output_format.rate)
    return RealtimeClient(
        get_token=token_source(rt, key),
        adapter=adapter,
        vad_mode=modes[rt.turn_detection],  # type: ignore[arg-type]
        instructions=rt.instructions,
        voice=rt.voice,
        transcription_model=rt.transcription_model,
        audio_input=audio_input,
        audio_output=audio_output,
        barge_in=config.audio.barge_in,
        echo_tail_ms=config.audio.echo_tail_ms,
        vad=config.vad,
        reconnect=Backoff(rt.reconnect.initial_delay_s, rt.reconnect.max_delay_s),
        rollover_s=rt.rollover_s,
        replay_messages=rt.replay_messages,
        volume=config.audio.output.volume,
        wake=config.wake if config.wake.enabled else None,
        connect=rt.connect,
        idle_disconnect_s=rt.idle_disconnect_s,
        conditioning=_conditioning(config, audio_input, audio_output),
    )


def _conditioning(
    config: Config, audio_input: AudioInput, audio_output: AudioOutput
) -> Sequence[Stage]:
    """The `audio.processing` stages. Their module (numpy, WebRTC's APM) is imported only
    when one is asked for."""
    if not config.audio.processing.active:
        return []
    from harkd.audio.echo import processing_stages

    return processing_stages(config.audio.processing, audio_input.sample_rate, audio_output)


def _journal_form(message: RealtimeMessage) -> dict[str, Any]:
    """The message as kept on disk: inline image data is summarised, not stored."""
    parts = tuple(
        replace(p, data=f"<{len(p.data)} bytes of base64>")
        if isinstance(p, ImagePart) and not is_url(p.data)
        else p
        for p in message.parts
    )
    return replace(message, parts=parts).to_dict()


def _log_message(message: RealtimeMessage) -> None:
    mark = " [interrupted]" if message.interrupted else ""
    if message.text:
        log.info("%s: %s%s", message.role, message.text, mark)


async def run_daemon(config: Config, config_path: Path | None) -> int:
    """`harkd run`: the daemon until a signal stops it."""
    return await Daemon(config, config_path).run()
