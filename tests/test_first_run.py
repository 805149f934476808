"""What a newcomer sees on a first run: nothing that looks like a fault.

`make demo` on a machine without the test dependencies, the end of a successful demo,
and `harkd monitor` / `harkd history` with a config that has no provider key.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harkd_process import harkd_env, run_harkd, write_config
from mosquitto import Mosquitto, Recorder, mosquitto_fixture

broker = mosquitto_fixture()


def test_the_demo_prints_no_warning_or_traceback_without_test_dependencies(
    tmp_path: Path,
) -> None:
    # A user's venv has no `openai` package: make it unimportable for the demo.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['openai'] = None\n")
    home = tmp_path / "home"
    home.mkdir()
    env = harkd_env(HOME=str(home), TMPDIR=str(tmp_path), PYTHONPATH=str(hide))
    result = run_harkd("demo", env=env, cwd=home, timeout_s=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "assistant: It is " in result.stdout  # the demo really ran its turn
    for fault in ("WARNING", "ERROR", "Traceback", "took too long", "restarting"):
        assert fault not in output, output


def test_monitor_needs_only_the_mqtt_section(tmp_path: Path, broker: Mosquitto) -> None:
    # No realtime.api_key anywhere: monitor only reads MQTT.
    config = write_config(
        tmp_path / "config.yaml",
        {"device": {"id": "kitchen"}, "mqtt": {"host": broker.host, "port": broker.port}},
    )
    with Recorder(broker, "harkd/#") as rec:
        rec.publish("harkd/kitchen/status", "connected", retain=True)
        monitor = subprocess.Popen(
            [sys.executable, "-m", "harkd.cli", "monitor", "-c", str(config)],
            env=harkd_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert monitor.stdout is not None
            line = monitor.stdout.readline()  # blocks until the monitor shows something
            assert "connected to" in line or "kitchen" in line, line
            assert monitor.poll() is None  # still running, not refused
        finally:
            monitor.terminate()
            _, stderr = monitor.communicate(timeout=10)
    assert "api_key" not in stderr


def test_a_broken_provider_section_does_not_stop_history(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = write_config(
        tmp_path / "config.yaml",
        {"state_dir": str(state), "realtime": {"api_key_file": str(tmp_path / "missing")}},
    )
    result = run_harkd("history", "-c", str(config), env=harkd_env())
    assert result.returncode == 0, result.stderr
    assert f"no conversations in {state}" in result.stdout


def test_check_config_still_requires_the_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "config.yaml", {"device": {"id": "kitchen"}})
    result = run_harkd("check-config", "-c", str(config), env=harkd_env())
    assert result.returncode == 2
    assert "realtime.api_key: required" in result.stderr
