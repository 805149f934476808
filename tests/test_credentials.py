"""Secrets from systemd credentials, inside the unit and outside it.

The README's /etc/harkd/config.yaml says `api_key_file: ${CREDENTIALS_DIRECTORY}/...`.
Under the unit systemd sets the variable; an administrator running `harkd
check-config` has no such variable, and harkd then reads /etc/harkd/credentials,
the directory the unit's LoadCredential= lines copy from, and says so in one line.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from harkd import cli, config
from harkd.config import ConfigError, parse_config
from harkd_process import harkd_env, run_harkd, write_config

pytestmark = pytest.mark.timeout(60)

KEY = f"sk-proj-credtest{uuid.uuid4().hex}"
MQTT_PASSWORD = f"mqtt-{uuid.uuid4().hex}"
UNIT = Path(__file__).resolve().parents[1] / "systemd" / "harkd.service"
NOTE = re.compile(r"CREDENTIALS_DIRECTORY is not set .*reading credentials from (\S+), ")

RAW = {
    "realtime": {"api_key_file": "${CREDENTIALS_DIRECTORY}/openai_api_key"},
    "mqtt": {"enabled": False, "password_file": "${CREDENTIALS_DIRECTORY}/mqtt_password"},
}


def _credentials(directory: Path) -> Path:
    directory.mkdir(exist_ok=True)
    (directory / "openai_api_key").write_text(KEY + "\n")
    (directory / "mqtt_password").write_text(MQTT_PASSWORD)
    return directory


@pytest.fixture
def fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for /etc/harkd/credentials holding both secrets."""
    directory = _credentials(tmp_path / "etc-harkd-credentials")
    monkeypatch.setattr(config, "CREDENTIALS_FALLBACK", directory)
    return directory


@pytest.fixture
def root_logging() -> Iterator[None]:
    """cli.main reconfigures the root logger; give pytest's handlers back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _notes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if NOTE.search(r.getMessage())]


def test_the_units_credentials_directory_wins(
    tmp_path: Path, fallback: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (fallback / "openai_api_key").write_text("sk-the-wrong-one-from-etc")
    inside = _credentials(tmp_path / "run-credentials-harkd.service")
    with caplog.at_level(logging.INFO):
        cfg = parse_config(RAW, "config.yaml", {"CREDENTIALS_DIRECTORY": str(inside)})
    assert cfg.realtime.api_key_file == inside / "openai_api_key"
    assert cfg.api_key() == KEY
    assert cfg.mqtt_password() == MQTT_PASSWORD
    assert _notes(caplog) == []


def test_outside_the_unit_the_load_credential_directory_is_read(
    fallback: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        cfg = parse_config(RAW, "config.yaml", {})
    assert cfg.realtime.api_key_file == fallback / "openai_api_key"
    assert cfg.api_key() == KEY
    assert cfg.mqtt_password() == MQTT_PASSWORD
    # Two references, one note, naming the directory and never a secret.
    notes = _notes(caplog)
    assert len(notes) == 1
    match = NOTE.search(notes[0])
    assert match is not None and match.group(1) == str(fallback)
    assert KEY not in caplog.text and MQTT_PASSWORD not in caplog.text


def test_the_fallback_is_where_the_unit_loads_credentials_from() -> None:
    sources = [
        Path(line.split(":", 1)[1].strip())
        for line in UNIT.read_text().splitlines()
        if line.startswith("LoadCredential=")
    ]
    assert sources, "harkd.service has no LoadCredential= line"
    assert {source.parent for source in sources} == {config.CREDENTIALS_FALLBACK}


def test_only_credentials_directory_has_a_fallback(fallback: Path) -> None:
    raw = {**RAW, "mqtt": {"enabled": False, "host": "${HARKD_TEST_BROKER}"}}
    with pytest.raises(ConfigError) as failure:
        parse_config(raw, "config.yaml", {})
    assert failure.value.problems == [
        "mqtt.host: environment variable HARKD_TEST_BROKER is not set"
    ]


def test_no_note_when_the_config_does_not_use_credentials(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO):
        parse_config({"realtime": {"api_key": KEY}, "mqtt": {"enabled": False}}, "c.yaml", {})
    assert _notes(caplog) == []


def test_check_config_as_an_administrator(
    tmp_path: Path,
    fallback: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    root_logging: None,
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    path = write_config(tmp_path, RAW)
    assert cli.main(["check-config", "-c", str(path)]) == cli.EXIT_OK
    out, err = capsys.readouterr()
    assert KEY not in out + err and MQTT_PASSWORD not in out + err
    header, _, body = out.partition("\n")
    assert header == f"# {path}: valid"
    resolved = yaml.safe_load(body)
    assert resolved["realtime"]["api_key_file"] == str(fallback / "openai_api_key")
    assert resolved["mqtt"]["password_file"] == str(fallback / "mqtt_password")
    # The one line saying where the secrets came from, on stderr (stdout stays YAML).
    [note] = err.splitlines()
    assert NOTE.search(note) and str(fallback) in note
    assert " WARNING config: " in note  # logger harkd.config, shown without "harkd."


def test_check_config_names_the_missing_credential_file(tmp_path: Path) -> None:
    # The real fallback, in a subprocess: an administrator on a box where the
    # credentials were never created learns which file is missing and why there.
    if config.CREDENTIALS_FALLBACK.exists():
        pytest.skip(f"{config.CREDENTIALS_FALLBACK} exists on this machine")
    path = write_config(tmp_path, RAW)
    result = run_harkd("check-config", "-c", str(path), env=harkd_env())
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert any(NOTE.search(line) for line in lines), result.stderr
    assert (
        f"{path}: realtime.api_key_file: cannot read "
        f"{config.CREDENTIALS_FALLBACK}/openai_api_key: No such file or directory"
    ) in lines
