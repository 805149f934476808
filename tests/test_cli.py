"""The `harkd` command line as a user runs it: a subprocess, a config file, exit codes.

check-config (resolved config, secrets redacted, errors naming file and YAML path,
-c / $HARKD_CONFIG / ./config.yaml precedence), demo on a fresh machine, plugins,
devices without a sound card.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from harkd_process import harkd_env, run_harkd, write_config

pytestmark = pytest.mark.timeout(60)

KEY = f"sk-proj-clitest{uuid.uuid4().hex}"


def _config(**over: object) -> dict[str, object]:
    base: dict[str, object] = {
        "device": {"id": "kitchen", "name": "Kitchen voice"},
        "realtime": {"api_key": "${HARKD_TEST_KEY}"},
        "audio": {"input": {"device": "default", "rate": 16000}},
        "mqtt": {"enabled": False},
    }
    base.update(over)
    return base


def test_check_config_prints_the_resolved_config_with_the_key_redacted(tmp_path: Path) -> None:
    path = write_config(tmp_path, _config())
    result = run_harkd("check-config", "-c", str(path), env=harkd_env(HARKD_TEST_KEY=KEY))

    assert result.returncode == 0, result.stderr
    assert KEY not in result.stdout + result.stderr
    header, _, body = result.stdout.partition("\n")
    assert str(path) in header and "valid" in header
    resolved = yaml.safe_load(body)
    assert resolved["realtime"]["api_key"] == "***"
    # Resolved: defaults filled in for what the file leaves out.
    assert resolved["audio"]["output"]["volume"] == 100
    assert resolved["realtime"]["turn_detection"] == "server_vad"
    assert resolved["device"]["id"] == "kitchen"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"audio": {"input": {"rate": "fast"}}},
            "audio.input.rate: expected an integer, got 'fast'",
        ),
        ({"audio": {"inptu": {"device": "default"}}}, "audio.inptu: unknown key"),
        ({"audio": {"output": {"volume": 150}}}, "audio.output.volume: must be at most 100"),
        (
            {"realtime": {"api_key": "${HARKD_UNSET_VAR_FOR_TEST}"}},
            "realtime.api_key: environment variable HARKD_UNSET_VAR_FOR_TEST is not set",
        ),
        (
            {"realtime": {"api_key_file": "/nonexistent/harkd/openai.key"}},
            "realtime.api_key_file: cannot read /nonexistent/harkd/openai.key",
        ),
        (
            {"mqtt": {"tls": {"ca_certs": "/nonexistent/harkd/ca.pem"}}},
            "mqtt.tls.ca_certs: cannot read /nonexistent/harkd/ca.pem",
        ),
    ],
    ids=[
        "not-an-integer",
        "unknown-key",
        "out-of-range",
        "unset-variable",
        "missing-key-file",
        "missing-ca-file",
    ],
)
def test_check_config_rejects_a_bad_config_naming_file_and_path(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    path = write_config(tmp_path, _config(**change))
    result = run_harkd("check-config", "-c", str(path), env=harkd_env(HARKD_TEST_KEY=KEY))

    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{path}: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert KEY not in result.stdout + result.stderr


def test_config_file_precedence(tmp_path: Path) -> None:
    """-c wins over $HARKD_CONFIG, which wins over ./config.yaml."""
    env_cfg = write_config(tmp_path / "env.yaml", _config(device={"id": "from-env"}))
    flag_cfg = write_config(tmp_path / "flag.yaml", _config(device={"id": "from-flag"}))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    write_config(workdir, _config(device={"id": "from-cwd"}))

    def device_id(*args: str, **env: str) -> str:
        result = run_harkd(
            "check-config", *args, env=harkd_env(HARKD_TEST_KEY=KEY, **env), cwd=workdir
        )
        assert result.returncode == 0, result.stderr
        return str(yaml.safe_load(result.stdout)["device"]["id"])

    assert device_id("-c", str(flag_cfg), HARKD_CONFIG=str(env_cfg)) == "from-flag"
    assert device_id(HARKD_CONFIG=str(env_cfg)) == "from-env"
    assert device_id() == "from-cwd"
    # A broken $HARKD_CONFIG does not matter when -c names a good file ...
    broken = tmp_path / "broken.yaml"
    broken.write_text("audio: [not, a, mapping\n")
    assert device_id("-c", str(flag_cfg), HARKD_CONFIG=str(broken)) == "from-flag"
    # ... and is reported, by name, when it is the one used.
    result = run_harkd("check-config", env=harkd_env(HARKD_CONFIG=str(broken)), cwd=workdir)
    assert result.returncode == 2
    assert f"{broken}: not valid YAML" in result.stderr


def test_demo_runs_a_full_turn_on_a_fresh_machine(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env = harkd_env(HOME=str(home), TMPDIR=str(tmp_path))
    result = run_harkd("demo", env=env, cwd=home, timeout_s=40)
    out = result.stdout
    print(out)

    assert result.returncode == 0, out + result.stderr
    lines = [line.split("] ", 1)[-1] for line in out.splitlines()]
    assert "you: What time is it?" in lines
    tool = next(line for line in lines if line.startswith("tool: get_time"))
    assert '"time"' in tool
    answer = next(line for line in lines if line.startswith("assistant:"))
    assert answer.startswith("assistant: It is ")
    order = [lines.index(line) for line in ("you: What time is it?", tool, answer)]
    assert order == sorted(order)
    assert "Traceback" not in result.stderr
    assert "answer audio:" in out


def test_the_wake_demo_shows_nothing_leaves_before_the_wake_word(tmp_path: Path) -> None:
    env = harkd_env(HOME=str(tmp_path), TMPDIR=str(tmp_path))
    result = run_harkd("demo", "--wake", env=env, cwd=tmp_path, timeout_s=40)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    lines = [line.split("] ", 1)[-1] for line in out.splitlines()]
    wake = next(line for line in lines if line.startswith("wake word: okay_nabu"))
    assert wake.endswith("audio the provider had received before it: 0 ms")
    privacy = next(line for line in lines if line.startswith("privacy:"))
    assert privacy.startswith("privacy: 0 ms of audio reached the provider before the wake word")
    # What was said after it was heard and answered.
    assert lines.index(wake) < lines.index("you: What time is it?")
    assert any(line.startswith("assistant: It is ") for line in lines)


def test_demo_names_the_known_providers_for_an_unknown_one(tmp_path: Path) -> None:
    result = run_harkd(
        "demo", "--provider", "nope", env=harkd_env(HOME=str(tmp_path)), cwd=tmp_path
    )
    assert result.returncode == 2
    assert "unknown provider 'nope' (known: " in result.stderr and "openai" in result.stderr


def test_plugins_lists_the_builtin_plugins_with_schemas(tmp_path: Path) -> None:
    data = _config(plugins={"clock": {}, "timers": {}, "mqtt": {"allow": ["zigbee2mqtt/+/set"]}})
    data["mqtt"] = {"enabled": True}
    path = write_config(tmp_path, data)
    result = run_harkd("plugins", "-c", str(path), env=harkd_env(HARKD_TEST_KEY=KEY))

    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in ("clock", "timers", "mqtt"):
        assert f"{name} (enabled)" in out
    for tool in ("get_time", "mqtt_publish", "mqtt_read_state"):
        assert f"tool {tool} " in out
    assert any("timer" in line for line in out.splitlines() if line.startswith("  tool "))
    assert '"type": "object"' in out and '"properties"' in out
    assert "problem" not in out
    assert KEY not in out + result.stderr


def test_devices_without_a_sound_card(tmp_path: Path) -> None:
    result = run_harkd("devices", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Capture" in out and "Playback" in out
    assert "file:PATH.wav" in out  # tells the user what else to put in the config
    assert "Traceback" not in result.stderr


def test_no_command_is_a_usage_error() -> None:
    result = run_harkd()
    assert result.returncode == 2
    assert "usage: harkd" in result.stderr


def test_history_finds_the_journal_where_run_writes_it(tmp_path: Path) -> None:
    """`${NAME}` in state_dir resolves as for `harkd run`; the API key is not needed."""
    config = _config(state_dir="${HARKD_TEST_STATE}/state")
    config["realtime"] = {"api_key": "${OPENAI_API_KEY}"}  # unset: history must not care
    path = write_config(tmp_path, config)
    env = harkd_env(HARKD_TEST_STATE=str(tmp_path))

    empty = run_harkd("history", "-c", str(path), env=env)
    assert empty.returncode == 0, empty.stderr
    assert f"no conversations in {tmp_path}/state/transcripts.jsonl" in empty.stdout

    (tmp_path / "state").mkdir()
    record = {
        "id": "item_1",
        "role": "user",
        "timestamp": 1_800_000_000.0,
        "parts": [{"type": "audio", "transcript": "Is the oven off?", "duration_ms": 900}],
        "interrupted": False,
        "session": "s1",
    }
    (tmp_path / "state" / "transcripts.jsonl").write_text(json.dumps(record) + "\n")
    shown = run_harkd("history", "-c", str(path), env=env)
    assert shown.returncode == 0, shown.stderr
    assert "user: Is the oven off?" in shown.stdout


def test_fake_server_takes_its_own_options() -> None:
    server = subprocess.Popen(
        [sys.executable, "-m", "harkd.cli", "fake-server", "--port", "0", "--api-key", "sk-k"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.startswith("fake realtime server: ws://127.0.0.1:")
        assert not line.rstrip().endswith(":0/v1/realtime")
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=30) == 0
