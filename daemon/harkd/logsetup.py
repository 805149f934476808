"""Logging for the entry point: journald-aware output and secret redaction.

Only the CLI calls :func:`configure_logging`; library modules just use
``logging.getLogger(__name__)``. Secrets are kept out of logs in two ways:
values registered with :func:`register_secret` (API keys, passwords read from
config or credentials) and patterns that look like credentials.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
from typing import TextIO
from urllib.parse import quote

__all__ = [
    "RedactingFormatter",
    "SecretRedactor",
    "configure_logging",
    "redact",
    "register_secret",
]

_MASK = "***"
_OWN_PREFIX = "harkd."  # logger names of the daemon's modules: harkd.service, harkd.plugin.x
_MIN_SECRET_LEN = 6  # shorter values would mask ordinary words all over the log

# Shapes of credentials that must not reach a log even if nobody registered them.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # OpenAI API keys (sk-..., sk-proj-...) and ephemeral client secrets (ek_...).
    (re.compile(r"\b(sk-|ek_)[A-Za-z0-9_-]{8,}"), rf"\g<1>{_MASK}"),
    # Google API keys (Gemini): "AIza" and 35 more characters.
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}"), _MASK),
    (re.compile(r"\b(Bearer)\s+[A-Za-z0-9._~+/=-]+", re.IGNORECASE), rf"\g<1> {_MASK}"),
    # user:password@ in URLs (mqtt://user:pw@host, https://...).
    (re.compile(r"\b([a-z][a-z0-9+.-]*://[^/\s:@]+):[^/\s@]+@", re.IGNORECASE), rf"\g<1>:{_MASK}@"),
    # key=value in query strings and key: value / "key": "value" in text and JSON.
    (
        re.compile(
            r"\b(password|passwd|pwd|api[_-]?key|access[_-]?token|token|secret|client[_-]?secret)"
            r"""(["']?\s*[:=]\s*["']?)[^\s&#"',;}]+""",
            re.IGNORECASE,
        ),
        rf"\g<1>\g<2>{_MASK}",
    ),
)


class SecretRedactor(logging.Filter):
    """Replaces registered secrets and credential-like text with ``***``.

    Call it as a function (``redactor(text)`` or :meth:`redact`), or add it as a
    filter to any extra handler (for example one forwarding logs elsewhere): the
    filter rewrites the record's message, arguments, traceback and stack text.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: set[str] = set()
        self._secret_re: re.Pattern[str] | None = None

    def register_secret(self, value: str) -> None:
        """Mask ``value`` (and its URL-encoded form) from now on.

        Surrounding whitespace is ignored; values shorter than 6 characters are
        not registered, as masking them would garble ordinary text.
        """
        value = value.strip()
        if len(value) < _MIN_SECRET_LEN:
            return
        with self._lock:
            self._secrets.update({value, quote(value, safe="")})
            # Longest first, so a secret containing another is masked whole.
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._secret_re = re.compile("|".join(map(re.escape, ordered)))

    def redact(self, text: str) -> str:
        """Return ``text`` with secrets and credential-like substrings masked."""
        secret_re = self._secret_re
        if secret_re is not None:
            text = secret_re.sub(_MASK, text)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    __call__ = redact

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact ``record`` in place; never drops it."""
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


_redactor = SecretRedactor()


def register_secret(value: str) -> None:
    """Register a secret with the process-wide redactor used by the log output."""
    _redactor.register_secret(value)


def redact(text: str) -> str:
    """Mask secrets in ``text`` with the process-wide redactor."""
    return _redactor.redact(text)


class RedactingFormatter(logging.Formatter):
    """Formats a record, then redacts the whole result, traceback included.

    With ``journald`` each line gets a ``<N>`` syslog priority prefix instead of
    a timestamp (journald stamps entries itself and splits them at newlines, so
    every traceback line carries the priority too).

    The daemon's own loggers are shown without their ``harkd.`` prefix
    (``service: harkd ready``): in the journal ``harkd.service:`` reads like a
    message from systemd about the unit. Other loggers keep their full name.
    """

    def __init__(self, *, journald: bool, redactor: SecretRedactor | None = None) -> None:
        fmt = (
            "%(name)s: %(message)s"
            if journald
            else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        super().__init__(fmt)
        self.journald = journald
        self.redactor = redactor or _redactor

    def formatMessage(self, record: logging.LogRecord) -> str:
        """Format ``record`` with the ``harkd.`` logger prefix dropped."""
        if record.name.startswith(_OWN_PREFIX):
            # A copy: other handlers (and filters) still see the real logger name.
            short = record.name.removeprefix(_OWN_PREFIX)
            record = logging.makeLogRecord({**record.__dict__, "name": short})
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        """Format and redact ``record``."""
        text = self.redactor.redact(super().format(record))
        if not self.journald:
            return text
        prefix = _syslog_prefix(record.levelno)
        return "\n".join(prefix + line for line in text.split("\n"))


def _syslog_prefix(levelno: int) -> str:
    if levelno >= logging.ERROR:
        return "<3>"
    if levelno >= logging.WARNING:
        return "<4>"
    if levelno >= logging.INFO:
        return "<6>"
    return "<7>"


def _connected_to_journal(stream: TextIO) -> bool:
    # systemd.exec(5): $JOURNAL_STREAM is "device:inode" of the journal stream;
    # compare it with the stream so output redirected elsewhere (a pipe, a file)
    # from inside a unit gets plain timestamps.
    expected = os.environ.get("JOURNAL_STREAM")
    if not expected:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def configure_logging(
    level: str, stream: TextIO | None = None, *, journald: bool | None = None
) -> None:
    """Install the one root handler writing redacted records to ``stream``.

    ``stream`` defaults to ``sys.stderr`` as it is at call time.

    ``level`` is a level name (``debug``, ``info``, ``warning``, ``error``).
    ``journald=None`` detects whether ``stream`` is the journal via
    ``$JOURNAL_STREAM``. Replaces handlers installed earlier, so calling it again
    (e.g. after the config is read) just reconfigures.
    """
    levelno = logging.getLevelNamesMapping().get(level.upper())
    if levelno is None:
        raise ValueError(f"unknown log level {level!r}")
    if stream is None:
        stream = sys.stderr
    if journald is None:
        journald = _connected_to_journal(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter(journald=journald))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(levelno)
    # websockets logs every frame at debug (base64 audio), and the MCP client's HTTP
    # library every request at info: only worth it when debugging.
    for chatty in ("websockets", "httpx2", "httpcore2"):
        logging.getLogger(chatty).setLevel(
            logging.NOTSET if levelno <= logging.DEBUG else logging.WARNING
        )
