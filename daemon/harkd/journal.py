"""Crash-safe transcript journal (JSON lines with size rotation) and its history view.

Each record is one line written with a single ``os.write`` on an ``O_APPEND``
descriptor and fsynced, so a crash or power cut can tear at most the last line;
readers skip a torn line with a warning.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any

__all__ = ["CONVERSATION_GAP_S", "TranscriptJournal", "format_history"]

logger = logging.getLogger(__name__)

CONVERSATION_GAP_S = 600.0
"""A silence longer than this between two messages starts a new conversation."""

_MAX_VALUE_CHARS = 200  # tool arguments/outputs are cut to keep history readable


class TranscriptJournal:
    """Append-only JSON-lines journal at ``path``, rotated by size.

    Before a write that would take the file past ``max_bytes`` it is renamed to
    ``path.1`` (``path.1`` to ``path.2`` and so on up to ``path.<keep>``; the
    oldest is replaced). The file is opened on the first append, so reading
    (``harkd history``) never creates it.
    """

    def __init__(self, path: Path, max_bytes: int, keep: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self._fd: int | None = None
        self._needs_newline = False
        # The thread lock guards the fd and rotation (append may run in worker
        # threads); the asyncio lock keeps append_async calls in call order.
        self._lock = threading.Lock()
        self._async_lock = asyncio.Lock()

    def append(self, record: Mapping[str, Any]) -> None:
        """Write ``record`` as one JSON line and fsync it. Blocks for the fsync."""
        self._write(_encode(record))

    async def append_async(self, record: Mapping[str, Any]) -> None:
        """Like :meth:`append` with the write and fsync in a worker thread.

        Concurrent calls are written in the order they were made.
        """
        # Encode on the loop: the caller may mutate the record once we yield.
        data = _encode(record)
        async with self._async_lock:
            await asyncio.to_thread(self._write, data)

    def read_last(self, n: int) -> list[dict[str, Any]]:
        """Return the last ``n`` records across rotated files, oldest first.

        Torn or invalid lines are skipped with a warning.
        """
        if n <= 0:
            return []
        newest_first: list[list[dict[str, Any]]] = []
        count = 0
        with self._lock:
            for file in self._files_newest_first():
                records = _read_records(file)
                newest_first.append(records)
                count += len(records)
                if count >= n:
                    break
        return [record for records in reversed(newest_first) for record in records][-n:]

    def close(self) -> None:
        """Close the journal file; a later append reopens it."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _write(self, data: bytes) -> None:
        with self._lock:
            fd = self._open()
            size = os.fstat(fd).st_size
            if size > 0 and size + len(data) > self.max_bytes:
                self._rotate()
                fd = self._open()
            if self._needs_newline:
                # End a torn line left by a crash so this record stays parseable.
                data = b"\n" + data
            written = os.write(fd, data)
            # A regular file only writes short when the disk is full; finish the
            # line anyway, and remember to terminate it if that fails too.
            self._needs_newline = True
            while written < len(data):
                written += os.write(fd, data[written:])
            self._needs_newline = False
            os.fsync(fd)

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o600)
            self._needs_newline = _ends_torn(self.path)
        return self._fd

    def _rotate(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.keep <= 0:
            self.path.unlink(missing_ok=True)
        else:
            for index in range(self.keep - 1, 0, -1):
                older = self._rotated(index)
                if older.exists():
                    os.replace(older, self._rotated(index + 1))
            os.replace(self.path, self._rotated(1))
        _fsync_dir(self.path.parent)
        logger.info("rotated transcript journal %s", self.path)

    def _rotated(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def _files_newest_first(self) -> list[Path]:
        candidates = [self.path, *(self._rotated(i) for i in range(1, self.keep + 1))]
        return [file for file in candidates if file.exists()]


def _encode(record: Mapping[str, Any]) -> bytes:
    return (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


def _ends_torn(path: Path) -> bool:
    with path.open("rb") as file:
        if file.seek(0, os.SEEK_END) == 0:
            return False
        file.seek(-1, os.SEEK_END)
        return file.read(1) != b"\n"


def _fsync_dir(directory: Path) -> None:
    # Makes the renames of a rotation durable, not just the data.
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_records(file: Path) -> list[dict[str, Any]]:
    try:
        data = file.read_bytes()
    except FileNotFoundError:  # rotated away by another process meanwhile
        return []
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:  # also covers invalid UTF-8
            logger.warning("%s:%d: skipping torn or invalid journal line", file, lineno)
            continue
        if not isinstance(record, dict):
            logger.warning("%s:%d: skipping journal line that is not an object", file, lineno)
            continue
        records.append(record)
    return records


def format_history(
    records: Iterable[Mapping[str, Any]], n_conversations: int, *, tz: tzinfo | None = None
) -> str:
    """Render the last ``n_conversations`` conversations of journal ``records``.

    Records are finalized message dicts in journal order. A conversation ends
    where the ``session`` key changes or messages are more than
    ``CONVERSATION_GAP_S`` apart. Times are shown in ``tz`` (default: local time).
    Returns an empty string when there is nothing to show.
    """
    if n_conversations <= 0:
        return ""
    conversations = _group_conversations(list(records))
    blocks = [_format_conversation(c, tz) for c in conversations[-n_conversations:]]
    return "\n\n".join(blocks)


def _group_conversations(records: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    groups: list[list[Mapping[str, Any]]] = []
    previous: Mapping[str, Any] | None = None
    for record in records:
        if previous is None or _starts_conversation(previous, record):
            groups.append([])
        groups[-1].append(record)
        previous = record
    return groups


def _starts_conversation(previous: Mapping[str, Any], record: Mapping[str, Any]) -> bool:
    if previous.get("session") != record.get("session"):
        return True
    before, now = _timestamp(previous), _timestamp(record)
    return before is not None and now is not None and now - before > CONVERSATION_GAP_S


def _timestamp(record: Mapping[str, Any]) -> float | None:
    value = record.get("timestamp")
    # bool is an int subclass but never a time.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def _format_conversation(records: Sequence[Mapping[str, Any]], tz: tzinfo | None) -> str:
    first = _timestamp(records[0])
    started = (
        datetime.fromtimestamp(first, tz).strftime("%Y-%m-%d %H:%M") if first is not None else "?"
    )
    session = records[0].get("session")
    header = f"=== {started}" + (f" (session {session})" if session else "") + " ==="
    lines = [header]
    for record in records:
        lines.extend(_format_message(record, tz))
    return "\n".join(lines)


def _format_message(record: Mapping[str, Any], tz: tzinfo | None) -> list[str]:
    ts = _timestamp(record)
    clock = datetime.fromtimestamp(ts, tz).strftime("%H:%M:%S") if ts is not None else "--:--:--"
    prefix = f"{clock} {record.get('role', '?')}:"
    parts = record.get("parts")
    texts = (
        [_format_part(p) for p in parts if isinstance(p, Mapping)]
        if isinstance(parts, list)
        else []
    )
    texts = [t for t in texts if t] or [""]
    if record.get("interrupted"):
        texts[-1] = f"{texts[-1]} [interrupted]".lstrip()
    indent = " " * len(prefix)
    return [f"{prefix} {texts[0]}".rstrip()] + [f"{indent} {t}" for t in texts[1:]]


def _format_part(part: Mapping[str, Any]) -> str:
    kind = part.get("type")
    if kind == "text":
        return str(part.get("text") or "")
    if kind == "audio":
        transcript = part.get("transcript")
        if transcript:
            return str(transcript)
        duration_ms = part.get("duration_ms")
        return f"[audio {duration_ms} ms]" if duration_ms is not None else "[audio]"
    if kind == "tool_call":
        args = _short(part.get("arguments"))
        text = f"-> {part.get('name', '?')}({args})"
        return text + f" = {_short(part['output'])}" if part.get("output") is not None else text
    if kind == "tool_result":
        return f"<- {part.get('tool_call_id', '?')} = {_short(part.get('content'))}"
    if kind == "image":
        return f"[image {part.get('mime_type', '?')}]"
    return f"[{kind}]"


def _short(value: object) -> str:
    # Tool arguments usually arrive as a JSON string already; print those as-is.
    text = (
        value
        if isinstance(value, str)
        else json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    )
    return text if len(text) <= _MAX_VALUE_CHARS else text[: _MAX_VALUE_CHARS - 1] + "…"
