"""xAI Grok and Azure OpenAI end to end: the daemon's client, built from config through
the registry, against each provider's fake over real websockets.

What a user would notice: a spoken turn is heard and answered, a typed question runs a
tool, an interruption silences the answer where it was heard (and cuts the model's
copy there where the provider can), a dropped connection comes back with the
conversation replayed, a refused key is reported once instead of hammering the
provider. Every message the client sends is one the provider takes.
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from e2e import Running, fake_client, sent_types, until
from harkd import events as ev
from harkd.adapters import registry
from harkd.adapters.azure import AZURE
from harkd.adapters.base import AuthenticationFailed, ConnectionFailed
from harkd.adapters.grok import GROK, grok_session_update
from harkd.adapters.openai import Dialect, OpenAIRealtimeAdapter, encode, openai_realtime
from harkd.adapters.registry import build_adapter, token_source
from harkd.audio.wav import WavInput, WavOutput
from harkd.backoff import Backoff
from harkd.client import RealtimeClient
from harkd.config import RealtimeConfig, parse_config
from harkd.events import SessionSettings
from harkd.messages import (
    MessageFinalized,
    RealtimeError,
    RealtimeMode,
    RealtimeStatus,
    RealtimeToken,
    ToolCallFinished,
)
from harkd.testing import (
    ClientEventInvalid,
    FakeRealtimeServer,
    FakeScript,
    ToolRule,
    validate_client_event,
)
from harkd.testing.fake_dialects import FakeAzureServer, FakeGrokServer
from harkd.testing.xai_validation import validate_grok_event
from harkd.tokens import TokenSource, static_token
from harkd.tools import Tool, ToolCall
from harkd_process import HARKD, Harkd, daemon_config, harkd_env, run_harkd, write_config
from mosquitto import free_port
from speech_fixtures import silence, speech_pcm, write_wav
from test_openai_adapter import COMMANDS

pytestmark = pytest.mark.timeout(60)

KEY = "sk-test-dialects-0123456789"
WRONG_KEY = "sk-test-wrong-9876543210"
SENTENCE = "turn on the kitchen lights"
ANSWER = "The kitchen lights are on now."
LONG_ANSWER = (
    "Sure. I am turning on the kitchen lights now, and while I am at it let me tell you "
    "all about the weather for the rest of the week."
)
FAKES: dict[str, type[FakeRealtimeServer]] = {"grok": FakeGrokServer, "azure": FakeAzureServer}
DIALECTS: dict[str, Dialect] = {"grok": GROK, "azure": AZURE}
PROVIDERS = list(FAKES)


async def get_time(args: dict[str, Any], call: ToolCall) -> dict[str, str]:
    return {"time": "12:34"}


TIME_TOOL = Tool("get_time", "Current time", {"type": "object", "properties": {}}, get_time)


def config_for(server: FakeRealtimeServer, **over: Any) -> RealtimeConfig:
    """The `realtime:` section a user would write for this fake, parsed as harkd does."""
    section = {**server.realtime_config(KEY), **over}
    return parse_config({"realtime": section}, "config.yaml", {}).realtime


def client_for(server: FakeRealtimeServer, **options: Any) -> RealtimeClient:
    """A client whose adapter the registry builds from the provider's config section."""
    rt = config_for(server)
    defaults = {"adapter": build_adapter(rt), "voice": rt.voice, "tools": [TIME_TOOL]}
    return fake_client(server, KEY, **{**defaults, **options})


def assert_provider_took_everything(server: FakeRealtimeServer) -> None:
    """Every client event validates for this provider, and none earned an error (the
    provider's own notice that a session hit its limit is no reply to the client)."""
    validate = validate_grok_event if server.provider == "grok" else validate_client_event
    assert server.received, "nothing was sent"
    for _, event in server.received:
        validate(event)
    replies = [e for e in server.errors_sent if e["error"]["code"] != "session_expired"]
    assert replies == []


def finals(client: RealtimeClient) -> list[MessageFinalized]:
    found: list[MessageFinalized] = []
    client.on_event(lambda e: found.append(e) if isinstance(e, MessageFinalized) else None)
    return found


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """0.5 s of silence, the sentence, 2 s of silence, at 16 kHz."""
    path = tmp_path_factory.mktemp("dialects") / "turn.wav"
    write_wav(path, silence(500) + speech_pcm(SENTENCE) + silence(2000), 16000)
    return path


# --------------------------------------------------------------------------- wire shape


