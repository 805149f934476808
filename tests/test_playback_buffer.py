"""PlaybackBuffer: queueing, volume, resampling and the played-position ledger."""

from __future__ import annotations

import numpy as np
import pytest

from harkd.audio.playback import PlaybackBuffer, volume_gain

BYTES_PER_MS = 48  # 24 kHz PCM16 mono


def audio(ms: int, value: int = 1000) -> bytes:
    return np.full(ms * 24, value, dtype="<i2").tobytes()


def play_out(buffer: PlaybackBuffer, frames: int, *, flush: bool = False) -> bytes:
    """What a device thread does: pop, write everything, record it."""
    data = buffer.pop(frames, flush=flush)
    if data is None:
        return b""
    buffer.record_written(len(data) // 2)
    return data


def test_passthrough_plays_items_in_order_and_tracks_position() -> None:
    buffer = PlaybackBuffer(24000, 480)
    buffer.push("a", audio(100, 1))
    buffer.push("b", audio(50, 2))
    assert buffer.queued_frames == 150 * 24
    data = play_out(buffer, 10_000)
    assert data == audio(100, 1) + audio(50, 2)
    assert buffer.pop(480) is None
    # 60 ms still queued in the device: b not heard at all, a fully heard.
    assert buffer.played_ms("a", 60 * 24) == 90
    assert buffer.played_ms("b", 60 * 24) == 0
    assert buffer.played_ms("a", 40 * 24) == 100
    assert buffer.played_ms("b", 40 * 24) == 10
    assert buffer.played(0) == {"a": 100, "b": 50}
    assert buffer.unplayed_frames(30 * 24) == 30 * 24


def test_partial_writes_are_attributed_in_order() -> None:
    buffer = PlaybackBuffer(24000, 480)
    buffer.push("a", audio(20))
    buffer.push("b", audio(20))
    assert buffer.pop(40 * 24) is not None
    buffer.record_written(30 * 24)  # the device took only 30 ms so far
    assert buffer.played_ms("a", 0) == 20
    assert buffer.played_ms("b", 0) == 10
    buffer.record_written(10 * 24)
    assert buffer.played_ms("b", 0) == 20


def test_never_more_than_received() -> None:
    buffer = PlaybackBuffer(48000, 960)
    buffer.push("a", audio(10))
    play_out(buffer, 100_000, flush=True)
    assert buffer.played_ms("a", 0) <= 10
    assert buffer.played_ms("unknown", 0) == 0


def test_padding_belongs_to_no_item() -> None:
    buffer = PlaybackBuffer(24000, 480)
    buffer.push("a", audio(20))
    play_out(buffer, 480)
    pad = buffer.silence(480)
    assert pad == bytes(960)
    buffer.record_written(480)
    # 20 ms of padding still in the device: a is fully heard, nothing real is left.
    assert buffer.played_ms("a", 480) == 20
    assert buffer.unplayed_frames(480) == 0
    assert buffer.unplayed_frames(960) == 480


def test_stop_reports_played_then_clears() -> None:
    buffer = PlaybackBuffer(24000, 480)
    buffer.push("a", audio(200))
    play_out(buffer, 80 * 24)
    played = buffer.stop(30 * 24)
    assert played == {"a": 50}
    assert buffer.pop(480) is None
    assert not buffer.has_audio
    assert buffer.played_ms("a", 0) == 50  # remembered after the ledger is cleared
    buffer.push("b", audio(20))
    assert play_out(buffer, 10_000) == audio(20)
    assert buffer.played_ms("b", 0) == 20


def test_clear_drops_queue_and_ledger() -> None:
    buffer = PlaybackBuffer(24000, 480)
    buffer.push("a", audio(100))
    play_out(buffer, 480)
    buffer.clear()
    assert buffer.pop(480) is None
    assert buffer.played(0) == {}
    assert buffer.unplayed_frames(0) == 0


def test_forget_played_keeps_final_values_and_waiting_items() -> None:
    buffer = PlaybackBuffer(24000, 480)
    buffer.push("a", audio(20))
    play_out(buffer, 480)
    buffer.push("b", audio(20))
    buffer.forget_played()
    assert buffer.played_ms("a", 0) == 20
    assert "b" in buffer.played(0)
    assert "a" not in buffer.played(0)


@pytest.mark.parametrize(("volume", "expected"), [(100, 10000), (50, 2500), (0, 0)])
def test_volume_is_applied_when_audio_leaves(volume: int, expected: int) -> None:
    buffer = PlaybackBuffer(24000, 480)
    buffer.push("a", audio(20, 10000))
    buffer.set_volume(volume)
    out = np.frombuffer(play_out(buffer, 480), dtype="<i2")
    assert np.all(out == expected)
    assert buffer.volume == volume


def test_volume_change_is_live_for_queued_audio() -> None:
    buffer = PlaybackBuffer(24000, 480)
    buffer.push("a", audio(40, -32768))
    first = np.frombuffer(play_out(buffer, 480), dtype="<i2")
    buffer.set_volume(50)
    second = np.frombuffer(play_out(buffer, 480), dtype="<i2")
    assert np.all(first == -32768)  # full scale untouched, no overflow
    assert np.all(second == -8192)
    assert volume_gain(150) == 1.0 and volume_gain(-5) == 0.0


@pytest.mark.parametrize("rate", [48000, 44100, 16000])
def test_resampled_rates_keep_the_ledger_in_24k_ms(rate: int) -> None:
    buffer = PlaybackBuffer(rate, rate // 50)
    t = np.arange(24000) / 24000
    tone = np.rint(8000 * np.sin(2 * np.pi * 300 * t)).astype("<i2").tobytes()
    for i in range(0, len(tone), 960):  # 20 ms deltas
        buffer.push("a", tone[i : i + 960])
    written = b""
    while (chunk := play_out(buffer, rate // 50, flush=not buffer.queued_frames)) != b"":
        written += chunk
    frames = len(written) // 2
    assert abs(frames - rate) <= 2
    assert 998 <= buffer.played_ms("a", 0) <= 1000
    assert buffer.played_ms("a", rate // 10) == pytest.approx(900, abs=2)
    out = np.frombuffer(written, dtype="<i2").astype(float)
    ideal = 8000 * np.sin(2 * np.pi * 300 * np.arange(frames) / rate)
    middle = slice(rate // 50, frames - rate // 50)
    assert np.max(np.abs(out[middle] - ideal[middle])) < 80  # no clicks between deltas


def test_a_new_item_flushes_the_previous_items_tail() -> None:
    buffer = PlaybackBuffer(48000, 960)
    buffer.push("a", audio(20))
    buffer.push("b", audio(20))
    play_out(buffer, 100_000, flush=True)
    assert buffer.played_ms("a", 0) == 20
    assert buffer.played_ms("b", 0) == 20


def test_rewind_makes_what_a_lost_device_held_unwritten_again() -> None:
    buffer = PlaybackBuffer(24000, 480)
    buffer.push("a", audio(100))
    buffer.push("b", audio(50))
    play_out(buffer, 10_000)
    assert not buffer.has_unwritten_audio
    buffer.rewind(60 * 24)  # the device vanished with its last 60 ms unplayed
    assert buffer.played(0) == {"a": 90, "b": 0}
    assert buffer.unplayed_frames(0) == 0
    assert buffer.has_unwritten_audio and not buffer.has_audio
    buffer.record_written(60 * 24)  # a new device takes them
    assert buffer.played(0) == {"a": 100, "b": 50}
    assert buffer.played(20 * 24) == {"a": 100, "b": 30}


def test_rewound_frames_go_before_those_popped_since() -> None:
    buffer = PlaybackBuffer(24000, 480)
    buffer.push("a", audio(20))
    play_out(buffer, 20 * 24)
    buffer.push("b", audio(20))
    assert buffer.pop(20 * 24) is not None  # popped, the write failed
    buffer.rewind(10 * 24)
    buffer.record_written(10 * 24)
    assert buffer.played(0) == {"a": 20, "b": 0}
    buffer.record_written(20 * 24)
    assert buffer.played(0) == {"a": 20, "b": 20}
    assert not buffer.has_unwritten_audio


def test_rewound_padding_is_no_audio_and_can_be_discarded() -> None:
    buffer = PlaybackBuffer(24000, 480)
    buffer.push("a", audio(20))
    play_out(buffer, 480)
    buffer.silence(480)
    buffer.record_written(480)
    buffer.rewind(10 * 24)  # only padding was still in the device
    assert not buffer.has_unwritten_audio
    buffer.discard_unwritten()
    buffer.push("b", audio(20))
    play_out(buffer, 480)
    assert buffer.played(0) == {"a": 20, "b": 20}
    assert buffer.unplayed_frames(10 * 24) == 10 * 24


def test_generation_changes_with_push_and_stop_only() -> None:
    buffer = PlaybackBuffer(24000, 480)
    seen = buffer.generation
    buffer.push("a", audio(20))
    assert buffer.generation != seen
    seen = buffer.generation
    play_out(buffer, 480)
    buffer.forget_played()
    assert buffer.generation == seen
    buffer.stop(0)
    assert buffer.generation != seen


def test_reconfigure_drops_audio_queued_for_the_old_rate() -> None:
    buffer = PlaybackBuffer(24000, 480)
    buffer.push("a", audio(100))
    play_out(buffer, 40 * 24)
    assert buffer.reconfigure(48000, 960) == {"a": 40}
    assert (buffer.device_rate, buffer.period_frames) == (48000, 960)
    assert not buffer.has_audio
    buffer.push("b", audio(100))
    written = b""
    while (chunk := play_out(buffer, 960, flush=not buffer.queued_frames)) != b"":
        written += chunk
    assert abs(len(written) // 2 - 4800) <= 2
    assert buffer.played_ms("b", 0) == 100
