"""The MQTT bridge: publishes the client's state and events, takes commands.

Implements the "MQTT contract" of DESIGN.md for one device, base topic
`B = <base_topic>/<device.id>`, plus Home Assistant discovery (`ha_discovery.py`).

Threading: paho-mqtt runs its own network thread (`loop_start`). Every paho callback
only copies its arguments and hands them to the asyncio loop with
`call_soon_threadsafe`; all bridge state lives on the loop, so nothing here needs a
lock. `paho.Client.publish` / `subscribe` are thread-safe and are called from the loop.

Lifecycle: `await bridge.run()` in the daemon's TaskGroup. It connects in the
background (a broker that is down is a status, not an error), keeps reconnecting with
backoff forever, and on cancellation publishes `offline`, disconnects and returns by
re-raising `CancelledError`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import random
import re
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, _ConnectionState
from paho.mqtt.reasoncodes import ReasonCode

from .backoff import Backoff
from .config import DeviceConfig, MqttConfig, TlsFiles
from .ha_discovery import (
    AVAILABLE,
    NOT_AVAILABLE,
    discovery_config,
    discovery_topic,
    package_info,
)
from .messages import (
    AudioVisualization,
    ClientEvent,
    MessageFinalized,
    PartialTranscript,
    RealtimeMessage,
    RealtimeState,
    ToolCallFinished,
    UsageReported,
    WakeHeard,
    is_data_url,
    is_url,
)

__all__ = ["Controller", "MessageCallback", "MqttBridge", "make_client", "state_payloads"]

logger = logging.getLogger(__name__)

MessageCallback = Callable[[str, bytes, bool], None]
"""`callback(topic, payload, retained)`, called on the asyncio loop."""

MAX_QUEUED = 1000
"""QoS >= 1 messages kept while disconnected; the oldest are dropped first."""
MAX_TEXT_BYTES = 4 * 1024
MAX_IMAGE_BYTES = 1024 * 1024
EVENT_INTERVAL_S = 0.1
"""Partial transcripts and audio levels: at most 10 messages a second each."""
LEVEL_HEARTBEAT_S = 1.0
"""Unchanged audio levels are still sent this often, so viewers know levels are on."""
SHUTDOWN_TIMEOUT_S = 1.0

_VOLUME = re.compile(r"[+-]?[0-9]+")
_SSL_SOURCE = re.compile(r"\s*\(_ssl\.c:\d+\)")
_DATA_URL = re.compile(r"data:image/[\w.+-]+(;[\w=.+-]+)*;base64,", re.ASCII)


class Controller(Protocol):
    """What the bridge needs from the realtime client (`RealtimeClient` satisfies it).

    Callbacks registered with `on_state_change` / `on_event` must be invoked on the
    asyncio loop that runs `MqttBridge.run`.
    """

    @property
    def state(self) -> RealtimeState: ...

    @property
    def audio(self) -> AudioVisualization | None: ...

    def on_state_change(self, callback: Callable[[RealtimeState], None]) -> Callable[[], None]: ...

    def on_event(self, callback: Callable[[ClientEvent], None]) -> Callable[[], None]: ...

    def start_listening(self) -> None: ...

    def stop_listening(self) -> None: ...

    def interrupt(self) -> None: ...

    def send_text(self, text: str) -> None: ...

    def send_image(self, data: str, mime_type: str) -> None: ...

    def announce(self, text: str, chime: bool = False) -> None: ...

    def set_mic_mute(self, muted: bool) -> None: ...

    def set_volume(self, volume: int) -> None: ...

    async def connect(self) -> None: ...

    async def disconnect(self) -> None: ...


RECONNECT_INITIAL_S = 1.0
RECONNECT_MAX_S = 60.0
_STOPPED = (_ConnectionState.MQTT_CS_DISCONNECTING, _ConnectionState.MQTT_CS_DISCONNECTED)


class _BackoffClient(paho.Client):
    """paho's client, waiting between reconnect attempts as `harkd.backoff` says.

    paho's own wait doubles without jitter, so every device of a restarted broker
    would come back in the same second. paho (2.x) waits in exactly one place, its
    private `_reconnect_wait`; this override keeps its exit conditions and its
    `_reconnect_delay = None` on an accepted connection, which here means "reset".
    """

    def __init__(self, client_id: str) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
        self._backoff = Backoff(RECONNECT_INITIAL_S, RECONNECT_MAX_S)

    def _reconnect_wait(self) -> None:
        with self._reconnect_delay_mutex:
            if self._reconnect_delay is None:  # first failure since a connection was accepted
                self._backoff.reset()
            delay = self._backoff.next()
            self._reconnect_delay = round(delay)
        deadline = time.monotonic() + delay
        # Like paho: wake every second to see whether disconnect() or loop_stop() came.
        while not self._thread_terminate and self._state not in _STOPPED:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 1.0))


def make_client(mqtt: MqttConfig, password: str | None, client_id: str) -> paho.Client:
    """A paho client with credentials, TLS and jittered reconnect backoff (1 s .. 60 s).

    Not connected; callers set callbacks, then `connect_async` + `loop_start`.
    """
    client = _BackoffClient(client_id)
    if mqtt.username is not None:
        client.username_pw_set(mqtt.username, password)
    if mqtt.tls is True:
        client.tls_set()  # system CAs
    elif isinstance(mqtt.tls, TlsFiles):
        client.tls_set(
            ca_certs=_opt_path(mqtt.tls.ca_certs),
            certfile=_opt_path(mqtt.tls.certfile),
            keyfile=_opt_path(mqtt.tls.keyfile),
        )
    return client


class _BadCommand(Exception):
    """A command payload that does not fit the contract; the text says why."""


def _json(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def _last_said(messages: tuple[RealtimeMessage, ...], role: str) -> RealtimeMessage | None:
    # A user message that only carries an image or a tool result has no transcript.
    return next((m for m in reversed(messages) if m.role == role and m.text), None)


def state_payloads(state: RealtimeState) -> dict[str, bytes]:
    """The retained state topics (relative to B) and their payloads for `state`.

    A transcript topic is absent until there is a final transcript of that role, so
    the one retained from an earlier run stays until a new one replaces it.
    """
    payloads = {
        "status": state.status.value.encode(),
        "mode": state.mode.value.encode(),
        "mic_mute": b"ON" if state.mic_muted else b"OFF",
        "volume": str(state.volume).encode(),
        "error": _json(state.error.to_dict()) if state.error is not None else b"",
    }
    if user := _last_said(state.messages, "user"):
        payloads["transcript/user"] = _json(
            {"text": user.text, "message_id": user.id, "ts": user.timestamp}
        )
    if assistant := _last_said(state.messages, "assistant"):
        payloads["transcript/assistant"] = _json(
            {
                "text": assistant.text,
                "message_id": assistant.id,
                "ts": assistant.timestamp,
                "interrupted": assistant.interrupted,
            }
        )
    return payloads


class _Throttle:
    """At most one send per `interval_s`, trailing edge: the latest value always goes out."""

    def __init__(self, interval_s: float, send: Callable[[bytes], None]) -> None:
        self._interval_s = interval_s
        self._send = send
        self._last = float("-inf")
        self._pending: bytes | None = None
        self._timer: asyncio.TimerHandle | None = None

    def push(self, payload: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._pending = payload
        if self._timer is not None:
            return
        due = self._last + self._interval_s
        if loop.time() >= due:
            self._flush()
        else:
            self._timer = loop.call_at(due, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self._pending is not None:
            payload, self._pending = self._pending, None
            self._last = asyncio.get_running_loop().time()
            self._send(payload)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending = None


class MqttBridge:
    """Bridges one `Controller` to MQTT (see the module docstring for the lifecycle).

    `birth_delay_s` is the range of the random delay before answering a Home
    Assistant birth message (spreads the load when many devices answer at once).
    """

    def __init__(
        self,
        mqtt: MqttConfig,
        device: DeviceConfig,
        password: str | None,
        controller: Controller,
        *,
        wake_words: Sequence[str] = (),
        birth_delay_s: tuple[float, float] = (0.5, 3.0),
    ) -> None:
        """`wake_words`: the configured wake words (Home Assistant's wake event)."""
        self._config = mqtt
        self._device = device
        self._wake_words = tuple(wake_words)
        self._password = password
        self._controller = controller
        self._birth_delay_s = birth_delay_s
        self.base = f"{mqtt.base_topic}/{device.id}"
        """The device's base topic `B`."""
        self._client: paho.Client | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = False
        self._status = "not started"
        self._unreachable_logged = False
        self._refused_logged: str | None = None
        self._failure_logged: str | None = None
        self._socket_error: str | None = None
        self._published: dict[str, bytes] = {}
        self._queue: deque[tuple[str, bytes, int, bool]] = deque()
        self._dropped = 0
        self._subscriptions: dict[str, list[MessageCallback]] = {}
        self._partials = {
            role: _Throttle(EVENT_INTERVAL_S, self._partial_sender(role))
            for role in ("user", "assistant")
        }
        self._birth_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._commands: dict[str, Callable[[bytes], None]] = {
            "listen": lambda _: controller.start_listening(),
            "stop_listening": lambda _: controller.stop_listening(),
            "interrupt": lambda _: controller.interrupt(),
            "text": self._cmd_text,
            "image": self._cmd_image,
            "announce": self._cmd_announce,
            "mic_mute": self._cmd_mic_mute,
            "volume": self._cmd_volume,
            "connect": lambda _: self._spawn(controller.connect(), "connect"),
            "disconnect": lambda _: self._spawn(controller.disconnect(), "disconnect"),
        }
        self.subscribe(f"{self.base}/cmd/+", self._on_command)
        self._ha_status = (
            f"{mqtt.discovery_prefix}/status" if mqtt.discovery_prefix is not None else None
        )
        if self._ha_status is not None:
            self.subscribe(self._ha_status, self._on_ha_status)

    # -- public API -------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while the broker session is up (as last reported to the loop)."""
        return self._connected

    @property
    def status(self) -> str:
        """One line for humans and systemd STATUS=, e.g. `connected to host:1883`."""
        return self._status

    def publish(self, topic: str, payload: str | bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish on the daemon's connection; call from the loop.

        A no-op when MQTT is disabled. While disconnected, QoS 1/2 messages are queued
        (at most `MAX_QUEUED`, oldest dropped first) and sent after reconnecting; QoS 0
        messages are dropped.
        """
        if not topic or "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish on topic {topic!r}")
        if not self._config.enabled:
            return
        if qos not in (0, 1, 2):
            raise ValueError(f"bad QoS {qos!r}")
        data = payload.encode() if isinstance(payload, str) else bytes(payload)
        if self._connected:
            self._send(topic, data, qos, retain)
        elif qos > 0:
            self._enqueue(topic, data, qos, retain)

    def subscribe(self, topic_filter: str, callback: MessageCallback) -> Callable[[], None]:
        """Call `callback(topic, payload, retained)` on the loop for matching messages.

        The subscription is renewed on every reconnect. Returns an unsubscribe function.
        """
        if not _valid_filter(topic_filter):
            raise ValueError(f"bad topic filter {topic_filter!r}")
        callbacks = self._subscriptions.setdefault(topic_filter, [])
        callbacks.append(callback)
        if self._connected and self._client is not None and len(callbacks) == 1:
            self._client.subscribe(topic_filter, qos=1)

        def unsubscribe() -> None:
            if callback in callbacks:
                callbacks.remove(callback)
            if not callbacks and self._subscriptions.get(topic_filter) is callbacks:
                del self._subscriptions[topic_filter]
                if self._connected and self._client is not None:
                    self._client.unsubscribe(topic_filter)

        return unsubscribe

    async def run(self) -> None:
        """Run until cancelled: connect, publish, take commands; clean up on the way out.

        Returns only by raising `CancelledError` (or at once if `mqtt.enabled` is false).
        """
        if not self._config.enabled:
            self._status = "disabled"
            logger.info("MQTT disabled in the configuration")
            return
        self._loop = asyncio.get_running_loop()
        client = self._make_client()
        self._client = client
        unsubscribe_state = self._controller.on_state_change(self._on_state)
        unsubscribe_events = self._controller.on_event(self._on_event)
        self._status = f"connecting to {self._where}"
        client.connect_async(self._config.host, self._config.port, keepalive=60)
        client.loop_start()
        try:
            if self._config.publish_levels:
                await self._publish_levels()
            else:
                await asyncio.Event().wait()  # everything else is driven by callbacks
        finally:
            unsubscribe_state()
            unsubscribe_events()
            await self._shutdown(client)

    # -- paho thread -> loop ----------------------------------------------------------

    def _make_client(self) -> paho.Client:
        client = make_client(self._config, self._password, f"harkd-{self._device.id}")
        client.will_set(f"{self.base}/availability", NOT_AVAILABLE, qos=1, retain=True)
        # Backstop only: our own queue (MAX_QUEUED) holds what is published while we
        # know we are offline; this bounds paho's for the moments before we know.
        client.max_queued_messages_set(2 * MAX_QUEUED)
        client.on_connect = self._paho_connect
        client.on_connect_fail = self._paho_connect_fail
        client.on_disconnect = self._paho_disconnect
        client.on_message = self._paho_message
        client.on_log = self._paho_log
        return client

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed under a late callback
            loop.call_soon_threadsafe(fn, *args)

    def _paho_connect(self, _c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any) -> None:
        self._post(self._handle_connect, reason.is_failure, str(reason))

    def _paho_connect_fail(self, _c: paho.Client, _u: Any) -> None:
        # paho calls this inside its `except OSError:`; the exception tells TLS failures
        # (a certificate the CA does not vouch for, ...) from an unreachable broker.
        self._post(self._handle_unreachable, sys.exc_info()[1])

    def _paho_log(self, _c: paho.Client, _u: Any, level: int, buf: str) -> None:
        # paho reports why a socket failed only in its log, e.g. a TLS broker that
        # wants a client certificate drops us after the handshake, before CONNACK.
        if level == paho.MQTT_LOG_ERR:
            self._post(self._note_socket_error, buf)

    def _paho_disconnect(
        self, _c: paho.Client, _u: Any, _f: Any, reason: ReasonCode, _p: Any
    ) -> None:
        self._post(self._handle_disconnect, str(reason))

    def _paho_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        self._post(self._dispatch, msg.topic, bytes(msg.payload), bool(msg.retain))

    # -- connection events (loop) -----------------------------------------------------

    @property
    def _where(self) -> str:
        return f"{self._config.host}:{self._config.port}"

    def _handle_connect(self, failed: bool, reason: str) -> None:
        if failed:
            # Wrong credentials and the like: paho retries with growing backoff.
            self._status = f"refused by {self._where}: {reason}"
            level = logging.WARNING if self._refused_logged != reason else logging.DEBUG
            logger.log(level, "MQTT broker %s refused the connection: %s", self._where, reason)
            self._refused_logged = reason
            return
        client = self._client
        if client is None:
            return
        logger.info("MQTT connected to %s as %s", self._where, self.base)
        self._connected = True
        self._status = f"connected to {self._where}"
        self._unreachable_logged = False
        self._refused_logged = None
        self._failure_logged = None
        client.subscribe([(topic, 1) for topic in self._subscriptions])
        self._publish_all()
        self._flush_queue()

    def _handle_unreachable(self, error: BaseException | None = None) -> None:
        if isinstance(error, ssl.SSLError):
            self._connect_failed(f"TLS handshake with {self._where} failed: {_tls_reason(error)}")
            return
        self._status = f"broker {self._where} unreachable, retrying"
        level = logging.DEBUG if self._unreachable_logged else logging.WARNING
        logger.log(level, "MQTT broker %s unreachable; retrying with backoff", self._where)
        self._unreachable_logged = True

    def _note_socket_error(self, text: str) -> None:
        self._socket_error = _SSL_SOURCE.sub("", text)

    def _connect_failed(self, why: str) -> None:
        """A connection attempt failed for a reason worth telling (once, then debug)."""
        self._status = f"{why}; retrying"
        level = logging.WARNING if self._failure_logged != why else logging.DEBUG
        hint = "; check mqtt.tls" if self._config.tls else ""
        logger.log(level, "MQTT %s%s; retrying with backoff", why, hint)
        self._failure_logged = why

    def _handle_disconnect(self, reason: str) -> None:
        error, self._socket_error = self._socket_error, None
        if not self._connected:
            if error is not None and self._status != "stopped":
                self._connect_failed(f"broker {self._where} closed the connection ({error})")
            return
        self._connected = False
        self._unreachable_logged = True  # the loss is the warning; retries are debug
        self._status = f"disconnected from {self._where}, reconnecting"
        logger.warning("MQTT connection to %s lost (%s); reconnecting", self._where, reason)

    # -- publishing (loop) ------------------------------------------------------------

    def _send(self, topic: str, data: bytes, qos: int, retain: bool) -> paho.MQTTMessageInfo | None:
        if self._client is None:
            return None
        info = self._client.publish(topic, data, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            logger.warning("MQTT outgoing queue full; dropped a message on %s", topic)
        return info

    def _enqueue(self, topic: str, data: bytes, qos: int, retain: bool) -> None:
        if len(self._queue) >= MAX_QUEUED:
            self._queue.popleft()
            if not self._dropped:
                logger.warning(
                    "MQTT offline and %d messages queued: dropping the oldest", MAX_QUEUED
                )
            self._dropped += 1
        self._queue.append((topic, data, qos, retain))

    def _flush_queue(self) -> None:
        if self._dropped:
            logger.warning("MQTT dropped %d queued messages while offline", self._dropped)
            self._dropped = 0
        while self._queue and self._connected:
            self._send(*self._queue.popleft())

    def _publish_all(self) -> None:
        """Discovery, availability and every state topic: on connect and HA birth."""
        prefix = self._config.discovery_prefix
        if prefix is not None:
            version, url = package_info()
            config = discovery_config(
                self._device, self.base, version, url, wake_words=self._wake_words
            )
            self._send(discovery_topic(prefix, self._device.id), _json(config), 1, True)
        self._send(f"{self.base}/availability", AVAILABLE.encode(), 1, True)
        self._published = {}
        self._publish_state(self._controller.state)

    def _publish_state(self, state: RealtimeState) -> None:
        for sub, data in state_payloads(state).items():
            if self._published.get(sub) != data:
                self._send(f"{self.base}/{sub}", data, 1, True)
                self._published[sub] = data

    def _on_state(self, state: RealtimeState) -> None:
        # While offline nothing is sent: the whole state goes out on reconnect.
        if self._connected:
            self._publish_state(state)

    def _on_event(self, event: ClientEvent) -> None:
        if isinstance(event, PartialTranscript):
            payload = _json({"text": event.text, "message_id": event.message_id})
            self._partials[event.role].push(payload)
        elif isinstance(event, MessageFinalized):
            self.publish(f"{self.base}/message", _json(event.message.to_dict()), qos=1)
        elif isinstance(event, ToolCallFinished):
            self.publish(f"{self.base}/tool_call", _json(event.to_dict()), qos=1)
        elif isinstance(event, WakeHeard):
            self.publish(f"{self.base}/wake", _json(event.to_dict()), qos=1)
        elif isinstance(event, UsageReported):
            usage = {"response_id": event.response_id, "status": event.status}
            self.publish(f"{self.base}/usage", _json({**usage, "usage": dict(event.usage)}), 0)

    def _partial_sender(self, role: str) -> Callable[[bytes], None]:
        topic = f"{self.base}/transcript/{role}/partial"
        return lambda payload: self.publish(topic, payload, qos=0)

    async def _publish_levels(self) -> None:
        topic = f"{self.base}/audio/level"
        last: tuple[float, float] | None = None
        last_sent = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(EVENT_INTERVAL_S)
            audio = self._controller.audio
            if audio is None or not self._connected:
                continue
            levels = (round(audio.input_level, 3), round(audio.output_level, 3))
            if levels != last or loop.time() - last_sent >= LEVEL_HEARTBEAT_S:
                self.publish(topic, _json({"input": levels[0], "output": levels[1]}), qos=0)
                last, last_sent = levels, loop.time()

    # -- incoming messages (loop) -----------------------------------------------------

    def _dispatch(self, topic: str, payload: bytes, retained: bool) -> None:
        for topic_filter, callbacks in list(self._subscriptions.items()):
            if not paho.topic_matches_sub(topic_filter, topic):
                continue
            for callback in list(callbacks):
                try:
                    callback(topic, payload, retained)
                except Exception:
                    logger.exception("MQTT subscriber of %s failed on %s", topic_filter, topic)

    def _on_ha_status(self, _topic: str, payload: bytes, retained: bool) -> None:
        # A retained birth is old news: everything was just published on connect.
        if retained or payload.strip().lower() != AVAILABLE.encode() or self._loop is None:
            return
        if self._birth_timer is not None:
            self._birth_timer.cancel()
        delay = random.uniform(*self._birth_delay_s)
        logger.debug("Home Assistant came online; republishing in %.1f s", delay)
        self._birth_timer = self._loop.call_later(delay, self._on_birth_timer)

    def _on_birth_timer(self) -> None:
        self._birth_timer = None
        if self._connected:
            self._publish_all()

    def _on_command(self, topic: str, payload: bytes, retained: bool) -> None:
        name = topic.rsplit("/", 1)[-1]
        if retained:
            # Retained commands would replay on every reconnect; never act on them.
            logger.warning("MQTT ignoring retained command on %s (clear it on the broker)", topic)
            return
        handler = self._commands.get(name)
        try:
            if handler is None:
                raise _BadCommand(f"unknown command (known: {', '.join(self._commands)})")
            logger.info("MQTT command %s", name)
            handler(payload)
        except _BadCommand as exc:
            self._command_error("bad_command", topic, str(exc))
        except Exception as exc:
            logger.debug("MQTT command %s failed", topic, exc_info=True)
            self._command_error("command_failed", topic, f"{type(exc).__name__}: {exc}")

    def _command_error(self, code: str, topic: str, why: str) -> None:
        message = f"{topic}: {why}"
        logger.warning("MQTT %s: %s", code, message)
        # Not retained: the retained B/error is the client's error state, which a bad
        # command must not replace.
        self.publish(
            f"{self.base}/error", _json({"code": code, "message": message, "ts": time.time()})
        )

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=f"mqtt-cmd-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            topic = f"{self.base}/cmd/{task.get_name().removeprefix('mqtt-cmd-')}"
            self._command_error("command_failed", topic, f"{type(exc).__name__}: {exc}")

    # -- commands (loop) --------------------------------------------------------------

    def _cmd_text(self, payload: bytes) -> None:
        if len(payload) > MAX_TEXT_BYTES:
            raise _BadCommand(f"text is {len(payload)} bytes, at most {MAX_TEXT_BYTES} allowed")
        text = _utf8(payload).strip()
        if not text:
            raise _BadCommand("empty text")
        self._controller.send_text(text)

    def _cmd_announce(self, payload: bytes) -> None:
        # Plain text, or JSON {"text", "chime"} (what Home Assistant's notify sends).
        if len(payload) > MAX_TEXT_BYTES:
            raise _BadCommand(f"text is {len(payload)} bytes, at most {MAX_TEXT_BYTES} allowed")
        raw = _utf8(payload).strip()
        chime = False
        text: object = raw
        if raw.startswith("{"):
            try:
                body = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise _BadCommand(f"not JSON: {exc}") from None
            if not isinstance(body, dict):
                raise _BadCommand('expected text or a JSON object {"text", "chime"}')
            text, wanted = body.get("text"), body.get("chime", False)
            if not isinstance(wanted, bool):
                raise _BadCommand(f"chime must be true or false, got {wanted!r}")
            chime = wanted
        if not isinstance(text, str) or not text.strip():
            raise _BadCommand("empty text")
        self._controller.announce(text.strip(), chime)

    def _cmd_image(self, payload: bytes) -> None:
        if len(payload) > MAX_IMAGE_BYTES:
            raise _BadCommand(f"image is {len(payload)} bytes, at most {MAX_IMAGE_BYTES} allowed")
        try:
            body = json.loads(_utf8(payload))
        except json.JSONDecodeError as exc:
            raise _BadCommand(f"not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _BadCommand('expected a JSON object {"data", "mime_type"}')
        data, mime_type = body.get("data"), body.get("mime_type")
        if not isinstance(mime_type, str) or not re.fullmatch(r"image/[\w.+-]+", mime_type):
            raise _BadCommand(f"mime_type must be image/..., got {mime_type!r}")
        if not isinstance(data, str) or not data:
            raise _BadCommand("data must be a non-empty string (base64 or URL)")
        if not is_url(data):
            encoded = _DATA_URL.sub("", data, count=1) if is_data_url(data) else data
            if is_data_url(data) and encoded == data:
                raise _BadCommand("data URL must be data:image/...;base64,...")
            try:
                base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise _BadCommand("data is neither base64 nor an http(s)/data URL") from None
        self._controller.send_image(data, mime_type)

    def _cmd_mic_mute(self, payload: bytes) -> None:
        value = _utf8(payload).strip().upper()
        if value not in ("ON", "OFF"):
            raise _BadCommand(f"expected ON or OFF, got {_shown(payload)}")
        self._controller.set_mic_mute(value == "ON")

    def _cmd_volume(self, payload: bytes) -> None:
        text = _utf8(payload).strip()
        if not _VOLUME.fullmatch(text):
            raise _BadCommand(f"expected an integer 0..100, got {_shown(payload)}")
        volume = int(text)
        if not 0 <= volume <= 100:
            raise _BadCommand(f"volume must be 0..100, got {volume}")
        self._controller.set_volume(volume)

    # -- shutdown ---------------------------------------------------------------------

    async def _shutdown(self, client: paho.Client) -> None:
        """Publish `offline`, wait (bounded) until it is acknowledged, disconnect."""
        for throttle in self._partials.values():
            throttle.cancel()
        if self._birth_timer is not None:
            self._birth_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._connected:
            info = self._send(f"{self.base}/availability", NOT_AVAILABLE.encode(), 1, True)
            if info is not None:
                await asyncio.to_thread(_wait_published, info, SHUTDOWN_TIMEOUT_S)
        self._connected = False
        self._status = "stopped"
        client.disconnect()
        # loop_stop joins paho's thread, which may sit in a connect attempt: join it off
        # the loop, bounded; it is a daemon thread, so a straggler cannot block exit.
        stopped = asyncio.Event()

        def stop() -> None:
            client.loop_stop()
            self._post(stopped.set)

        threading.Thread(target=stop, name="mqtt-stop", daemon=True).start()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                await stopped.wait()
        logger.info("MQTT disconnected")


def _wait_published(info: paho.MQTTMessageInfo, timeout_s: float) -> None:
    try:
        info.wait_for_publish(timeout_s)
    except (ValueError, RuntimeError):  # never queued or the link failed: give up
        logger.debug("MQTT offline message not sent")


def _valid_filter(topic_filter: str) -> bool:
    levels = topic_filter.split("/")
    return (
        bool(topic_filter)
        and all(
            ("+" not in level or level == "+") and ("#" not in level or level == "#")
            for level in levels
        )
        and "#" not in levels[:-1]
    )


def _utf8(payload: bytes) -> str:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadCommand("payload is not UTF-8") from None


def _shown(payload: bytes) -> str:
    return repr(payload[:40].decode("utf-8", "replace"))


def _tls_reason(error: ssl.SSLError) -> str:
    if isinstance(error, ssl.SSLCertVerificationError) and error.verify_message:
        return f"certificate verify failed: {error.verify_message}"
    return _SSL_SOURCE.sub("", str(error))


def _opt_path(path: Path | None) -> str | None:
    return None if path is None else str(path)