async def test_grok_gets_its_own_flat_session_update() -> None:
    async with FakeGrokServer(api_keys={KEY}) as server:
        client = client_for(server)
        await client.connect()
        try:
            update = next(e for _, e in server.received if e["type"] == "session.update")
            session = update["session"]
            assert "type" not in session and "tool_choice" not in session
            assert session["voice"] == "eve"
            assert session["turn_detection"] == {"type": "server_vad"}
            assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
            assert [t["name"] for t in session["tools"]] == ["get_time"]
            # The fake kept it: its internal view agrees with what was asked.
            config = server.sessions[0].config
            assert config["audio"]["output"]["voice"] == "eve"
            assert config["model"] == "grok-voice-latest"
        finally:
            await client.disconnect()
    assert_provider_took_everything(server)


async def test_grok_manual_turns_are_committed_and_answered(
    speech_wav: Path, tmp_path: Path
) -> None:
    script = FakeScript(user_transcripts=[SENTENCE], reply=ANSWER)
    async with FakeGrokServer(script=script, api_keys={KEY}) as server:
        client = client_for(
            server,
            vad_mode="manual",  # harkd's own VAD decides the turn
            audio_input=WavInput(speech_wav),
            audio_output=WavOutput(tmp_path / "answer.wav"),
        )
        done = finals(client)
        async with Running(client):
            await until(lambda: any(m.message.role == "assistant" for m in done), what="answer")
        [update] = [e for _, e in server.received if e["type"] == "session.update"]
        assert update["session"]["turn_detection"] is None
        session = server.sessions[0]
        assert (session.commits, session.auto_commits) == (1, 0)
        types = sent_types(server)
        assert types[types.index("input_audio_buffer.commit") + 1] == "response.create"
        assert [(m.role, m.text) for m in client.messages] == [
            ("user", SENTENCE),
            ("assistant", ANSWER),
        ]
    assert_provider_took_everything(server)


@pytest.mark.parametrize(
    ("command", "wire_type"),
    COMMANDS,
    ids=[f"{type(c).__name__}-{i}" for i, (c, _) in enumerate(COMMANDS)],
)
def test_grok_traits_match_what_its_wire_takes(command: ev.Command, wire_type: str) -> None:
    """Every neutral command Grok's traits let the session send is a Grok event; the
    one they rule out (truncation) is refused by Grok."""
    event = encode(command)
    if isinstance(command, ev.TruncateItem):
        assert not GROK.traits.can_truncate
        with pytest.raises(ClientEventInvalid):
            validate_grok_event(event)
    else:
        validate_grok_event(event)


@pytest.mark.parametrize("vad_mode", ["server", "manual"])
def test_grok_session_updates_are_grok_events(vad_mode: Any) -> None:
    settings = SessionSettings("Be brief.", "ara", vad_mode=vad_mode, tools=(TIME_TOOL.spec(),))
    validate_grok_event(grok_session_update(settings))
    assert GROK.traits.server_turns and GROK.traits.manual_turns
    with pytest.raises(ValueError, match="semantic"):
        grok_session_update(SessionSettings("Be brief.", "ara", vad_mode="semantic"))


def test_grok_refuses_what_it_does_not_document() -> None:
    truncate = {"type": "conversation.item.truncate", "item_id": "i", "content_index": 0}
    with pytest.raises(ClientEventInvalid, match="Unknown client event type"):
        validate_grok_event({**truncate, "audio_end_ms": 10})
    with pytest.raises(ClientEventInvalid) as caught:
        validate_grok_event({"type": "session.update", "session": {"type": "realtime"}})
    assert caught.value.param == "session.type"
    with pytest.raises(ClientEventInvalid, match="Supported voices"):
        validate_grok_event({"type": "session.update", "session": {"voice": "marin"}})
    semantic = {"type": "session.update", "session": {"turn_detection": {"type": "semantic_vad"}}}
    with pytest.raises(ClientEventInvalid):
        validate_grok_event(semantic)


async def test_azure_takes_the_key_in_api_key_and_refuses_it_as_a_bearer_token() -> None:
    async with FakeAzureServer(api_keys={KEY}) as server:
        adapter = build_adapter(config_for(server))
        settings = SessionSettings(instructions="Be brief.", voice="marin")
        connection = await adapter.connect(RealtimeToken(KEY), settings)
        await connection.close()
        assert server.sessions[0].authorized
        assert server.sessions[0].model == "gpt-realtime"  # the deployment, from ?model=
        # OpenAI's own header on Azure's endpoint is no credential there.
        bearer = openai_realtime("gpt-realtime", server.url)
        with pytest.raises(AuthenticationFailed, match="HTTP 401"):
            await bearer.connect(RealtimeToken(KEY), settings)
        assert [s.authorized for s in server.sessions] == [True, False]


