"""Log output format (journald or plain) and secret redaction."""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from harkd.logsetup import SecretRedactor, configure_logging, redact, register_secret

SECRET = "hunter2-very-secret-value"


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """configure_logging owns the root logger; give pytest's handlers back afterwards."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    websockets_level = logging.getLogger("websockets").level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("websockets").setLevel(websockets_level)


def _log_everything(logger: logging.Logger) -> None:
    logger.debug("debug %s", "d")
    logger.info("info")
    logger.warning("warning")
    logger.error("error")
    logger.critical("critical")


def test_journald_prefixes_when_stderr_is_the_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "journal").open("w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        configure_logging("debug", stream)
        logger = logging.getLogger("harkd.test")
        _log_everything(logger)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("tool failed")
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines[:5] == [
        "<7>test: debug d",
        "<6>test: info",
        "<4>test: warning",
        "<3>test: error",
        "<3>test: critical",
    ]
    # journald splits at newlines: each traceback line needs its own priority.
    assert lines[5] == "<3>test: tool failed"
    assert lines[6] == "<3>Traceback (most recent call last):"
    assert lines[-1] == "<3>ValueError: boom"
    assert all(line.startswith("<3>") for line in lines[5:])


def test_plain_format_without_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    configure_logging("info", stream)
    _log_everything(logging.getLogger("harkd.test"))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4  # debug is below the level
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO test: info", lines[0])
    assert lines[3].endswith(" CRITICAL test: critical")


def test_journal_stream_of_another_file_means_plain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Inside a unit, but with stderr redirected (a pipe, a file): no prefixes.
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    with (tmp_path / "redirected").open("w+") as stream:
        configure_logging("info", stream)
        logging.getLogger("x").info("hello")
        stream.seek(0)
        assert not stream.read().startswith("<")


def test_journal_lines_do_not_look_like_unit_names() -> None:
    # journalctl -u harkd shows systemd's own "harkd.service: Main process exited";
    # the daemon's logger harkd.service must not be mistaken for it.
    stream = io.StringIO()
    configure_logging("info", stream, journald=True)
    logging.getLogger("harkd.service").info("harkd ready (device kitchen)")
    logging.getLogger("harkd.plugin.timers").info("timer set")
    logging.getLogger("harkd_plugins.clock").info("clock loaded")
    logging.getLogger("websockets.client").warning("connection closed")
    assert stream.getvalue().splitlines() == [
        "<6>service: harkd ready (device kitchen)",
        "<6>plugin.timers: timer set",
        "<6>harkd_plugins.clock: clock loaded",
        "<4>websockets.client: connection closed",
    ]


def test_the_short_name_is_only_for_display() -> None:
    # Another handler on the same logger (e.g. forwarding elsewhere) gets the real name.
    names: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            names.append(record.name)

    stream = io.StringIO()
    configure_logging("info", stream, journald=True)
    collect = Collect()
    logging.getLogger().addHandler(collect)
    try:
        logging.getLogger("harkd.mqtt").info("connected")
    finally:
        logging.getLogger().removeHandler(collect)
    assert stream.getvalue() == "<6>mqtt: connected\n"
    assert names == ["harkd.mqtt"]


def test_journald_can_be_forced() -> None:
    stream = io.StringIO()
    configure_logging("warning", stream, journald=True)
    logging.getLogger("x").warning("careful")
    assert stream.getvalue() == "<4>x: careful\n"


def test_single_root_handler_and_noisy_libraries() -> None:
    configure_logging("info", io.StringIO())
    configure_logging("info", io.StringIO())
    assert len(logging.getLogger().handlers) == 1
    assert logging.getLogger("websockets").level == logging.WARNING
    configure_logging("debug", io.StringIO())
    assert logging.getLogger("websockets").getEffectiveLevel() == logging.DEBUG
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("loud", io.StringIO())


def test_registered_secrets_never_reach_the_log() -> None:
    register_secret(SECRET + "\n")  # as read from a credentials file
    stream = io.StringIO()
    configure_logging("debug", stream)
    logger = logging.getLogger("harkd.test")
    logger.info("key is " + SECRET)
    logger.info("config %s", {"api_key_file": "/run/x", "value": SECRET})
    logger.debug("%r", SECRET.encode())
    try:
        try:
            raise KeyError(SECRET)
        except KeyError as exc:
            raise RuntimeError(f"auth failed with {SECRET}") from exc
    except RuntimeError:
        logger.exception("connect failed")
    logger.warning("stack", stack_info=True, extra={"k": SECRET})
    output = stream.getvalue()
    assert SECRET not in output
    assert output.count("***") == 5
    assert "Traceback (most recent call last):" in output
    assert "RuntimeError: auth failed with ***" in output


def test_patterns_are_redacted_without_registration() -> None:
    cases = {
        "key sk-proj-AbCdEf0123456789_xyz-Q rejected": "key sk-*** rejected",
        "ephemeral ek_68a1b2c3d4e5f60718293a4b5c6d": "ephemeral ek_***",
        "Authorization: Bearer eyJhbGciOiJI.UzI1NiJ9.sig-nature": "Authorization: Bearer ***",
        "wss://api.example/v1?model=m&api_key=abc123xyz&x=1": "wss://api.example/v1?model=m&api_key=***&x=1",
        "GET /cb?password=p%40ss#frag": "GET /cb?password=***#frag",
        "mqtt://harkd:s3cr3t!@broker:1883/x": "mqtt://harkd:***@broker:1883/x",
        '{"password": "hunter2", "host": "h"}': '{"password": "***", "host": "h"}',
        "input_tokens: 512, output_tokens: 40": "input_tokens: 512, output_tokens: 40",
        "http://host:8080/path?q=a@b": "http://host:8080/path?q=a@b",
        "risk-assessment of the task-scheduler": "risk-assessment of the task-scheduler",
    }
    for text, expected in cases.items():
        assert redact(text) == expected


def test_short_values_are_not_registered_and_encoded_forms_are() -> None:
    redactor = SecretRedactor()
    redactor.register_secret("abc")
    assert redactor("abc def") == "abc def"
    redactor.register_secret("p@ss/w0rd!")
    assert redactor("raw p@ss/w0rd! url p%40ss%2Fw0rd%21") == "raw *** url ***"


def test_redactor_as_a_filter_on_another_handler() -> None:
    redactor = SecretRedactor()
    redactor.register_secret(SECRET)
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    handler.addFilter(redactor)
    logger = logging.getLogger("harkd.test.filter")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.info("token %s", SECRET)
        try:
            raise ValueError(SECRET)
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
    assert [r.getMessage() for r in records] == ["token ***", "failed"]
    assert records[1].exc_text is not None
    assert "ValueError: ***" in records[1].exc_text
    assert SECRET not in logging.Formatter().format(records[1])
