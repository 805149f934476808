"""The real daemon as a user runs it: `harkd run -c config.yaml` as a subprocess.

The provider is the fake realtime server (in this process, so the test sees every
event the daemon sends), the microphone a speech WAV paced in real time, the broker a
private Mosquitto. What is checked is what a user or systemd would notice: sd_notify,
MQTT availability, a spoken turn with a tool call, the transcript journal and
`harkd history`, SIGHUP reloads, kill -9, secrets kept out of the logs, a broken
plugin left out while the daemon runs on.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from e2e import assert_all_valid, until
from harkd.testing import FakeRealtimeServer, FakeScript, ToolRule
from harkd_process import (
    DEMO_WAV,
    Harkd,
    NotifySocket,
    daemon_config,
    harkd_env,
    run_harkd,
    write_config,
)
from mosquitto import Mosquitto, Recorder, mosquitto_fixture, read_retained
from speech_fixtures import read_wav, silence, write_wav

pytestmark = pytest.mark.timeout(60)

KEY = f"sk-proj-daemontest{uuid.uuid4().hex}"
# Shaped like nothing the log redactor's patterns know: only registration can hide them.
SECRET_KEY = f"Zq7{uuid.uuid4().hex}Kx"
MQTT_USER = "harkd-kitchen"
MQTT_PASSWORD = f"Wombat{uuid.uuid4().hex[:12]}Tulip"
BASE = "harkd/testroom"
QUESTION = "What time is it?"

broker = mosquitto_fixture()
auth_broker = mosquitto_fixture(users={MQTT_USER: MQTT_PASSWORD})
# Logs unsubscriptions too ("<client id> <filter>"), next to subscriptions ("... 1 <filter>").
logged_broker = mosquitto_fixture(extra_config=("log_type unsubscribe",))


def clock_script(**kw: Any) -> FakeScript:
    """The user asks for the time; the model calls clock's get_time, then answers."""
    return FakeScript(
        user_transcripts=[QUESTION],
        tool_rules=[ToolRule(r"\btime\b", "get_time")],
        tool_reply=lambda outputs: f"It is {json.loads(outputs[0][1])['time']}.",
        audio_ms_per_char=15,
        **kw,
    )


def mqtt_on(b: Mosquitto, **over: Any) -> dict[str, Any]:
    return {"enabled": True, "host": b.host, "port": b.port, **over}


