"""Transcript journal: durability, rotation, torn lines, history formatting."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from harkd.journal import TranscriptJournal, format_history


def test_append_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "transcripts.jsonl"
    journal = TranscriptJournal(path, max_bytes=1_000_000, keep=3)
    assert journal.read_last(5) == []
    assert not path.exists(), "reading must not create the journal"
    records = [
        {"id": f"m{i}", "role": "user", "parts": [{"type": "text", "text": "grüß dich"}]}
        for i in range(3)
    ]
    for record in records:
        journal.append(record)
    journal.close()
    raw = path.read_bytes()
    assert raw.count(b"\n") == 3
    assert '{"id":"m0","role":"user"' in raw.decode() and "grüß" in raw.decode()
    assert journal.read_last(2) == records[1:]
    assert journal.read_last(10) == records
    assert journal.read_last(0) == []


def test_rotation_by_size_keeps_newest(tmp_path: Path) -> None:
    path = tmp_path / "transcripts.jsonl"
    journal = TranscriptJournal(path, max_bytes=300, keep=2)
    for i in range(40):
        journal.append({"n": i, "pad": "x" * 30})
    journal.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["transcripts.jsonl", "transcripts.jsonl.1", "transcripts.jsonl.2"]
    for name in files:
        assert 0 < (tmp_path / name).stat().st_size <= 300
    lines = sum((tmp_path / name).read_bytes().count(b"\n") for name in files)
    numbers = [r["n"] for r in journal.read_last(1000)]
    assert len(numbers) == lines
    assert numbers == list(range(40 - lines, 40)), "newest last, no gaps across files"
    assert [r["n"] for r in journal.read_last(3)] == [37, 38, 39]


def test_keep_zero_keeps_only_the_current_file(tmp_path: Path) -> None:
    path = tmp_path / "transcripts.jsonl"
    journal = TranscriptJournal(path, max_bytes=100, keep=0)
    for i in range(10):
        journal.append({"n": i, "pad": "y" * 20})
    journal.close()
    assert [p.name for p in tmp_path.iterdir()] == ["transcripts.jsonl"]
    assert journal.read_last(100)[-1] == {"n": 9, "pad": "y" * 20}


def test_oversized_record_is_still_written(tmp_path: Path) -> None:
    journal = TranscriptJournal(tmp_path / "j.jsonl", max_bytes=10, keep=1)
    journal.append({"text": "much longer than ten bytes"})
    journal.append({"text": "and another"})
    journal.close()
    assert journal.read_last(5) == [{"text": "much longer than ten bytes"}, {"text": "and another"}]
    assert (tmp_path / "j.jsonl").read_bytes() == b'{"text":"and another"}\n'


def test_torn_last_line_is_skipped_and_appending_continues(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "transcripts.jsonl"
    journal = TranscriptJournal(path, max_bytes=1_000_000, keep=2)
    journal.append({"n": 1})
    journal.append({"n": 2})
    journal.close()
    line = json.dumps({"n": 3, "text": "cut off by kill -9"}).encode()
    with path.open("ab") as file:  # what a crash in the middle of a write leaves
        file.write(line[: len(line) // 2])

    restarted = TranscriptJournal(path, max_bytes=1_000_000, keep=2)
    with caplog.at_level(logging.WARNING, logger="harkd.journal"):
        assert restarted.read_last(10) == [{"n": 1}, {"n": 2}]
    assert "torn or invalid" in caplog.text

    restarted.append({"n": 4})
    restarted.close()
    assert restarted.read_last(10) == [{"n": 1}, {"n": 2}, {"n": 4}]
    assert path.read_bytes().endswith(
        b"\n" + json.dumps({"n": 4}, separators=(",", ":")).encode() + b"\n"
    )


def test_invalid_lines_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "transcripts.jsonl"
    path.write_bytes(b'{"n":1}\n[1,2]\n\xff\xfe\n\n{"n":2}\n')
    with caplog.at_level(logging.WARNING, logger="harkd.journal"):
        assert TranscriptJournal(path, 1000, 1).read_last(10) == [{"n": 1}, {"n": 2}]
    assert len(caplog.records) == 2


async def test_append_async_keeps_call_order(tmp_path: Path) -> None:
    journal = TranscriptJournal(tmp_path / "t.jsonl", max_bytes=2_000, keep=5)
    await asyncio.gather(*(journal.append_async({"n": i}) for i in range(60)))
    record: dict[str, Any] = {"n": 60}
    await journal.append_async(record)
    record["n"] = "mutated after the call"
    journal.close()
    assert [r["n"] for r in journal.read_last(1000)] == list(range(61))


WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from harkd.journal import TranscriptJournal

    journal = TranscriptJournal(Path(sys.argv[1]), max_bytes=50_000, keep=3)
    n = 0
    while True:
        journal.append({"n": n, "text": "ä" * (n % 300), "role": "assistant"})
        n += 1
    """
)