# --------------------------------------------------------------------------- turns


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_spoken_turn_is_heard_and_answered(
    provider: str, speech_wav: Path, tmp_path: Path
) -> None:
    script = FakeScript(user_transcripts=[SENTENCE], reply=ANSWER, audio_ms_per_char=40)
    async with FAKES[provider](script=script, api_keys={KEY}) as server:
        output = WavOutput(tmp_path / "answer.wav")
        client = client_for(server, audio_input=WavInput(speech_wav), audio_output=output)
        done = finals(client)
        async with Running(client):
            await until(
                lambda: any(m.message.role == "assistant" for m in done), what="the answer heard"
            )
            assert [(m.role, m.text) for m in client.messages] == [
                ("user", SENTENCE),
                ("assistant", ANSWER),
            ]
            assert server.sessions[0].auto_commits == 1  # the provider's VAD ended the turn
            answer = client.messages[1]
            assert answer.duration_ms is not None
            assert output.played_ms(answer.id) == answer.duration_ms  # heard to the end
        assert_provider_took_everything(server)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_text_turn_runs_a_tool_and_answers_with_its_result(provider: str) -> None:
    script = FakeScript(tool_rules=[ToolRule(r"\btime\b", "get_time")])
    async with FAKES[provider](script=script, api_keys={KEY}) as server:
        calls: list[ToolCallFinished] = []
        client = client_for(server)
        client.on_event(lambda e: calls.append(e) if isinstance(e, ToolCallFinished) else None)
        await client.connect()
        try:
            client.send_text("what time is it?")
            await until(
                lambda: any("12:34" in (m.text or "") for m in client.messages[1:]),
                what="the answer with the tool's result",
            )
            assert [(c.name, c.output) for c in calls] == [("get_time", {"time": "12:34"})]
            types = sent_types(server)
            last_output = len(types) - 1 - types[::-1].index("conversation.item.create")
            assert types[last_output + 1 :] == ["response.create"]  # one answer for the output
        finally:
            await client.disconnect()
        assert_provider_took_everything(server)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_interrupt_silences_the_answer_where_it_was_heard(
    provider: str, speech_wav: Path, tmp_path: Path
) -> None:
    script = FakeScript(
        user_transcripts=[SENTENCE], reply=LONG_ANSWER, audio_ms_per_char=50, pace=2.0
    )
    async with FAKES[provider](script=script, api_keys={KEY}) as server:
        output = WavOutput(tmp_path / "answer.wav")
        client = client_for(server, audio_input=WavInput(speech_wav), audio_output=output)
        async with Running(client):
            await until(lambda: client.mode is RealtimeMode.SPEAKING, what="speaking")
            item_id = client.messages[-1].id
            await until(lambda: output.played_ms(item_id) >= 700, what="700 ms heard")
            heard = output.played_ms(item_id)
            client.interrupt()
            assert client.mode is RealtimeMode.LISTENING and not output.is_playing

            session = server.sessions[0]
            # Still streaming (6 s of answer at twice real time): the client cancels it.
            await until(lambda: len(session.responses) == 1, what="response.done")
            assert session.responses[0]["status"] == "cancelled"
            assert sent_types(server).count("response.cancel") == 1
            answer = next(m for m in client.messages if m.id == item_id)
            assert answer.interrupted
            assert answer.duration_ms is not None and 0 <= answer.duration_ms - heard <= 100
            if provider == "azure":
                await until(lambda: len(session.truncations) == 1, what="truncate")
                assert session.truncations[0]["audio_end_ms"] == answer.duration_ms
            else:
                # Grok cannot truncate: harkd never asks it to.
                assert "conversation.item.truncate" not in sent_types(server)
        assert_provider_took_everything(server)


# --------------------------------------------------------------------------- failures