def journal_records(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "state" / "transcripts.jsonl"
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    return [json.loads(line) for line in lines[:-1]]  # the last one is "" or torn


def answered(tmp_path: Path) -> bool:
    """The journal holds an assistant message with words in it (not only a tool call)."""
    return any(r["role"] == "assistant" and text_of(r) for r in journal_records(tmp_path))


def text_of(record: dict[str, Any]) -> str:
    return " ".join(
        str(p.get("text") or p.get("transcript") or "")
        for p in record["parts"]
        if p["type"] in ("text", "audio")
    ).strip()


def speech_then_silence(path: Path, silence_ms: int = 1200) -> Path:
    """The bundled question followed by a pause (so a looped file makes separate turns)."""
    pcm, rate = read_wav(DEMO_WAV)
    write_wav(path, pcm + silence(silence_ms, rate), rate)
    return path


def silent_wav(path: Path, ms: int = 2000) -> Path:
    write_wav(path, silence(ms), 16000)
    return path


def install_plugin(site: Path, name: str, module: str, source: str) -> None:
    """A third-party plugin `name`, installed the way pip would (dist-info + entry point)."""
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    dist = site / f"{module}-1.0.dist-info"
    dist.mkdir()
    dist_name = module.replace("_", "-")
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[harkd.plugins]\n{name} = {module}:plugin\n")


async def history(config: Path) -> str:
    result = await asyncio.to_thread(run_harkd, "history", "-c", str(config), "-n", "5")
    assert result.returncode == 0, result.stderr
    return result.stdout


# --------------------------------------------------------------------------- systemd


async def test_sd_notify_watchdog_and_clean_shutdown(tmp_path: Path, broker: Mosquitto) -> None:
    notify = NotifySocket()
    env = harkd_env(NOTIFY_SOCKET=notify.address, WATCHDOG_USEC="2000000")
    try:
        async with FakeRealtimeServer(FakeScript(), api_keys={KEY}) as server:
            config = daemon_config(
                tmp_path,
                server.url,
                KEY,
                audio={"input": {"device": f"file:{silent_wav(tmp_path / 'quiet.wav')}"}},
                mqtt=mqtt_on(broker),
            )
            cfg = write_config(tmp_path, config)
            with Recorder(broker, f"{BASE}/#") as rec:
                async with Harkd(cfg, env=env) as daemon:
                    ready_at = await notify.wait_for("READY", "1")
                    # The figure only: its target is checked in benchmarks/bench_session.py.
                    startup_s = ready_at - daemon.started_at
                    print(f"\nharkd run: process start to READY=1 in {startup_s:.2f} s")

                    await until(
                        lambda: any(
                            "connected" in s and "listening" in s for s in notify.values("STATUS")
                        ),
                        20,
                        "STATUS=connected, listening",
                    )
                    await rec.wait_for(f"{BASE}/availability", lambda m: m.text == "online")
                    # WATCHDOG_USEC=2 s: a ping about every second. Load only delays
                    # pings, so the shortest gap shows the cadence: not a flood, and
                    # well inside the 2 s after which systemd would kill the daemon.
                    await until(lambda: len(notify.times("WATCHDOG", "1")) >= 4, 30, "4 pings")
                    pings = notify.times("WATCHDOG", "1")
                    gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
                    print(f"watchdog ping gaps: {', '.join(f'{g:.2f}' for g in gaps)} s")
                    assert 0.5 < min(gaps) < 1.5, gaps

                    daemon.send_signal(signal.SIGTERM)
                    asked_at = asyncio.get_running_loop().time()
                    code = await daemon.wait(20.0)  # systemd waits 90 s by default
                    took_s = asyncio.get_running_loop().time() - asked_at
                    print(f"SIGTERM to exit: {took_s:.2f} s")

                assert code == 0, daemon.output
                stopping = notify.times("STOPPING", "1")
                assert len(stopping) == 1 and stopping[0] > ready_at
                assert "Traceback" not in daemon.output
                # Clean shutdown: `offline` published by the daemon itself ...
                await rec.wait_for(f"{BASE}/availability", lambda m: m.text == "offline")
            # ... then a proper MQTT DISCONNECT (so it was not the Last Will) ...
            log = broker.log_text()
            clients = re.findall(r"New client connected from \S+ as (\S+) ", log)
            harkd_id = next(c for c in clients if not c.startswith("rec-"))
            assert f"Client {harkd_id} disconnected." in log, log
            assert f"Client {harkd_id} closed its connection" not in log
            # ... and the realtime websocket closed with a normal close handshake.
            session = server.sessions[0]
            await until(lambda: not session.connected, 10, "session closed")
            assert session.close_code == 1000
            assert len(server.sessions) == 1
    finally:
        notify.close()


# --------------------------------------------------------------------------- a voice turn


async def test_spoken_turn_with_a_tool_call_is_journaled(tmp_path: Path) -> None:
    async with FakeRealtimeServer(clock_script(), api_keys={KEY}) as server:
        cfg = write_config(tmp_path, daemon_config(tmp_path, server.url, KEY))
        async with Harkd(cfg) as daemon:
            await until(
                lambda: answered(tmp_path),
                30,
                "the answer in the journal",
            )
            assert await daemon.stop() == 0

        events = [e for _, e in server.received]
        types = [e["type"] for e in events]
        update = events[0]
        assert update["type"] == "session.update"
        assert update["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        assert "get_time" in [t["name"] for t in update["session"]["tools"]]
        assert types.count("input_audio_buffer.append") > 10
        session = server.sessions[0]
        assert session.auto_commits == 1  # the server's VAD ended the turn
        assert session.commits == 0 and "input_audio_buffer.commit" not in types

        outputs = [
            i
            for i, e in enumerate(events)
            if e["type"] == "conversation.item.create"
            and e["item"]["type"] == "function_call_output"
        ]
        assert len(outputs) == 1
        output = events[outputs[0]]["item"]
        call = next(it for it in session.items if it.get("type") == "function_call")
        assert output["call_id"] == call["call_id"] and call["name"] == "get_time"
        assert "time" in json.loads(output["output"])
        assert types[outputs[0] + 1 :].count("response.create") == 1
        assert types.count("response.create") == 1  # the first response came from server VAD
        assert_all_valid(server)

    records = journal_records(tmp_path)
    user = [r for r in records if r["role"] == "user"]
    assistant = [r for r in records if r["role"] == "assistant"]
    assert [text_of(r) for r in user] == [QUESTION]
    tool_parts = [p for r in assistant for p in r["parts"] if p["type"] == "tool_call"]
    assert [p["name"] for p in tool_parts] == ["get_time"]
    answer = text_of(assistant[-1])
    assert re.fullmatch(r"It is \d\d:\d\d\.", answer), answer

    shown = await history(cfg)
    print(shown)
    assert f"user: {QUESTION}" in shown
    assert f"assistant: {answer}" in shown or f"{answer}" in shown
    assert "get_time" in shown


async def test_journal_survives_kill_9(tmp_path: Path) -> None:
    script = FakeScript(
        user_transcripts=["Turn on the lights.", "And the radio.", "Thanks."],
        reply="Okay, done. Anything else I can do for you today?",
        audio_ms_per_char=15,
    )
    looped = speech_then_silence(tmp_path / "speech.wav")
    async with FakeRealtimeServer(script, api_keys={KEY}) as server:
        over = {"audio": {"input": {"device": f"file:{looped}", "loop": True}}}
        cfg = write_config(tmp_path, daemon_config(tmp_path, server.url, KEY, **over))
        async with Harkd(cfg) as daemon:
            await until(lambda: len(journal_records(tmp_path)) >= 3, 40, "three messages")
            daemon.send_signal(signal.SIGKILL)
            assert await daemon.wait() == -signal.SIGKILL

    raw = (tmp_path / "state" / "transcripts.jsonl").read_bytes()
    complete = raw.split(b"\n")[:-1]
    assert len(complete) >= 3
    records = [json.loads(line) for line in complete]  # every complete line parses
    assert [r["role"] for r in records[:3]] == ["user", "assistant", "user"]
    assert text_of(records[0]) == "Turn on the lights."

    shown = await history(cfg)
    assert "user: Turn on the lights." in shown
    assert "assistant: Okay, done." in shown


# --------------------------------------------------------------------------- SIGHUP


async def test_sighup_applies_live_changes_and_reports_the_rest(
    tmp_path: Path, broker: Mosquitto
) -> None:
    quiet = silent_wav(tmp_path / "quiet.wav")
    async with FakeRealtimeServer(FakeScript(), api_keys={KEY}) as server:
        config = daemon_config(
            tmp_path,
            server.url,
            KEY,
            audio={"input": {"device": f"file:{quiet}"}, "output": {"volume": 80}},
            mqtt=mqtt_on(broker),
        )
        cfg = write_config(tmp_path, config)
        with Recorder(broker, f"{BASE}/#") as rec:
            async with Harkd(cfg) as daemon:
                await daemon.wait_log("harkd ready")
                first = await server.wait_for_client_event("session.update")
                assert first["session"]["instructions"] == "Answer briefly."
                await rec.wait_for(f"{BASE}/volume", lambda m: m.text == "80")

                # Live: instructions reach the open session, volume the speaker (and MQTT).
                config["realtime"]["instructions"] = "Talk like a ship's captain."
                config["audio"]["output"]["volume"] = 40
                write_config(cfg, config)
                mark = len(daemon.lines)
                daemon.send_signal(signal.SIGHUP)
                update = await server.wait_for_client_event("session.update", count=2)
                assert update["session"]["instructions"] == "Talk like a ship's captain."
                line = await daemon.wait_log("SIGHUP: applied", after=mark)
                assert "realtime.instructions" in line and "audio.output.volume" in line
                await rec.wait_for(f"{BASE}/volume", lambda m: m.text == "40")
                assert len(server.sessions) == 1  # no reconnect for a live change

                # Not live: the microphone needs a restart, and the log says so.
                config["audio"]["input"]["device"] = f"file:{DEMO_WAV}"
                write_config(cfg, config)
                mark = len(daemon.lines)
                daemon.send_signal(signal.SIGHUP)
                line = await daemon.wait_log("need a restart", after=mark)
                assert "audio.input.device" in line

                # MQTT settings: a new connection, after the old one said offline and left
                # (one client id: no session takeover, no Last Will, no reconnect fight).
                config["mqtt"]["publish_levels"] = True
                write_config(cfg, config)
                mark = len(daemon.lines)
                rec.clear()
                daemon.send_signal(signal.SIGHUP)
                await daemon.wait_log("SIGHUP: applied mqtt.publish_levels", after=mark)
                await daemon.wait_log("MQTT connected", after=mark)
                await rec.wait_for(f"{BASE}/availability", lambda m: m.text == "online")
                await rec.sync()  # anything the broker still has to say (a Last Will)
                assert [m.text for m in rec.on(f"{BASE}/availability")] == ["offline", "online"]
                assert "already connected" not in broker.log_text()
                assert not any("lost" in line for line in daemon.lines[mark:]), daemon.output

                # Broken: an error naming the problem; the daemon runs on as it was.
                cfg.write_text(cfg.read_text().replace("volume: 40", "volume: loud"))
                mark = len(daemon.lines)
                daemon.send_signal(signal.SIGHUP)
                await daemon.wait_log(r"ERROR .*SIGHUP: config not reloaded", after=mark)
                await daemon.wait_log(
                    rf"{re.escape(str(cfg))}: audio.output.volume: expected an integer",
                    after=mark,
                )
                # It still answers, on the same session (no restart, no reconnect).
                rec.publish(f"{BASE}/cmd/text", "Still there?")
                await rec.wait_for(
                    f"{BASE}/transcript/assistant", lambda m: "Still there?" in m.text
                )
                assert daemon.running
                assert server.sessions[0].connected and len(server.sessions) == 1
                assert rec.last(f"{BASE}/availability").text == "online"  # type: ignore[union-attr]
                assert await daemon.stop() == 0
        assert_all_valid(server)


DOORBELL_PLUGIN = """
from harkd.plugins import reject_unknown_options


def plugin(options, ctx):
    reject_unknown_options(options, {"topic", "announce"})

    def ring(topic, payload, retained):
        if not retained:  # a ring the broker kept is not someone at the door now
            ctx.logger.info("ring on %s", topic)
            ctx.say(options["announce"])

    ctx.subscribe(options["topic"], ring)
    return []
"""
FRONT_DOOR = "home/frontdoor/ring"
BACK_DOOR = "home/backdoor/ring"


async def test_sighup_drops_the_replaced_plugins_subscriptions(
    tmp_path: Path, logged_broker: Mosquitto
) -> None:
    """A doorbell plugin has the assistant announce rings on its MQTT topic. Moved to
    another topic by SIGHUP, it answers the new door only; removed, it answers neither
    (and harkd stops taking the doors' messages); back again on new MQTT settings, it
    answers on the new connection. The daemon stays online on one session throughout."""
    broker = logged_broker
    site = tmp_path / "site"
    install_plugin(site, "doorbell", "harkd_doorbell_test", DOORBELL_PLUGIN)
    front = {"topic": FRONT_DOOR, "announce": "Someone is at the front door."}
    back = {"topic": BACK_DOOR, "announce": "Someone is at the back door."}
    quiet = silent_wav(tmp_path / "quiet.wav")

    def broker_logged(line: str) -> bool:
        return re.search(rf"^\d+: {line}$", broker.log_text(), re.MULTILINE) is not None

    async with FakeRealtimeServer(FakeScript(audio_ms_per_char=5), api_keys={KEY}) as server:

        def announced(door: str) -> int:
            """How many times harkd had the model announce someone at `door`."""
            return sum(
                f"at the {door} door" in part.get("text", "")
                for _, e in server.received
                if e["type"] == "conversation.item.create" and e["item"].get("role") == "system"
                for part in e["item"]["content"]
            )

        config = daemon_config(
            tmp_path,
            server.url,
            KEY,
            audio={"input": {"device": f"file:{quiet}"}},
            mqtt=mqtt_on(broker),
            plugins={"clock": {}, "doorbell": front},
        )
        cfg = write_config(tmp_path, config)
        with Recorder(broker, f"{BASE}/#") as rec:
            async with Harkd(cfg, env=harkd_env(PYTHONPATH=str(site))) as daemon:

                async def reload(applied: str) -> None:
                    write_config(cfg, config)
                    mark = len(daemon.lines)
                    daemon.send_signal(signal.SIGHUP)
                    line = await daemon.wait_log("SIGHUP: applied", after=mark)
                    assert line.endswith(f"SIGHUP: applied {applied}"), line

                await daemon.wait_log("harkd ready")
                assert not any("left out" in line for line in daemon.lines), daemon.output
                # Subscribed before this is published (same connection), and say() needs
                # the session: both are there once the status says connected.
                await rec.wait_for(f"{BASE}/status", lambda m: m.text == "connected")

                # The front door rings: the assistant says so.
                rec.publish(FRONT_DOOR, "ding")
                await until(lambda: announced("front") == 1, 20, "the front door announced")
                await daemon.wait_log(f"ring on {FRONT_DOOR}")

                # Moved to the back door. A ring at the front door, then one at the back:
                # the back one is announced, so the front one (delivered before it, on the
                # same connection) had reached harkd and was left alone.
                config["plugins"]["doorbell"] = back
                await reload("plugins")
                # Rings only reach harkd once the broker has its new subscription.
                await until(lambda: broker_logged(rf"\S+ 1 {BACK_DOOR}"), 20, "subscribed")
                rec.publish(FRONT_DOOR, "ding")
                rec.publish(BACK_DOOR, "ding")
                await until(lambda: announced("back") == 1, 20, "the back door announced")
                assert announced("front") == 1, "the replaced doorbell still hears the front door"

                # Removed: neither door is announced. A question typed afterwards gets its
                # answer, so both rings were behind harkd by then.
                del config["plugins"]["doorbell"]
                await reload("plugins")
                rec.publish(FRONT_DOOR, "ding")
                rec.publish(BACK_DOOR, "ding")
                rec.publish(f"{BASE}/cmd/text", "Is anyone at the door?")
                await rec.wait_for(
                    f"{BASE}/transcript/assistant",
                    lambda m: "Is anyone at the door?" in m.text,
                )
                assert (announced("front"), announced("back")) == (1, 1)
                rings = [line for line in daemon.lines if "ring on" in line]
                assert len(rings) == 2, rings
                # Nor does the broker still send harkd the doors' messages.
                doors_log = [line for line in broker.log_text().splitlines() if "/ring" in line]
                for door in (FRONT_DOOR, BACK_DOOR):
                    assert broker_logged(rf"\S+ {door}"), doors_log  # "<client id> <filter>"

                # Back at the front door, with new MQTT settings: a new connection, which
                # the doorbell's subscription moves to.
                config["plugins"]["doorbell"] = front
                config["mqtt"]["publish_levels"] = True
                rec.clear()
                await reload("mqtt.publish_levels, plugins")
                await rec.wait_for(f"{BASE}/availability", lambda m: m.text == "online")
                rec.publish(FRONT_DOOR, "ding")
                await until(lambda: announced("front") == 2, 20, "the front door announced again")

                # Healthy: online on the broker, on the one session, nothing went wrong.
                assert daemon.running
                retained = await read_retained(broker, f"{BASE}/#")
                assert retained[f"{BASE}/availability"] == b"online"
                assert retained[f"{BASE}/status"] == b"connected"
                assert f"{BASE}/error" not in retained  # cleared (empty) or never set
                assert server.sessions[0].connected and len(server.sessions) == 1
                assert " ERROR " not in daemon.output and "Traceback" not in daemon.output
                assert await daemon.stop() == 0
        assert_all_valid(server)


# --------------------------------------------------------------------------- secrets


async def test_secrets_never_reach_the_logs(tmp_path: Path, auth_broker: Mosquitto) -> None:
    password_file = tmp_path / "mqtt-password"
    password_file.write_text(MQTT_PASSWORD + "\n")
    async with FakeRealtimeServer(clock_script(), api_keys={SECRET_KEY}) as server:
        config = daemon_config(
            tmp_path,
            server.url,
            "${HARKD_TEST_KEY}",
            mqtt=mqtt_on(auth_broker, username=MQTT_USER, password_file=str(password_file)),
            log_level="debug",
        )
        cfg = write_config(tmp_path, config)
        async with Harkd(cfg, env=harkd_env(HARKD_TEST_KEY=SECRET_KEY)) as daemon:
            await until(
                lambda: answered(tmp_path),
                30,
                "a full turn",
            )
            assert await daemon.stop() == 0

    out = daemon.output
    assert " DEBUG " in out  # debug logging really was on
    assert server.sessions[0].authorized  # the key was used ...
    assert re.search(rf"u'{MQTT_USER}'", auth_broker.log_text())  # ... and the password
    assert "tool get_time" in out
    assert SECRET_KEY not in out
    assert MQTT_PASSWORD not in out
    assert SECRET_KEY not in await history(cfg)


# --------------------------------------------------------------------------- plugins


CRASHY_PLUGIN = """
from harkd.tools import Tool


async def _explode(args, call):
    raise RuntimeError("the crashy plugin blew up")


def plugin(options, ctx):
    return [Tool("explode", "Blow something up.", {"type": "object", "properties": {}}, _explode)]
"""


async def test_broken_plugins_are_isolated(tmp_path: Path) -> None:
    """A plugin that is not installed is left out (named in the log); a tool that
    raises answers the model with an error; the daemon is ready and keeps running."""
    install_plugin(tmp_path / "site", "crashy", "harkd_crashy_test", CRASHY_PLUGIN)
    notify = NotifySocket()
    env = harkd_env(NOTIFY_SOCKET=notify.address, PYTHONPATH=str(tmp_path / "site"))
    script = FakeScript(
        user_transcripts=["Please explode the thing.", "What time is it?"],
        tool_rules=[ToolRule(r"explode", "explode"), ToolRule(r"\btime\b", "get_time")],
        tool_reply=lambda outputs: "; ".join(f"{n} said {o}" for n, o in outputs),
        audio_ms_per_char=5,
    )
    looped = speech_then_silence(tmp_path / "speech.wav")
    try:
        async with FakeRealtimeServer(script, api_keys={KEY}) as server:
            over = {
                "audio": {"input": {"device": f"file:{looped}", "loop": True}},
                "plugins": {"clock": {}, "nonexistent": {}, "crashy": {}},
            }
            cfg = write_config(tmp_path, daemon_config(tmp_path, server.url, KEY, **over))
            async with Harkd(cfg, env=env) as daemon:
                await notify.wait_for("READY", "1")
                line = await daemon.wait_log(r"plugins\.nonexistent")
                assert "not installed" in line and "ERROR" in line

                def tool_outputs() -> list[dict[str, Any]]:
                    return [
                        json.loads(e["item"]["output"])
                        for _, e in server.received
                        if e["type"] == "conversation.item.create"
                        and e["item"]["type"] == "function_call_output"
                    ]

                # The second turn's tool works: the session went on after the crash.
                await until(lambda: len(tool_outputs()) >= 2, 40, "two tool results")
                crashed, fine = tool_outputs()[:2]
                assert "blew up" in crashed["error"]
                assert "time" in fine
                await daemon.wait_log(r"tool explode\(.*error")
                assert daemon.running
                assert len(server.sessions) == 1
                assert await daemon.stop() == 0
            assert_all_valid(server)
    finally:
        notify.close()