def test_sigkilled_writer_leaves_only_complete_lines(tmp_path: Path) -> None:
    path = tmp_path / "transcripts.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
    try:
        deadline = time.monotonic() + 30
        # Let it write enough to rotate at least once, then kill it mid-stream.
        while not path.with_name(path.name + ".1").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    for file in sorted(tmp_path.iterdir()):
        data = file.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]
        for line in complete.splitlines():
            json.loads(line)  # every complete line parses

    journal = TranscriptJournal(path, max_bytes=50_000, keep=3)
    numbers = [r["n"] for r in journal.read_last(1_000_000)]
    assert len(numbers) > 10
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    journal.append({"n": "after restart"})
    assert journal.read_last(1) == [{"n": "after restart"}]
    journal.close()


def _msg(ts: float, role: str, *parts: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": f"m{ts}",
        "role": role,
        "timestamp": ts,
        "parts": list(parts),
        "interrupted": False,
        "duration_ms": 0,
        **extra,
    }


T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


def _history_records() -> list[dict[str, Any]]:
    return [
        # Conversation 1, session a.
        _msg(
            T0,
            "user",
            {"type": "audio", "transcript": "what time is it", "duration_ms": 900},
            session="a",
        ),
        _msg(
            T0 + 2,
            "assistant",
            {"type": "audio", "transcript": "It is ten past ten.", "duration_ms": 1500},
            session="a",
        ),
        # Conversation 2: new session, a few seconds later.
        _msg(T0 + 5, "user", {"type": "text", "text": "lights on"}, session="b"),
        _msg(
            T0 + 6,
            "assistant",
            {
                "type": "tool_call",
                "id": "c1",
                "name": "set_light",
                "arguments": '{"on":true}',
                "output": {"ok": True},
            },
            {"type": "audio", "transcript": "Done, the lights are", "duration_ms": 700},
            session="b",
            interrupted=True,
        ),
        # Conversation 3: same session, but eleven minutes of silence.
        _msg(
            T0 + 6 + 660,
            "user",
            {"type": "text", "text": "and now?"},
            {"type": "image", "mime_type": "image/png", "data": "iVBOR..."},
            session="b",
        ),
        _msg(
            T0 + 667,
            "assistant",
            {"type": "tool_result", "tool_call_id": "c2", "content": "x" * 300},
            session="b",
        ),
    ]


def test_history_groups_conversations() -> None:
    records = _history_records()
    assert format_history(records, 10, tz=UTC).count("=== ") == 3
    assert format_history(records, 0, tz=UTC) == ""
    assert format_history([], 3, tz=UTC) == ""

    text = format_history(records, 2, tz=UTC)
    assert text.splitlines()[:4] == [
        "=== 2023-11-14 22:13 (session b) ===",
        "22:13:25 user: lights on",
        '22:13:26 assistant: -> set_light({"on":true}) = {"ok":true}',
        "                    Done, the lights are [interrupted]",
    ]
    assert "what time is it" not in text
    assert "22:24:26 user: and now?" in text
    assert "[image image/png]" in text
    assert "iVBOR" not in text
    result = next(line for line in text.splitlines() if "<- c2 = " in line)
    assert result.endswith("…") and len(result) < 260


def test_history_without_sessions_splits_on_gaps() -> None:
    records = [
        _msg(T0, "user", {"type": "text", "text": "one"}),
        _msg(T0 + 599, "assistant", {"type": "text", "text": "two"}),
        _msg(T0 + 1300, "user", {"type": "text", "text": "three"}),
    ]
    text = format_history(records, 5, tz=UTC)
    assert text == (
        "=== 2023-11-14 22:13 ===\n22:13:20 user: one\n22:23:19 assistant: two\n\n"
        "=== 2023-11-14 22:35 ===\n22:35:00 user: three"
    )


def test_history_tolerates_odd_records() -> None:
    text = format_history([{"role": "system"}, {"parts": "nope", "timestamp": "x"}], 5, tz=UTC)
    assert "--:--:-- system:" in text and "--:--:-- ?:" in text