ANSWER_BANANA = "You said: remember the word banana"


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_drop_reconnects_and_replays_the_conversation(provider: str) -> None:
    async with FAKES[provider](api_keys={KEY}) as server:
        statuses: list[RealtimeStatus] = []
        client = client_for(server, on_status_change=statuses.append)
        await client.connect()
        try:
            client.send_text("remember the word banana")
            # The whole answer (its message appears with the first words of it).
            await until(
                lambda: [m.text for m in client.messages][1:] == [ANSWER_BANANA],
                what="the first answer",
            )
            await server.drop_all()
            await until(lambda: len(server.sessions) == 2, what="a second session")
            await until(lambda: client.status is RealtimeStatus.CONNECTED, what="reconnected")
            assert RealtimeStatus.RECONNECTING in statuses
            await until(lambda: len(server.sessions[1].items) >= 2, what="the replay")
            replayed = [
                e["item"]["content"][0]["text"]
                for i, e in server.received
                if i == 1 and e["type"] == "conversation.item.create"
            ]
            assert replayed == ["remember the word banana", ANSWER_BANANA]
            # And the conversation goes on on the new connection.
            client.send_text("and now?")
            await until(lambda: len(client.messages) == 4, what="an answer after the drop")
        finally:
            await client.disconnect()
        assert_provider_took_everything(server)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_providers_session_limit_moves_to_a_new_session(provider: str) -> None:
    async with FAKES[provider](api_keys={KEY}, max_session_s=0.5) as server:
        client = client_for(server, reconnect=Backoff(5, 10))  # so no backoff is waited
        await client.connect()
        try:
            client.send_text("remember the word banana")
            await until(lambda: len(server.sessions) >= 2, what="a new session at once")
            await until(lambda: client.status is RealtimeStatus.CONNECTED, what="reconnected")
            await until(
                lambda: "conversation.item.create" in sent_types(server, 1),
                what="the conversation replayed",
            )
        finally:
            await client.disconnect()
        assert_provider_took_everything(server)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_refused_key_is_reported_without_a_hot_loop(provider: str) -> None:
    async with FAKES[provider](api_keys={KEY}) as server:
        attempts: list[str] = []

        def counted(label: str, key: str) -> TokenSource:
            inner = static_token(key)

            async def get_token() -> RealtimeToken:
                attempts.append(label)
                return await inner()

            return get_token

        refused = client_for(server, get_token=counted("refused", WRONG_KEY))
        # A yardstick instead of a sleep: a client on the same backoff that cannot
        # connect at all. Its retries show the refused one had time to retry.
        elsewhere = f"ws://127.0.0.1:{free_port()}{server.realtime_path}"
        unreachable = client_for(
            server,
            get_token=counted("unreachable", KEY),
            adapter=OpenAIRealtimeAdapter("m", elsewhere, dialect=DIALECTS[provider]),
        )
        tasks = [asyncio.create_task(c.run()) for c in (refused, unreachable)]
        try:
            await until(lambda: refused.status is RealtimeStatus.ERROR, what="the error")
            await until(lambda: attempts.count("unreachable") >= 6, what="6 attempts elsewhere")
            assert attempts.count("refused") == 1
            assert [s.authorized for s in server.sessions] == [False]
            assert refused.error is not None and refused.error.code == "invalid_api_key"
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_ephemeral_secrets_are_minted_with_the_key_and_connect(provider: str) -> None:
    async with FAKES[provider](api_keys={KEY}) as server:
        rt = config_for(server, ephemeral_tokens=server.http_url)
        client = client_for(server, get_token=token_source(rt, KEY))
        await client.connect()
        try:
            [secret] = server.secrets
            assert secret.startswith("ek_")  # the websocket got a secret, not the key
            assert server.sessions[0].authorized
        finally:
            await client.disconnect()
        assert_provider_took_everything(server)


def post_json(url: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        method="POST",
        headers={**headers, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


async def test_xai_mints_secrets_from_a_lifetime_alone() -> None:
    async with FakeGrokServer(api_keys={KEY}) as server:
        url = f"{server.http_url}/v1/realtime/client_secrets"
        auth = {"Authorization": f"Bearer {KEY}"}
        openai_shaped = {
            "expires_after": {"anchor": "created_at", "seconds": 300},
            "session": {"type": "realtime", "model": "grok-voice-latest"},
        }
        status, _ = await asyncio.to_thread(post_json, url, openai_shaped, auth)
        assert status == 400  # xAI takes no session and no anchor
        status, reply = await asyncio.to_thread(
            post_json, url, {"expires_after": {"seconds": 300}}, auth
        )
        assert status == 200 and set(reply) == {"value", "expires_at"}


async def test_a_bad_key_cannot_mint_secrets() -> None:
    async with FakeAzureServer(api_keys={KEY}) as server:
        rt = config_for(server, ephemeral_tokens=server.http_url)
        client = client_for(server, get_token=token_source(rt, WRONG_KEY))
        with pytest.raises(RealtimeError, match="HTTP 401") as caught:
            await client.connect()
        assert caught.value.code == "invalid_api_key"
        client.destroy()
        assert server.sessions == []  # refused before any connection


async def test_an_unreachable_azure_resource_is_a_connection_failure() -> None:
    adapter = build_adapter(
        parse_config(
            {
                "realtime": {
                    "provider": "azure",
                    "api_key": KEY,
                    "url": f"ws://127.0.0.1:{free_port()}/openai/v1/realtime",
                }
            },
            "config.yaml",
            {},
        ).realtime
    )
    with pytest.raises(ConnectionFailed) as caught:
        await adapter.connect(RealtimeToken(KEY), SessionSettings("hi", "marin"))
    assert not isinstance(caught.value, AuthenticationFailed)


# --------------------------------------------------------------------------- secrets

# Keys shaped like the providers' own: an xAI key, an Azure key (32 hex digits, no
# prefix for a pattern to catch: only the registered secret masks it).
PROVIDER_KEYS = {"grok": f"xai-{uuid.uuid4().hex}{uuid.uuid4().hex}", "azure": uuid.uuid4().hex}


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_key_never_reaches_the_log_even_at_debug_level(
    provider: str, tmp_path: Path
) -> None:
    key = PROVIDER_KEYS[provider]
    script = FakeScript(user_transcripts=["What time is it?"], tool_rules=[])
    async with FAKES[provider](script=script, api_keys={key}) as server:
        realtime = {**server.realtime_config(key), "api_key": "${TEST_PROVIDER_KEY}"}
        data = daemon_config(tmp_path, server.url, key, log_level="debug")
        config = write_config(tmp_path, {**data, "realtime": {**data["realtime"], **realtime}})
        env = harkd_env(TEST_PROVIDER_KEY=key)
        async with Harkd(config, env=env) as daemon:
            # Connected, configured, heard and answered: the handshake (with the key in
            # its headers) and the whole conversation were logged at debug level.
            await daemon.wait_log("response.done")
            assert await daemon.stop() == 0
        assert server.sessions[0].authorized
        assert "Authorization" in daemon.output or "api-key" in daemon.output
        assert key not in daemon.output

        checked = run_harkd("check-config", "-c", str(config), env=env)
        assert checked.returncode == 0, checked.stderr
        assert f"provider: {provider}" in checked.stdout
        assert key not in checked.stdout + checked.stderr


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("provider", PROVIDERS)
def test_demo_runs_a_turn_against_the_providers_fake(provider: str, tmp_path: Path) -> None:
    env = harkd_env(HOME=str(tmp_path), TMPDIR=str(tmp_path))
    result = run_harkd("demo", "--provider", provider, env=env, cwd=tmp_path, timeout_s=50)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line.split("] ", 1)[-1] for line in result.stdout.splitlines()]
    assert f"  provider    {provider} (fake)" in lines
    assert "you: What time is it?" in lines
    assert any(line.startswith("tool: get_time") for line in lines)
    assert any(line.startswith("assistant: It is ") for line in lines)
    assert "Traceback" not in result.stderr


def test_demo_of_an_unknown_provider_names_the_known_ones(tmp_path: Path) -> None:
    result = run_harkd("demo", "--provider", "nope", cwd=tmp_path)
    assert result.returncode == 2
    known = ", ".join(sorted(registry.provider_names()))
    assert f"unknown provider 'nope' (known: {known})" in result.stdout + result.stderr
    assert {"azure", "grok", "openai"} <= set(registry.provider_names())


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_fake_server_serves_the_providers_protocol(provider: str) -> None:
    server = await asyncio.create_subprocess_exec(
        *HARKD,
        "fake-server",
        "--provider",
        provider,
        "--port",
        "0",
        "--api-key",
        KEY,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=harkd_env(),
    )
    try:
        assert server.stdout is not None
        line = (await asyncio.wait_for(server.stdout.readline(), 30)).decode()
        prefix = "fake realtime server: "
        assert line.startswith(prefix), line
        url = line.removeprefix(prefix).strip()
        path = FAKES[provider].realtime_path
        assert url.startswith("ws://127.0.0.1:") and url.endswith(path)
        # A client of this provider talks to it: the protocol, not only the port.
        rt = parse_config(
            {"realtime": {"provider": provider, "url": url, "api_key": KEY}}, "config.yaml", {}
        ).realtime
        settings = SessionSettings("Be brief.", rt.voice or "")
        connection = await build_adapter(rt).connect(RealtimeToken(KEY), settings)
        await connection.close()
    finally:
        server.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(server.wait(), 30) == 0
