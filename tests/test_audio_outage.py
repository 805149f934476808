"""A sound card that comes and goes, on the real ALSA path (`pulse` PCM, null sink "room").

Unloading the sink is an unplugged card: the `pulse` PCM's writes and reads fail with
EIO, and an idle stream notices only when asked. Suspending it is a card that hangs:
capture just stops delivering, playback stops taking audio (and resumes with the sink).
What a user notices: an answer that arrives while the speaker is away is heard once it
is back (or, if it stays away, the client is told what was heard); an idle speaker and
microphone report the loss within about a second, a speaker that hangs mid-answer
within `PLAYBACK_STALL_S`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from harkd.audio import alsa
from harkd.audio.alsa import AlsaInput, AlsaOutput
from harkd.audio.reference import PlayedReference
from pulse_fixture import PulseServer, PulseUnavailable, Recording
from test_alsa_pulse import Listener, tone

pytestmark = pytest.mark.pulse


class Abandoned:
    """Collects `on_abandoned` reports, stamped."""

    def __init__(self) -> None:
        self.reports: list[tuple[float, dict[str, int]]] = []

    def __call__(self, played: dict[str, int]) -> None:
        self.reports.append((time.monotonic(), played))


async def until(condition: Callable[[], object], timeout_s: float, what: str) -> float:
    """Poll `condition()` until true; returns when it became true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        await asyncio.sleep(0.01)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def heard_ms(recording: Recording, freq: float) -> float:
    """Milliseconds of a `freq` tone in the recording (10 ms blocks, by correlation)."""
    samples = recording.samples().astype(float)
    block = recording.rate // 100
    count = len(samples) // block
    blocks = samples[: count * block].reshape(count, block)
    t = np.arange(block) / recording.rate
    power = np.abs(blocks @ np.exp(-2j * np.pi * freq * t)) * 2 / block
    return float((power > 2000).sum() * 10)


@pytest.fixture(scope="module")
def pulse() -> Iterator[PulseServer]:
    """A PulseAudio server of this module's own: these tests unload and suspend its
    sink, and what that leaves behind (a sink rendering far ahead, stale defaults) must
    not reach the other tests' shared room."""
    try:
        server = PulseServer.start_new()
    except PulseUnavailable as exc:
        pytest.skip(f"PulseAudio cannot start here: {exc}")
    with server:
        yield server


@pytest.fixture
def sink_back(pulse: PulseServer) -> Iterator[None]:
    """Whatever a test does to the room's sink, the next test finds it working."""
    yield
    listing = pulse._pactl("list", "short", "sinks").stdout.decode()
    if "room" not in listing:
        pulse.load_sink()
    else:
        pulse.suspend_sink(False)


async def test_idle_speaker_and_mic_notice_an_unplugged_card_within_a_second(
    pulse: PulseServer, sink_back: None
) -> None:
    out_listener, in_listener = Listener(), Listener()
    speaker = AlsaOutput("pulse", rate=24000)
    mic = AlsaInput("pulse", rate=16000)  # the default source: the room's monitor
    await speaker.start(out_listener)
    await mic.start(in_listener)
    frames: list[float] = []

    async def capture() -> None:
        async for frame in mic.frames():
            frames.append(frame.captured_at)

    capturing = asyncio.create_task(capture())
    try:
        await until(lambda: len(frames) > 5, 3, "capture delivers frames")
        await asyncio.sleep(alsa.IDLE_CHECK_S)  # the speaker is idle, probing
        unplugged = time.monotonic()
        pulse.unload_sink()
        out_failed = await out_listener.wait_for("failed", 5) - unplugged
        in_failed = await in_listener.wait_for("failed", 5) - unplugged
        print(f"idle speaker failed after {out_failed:.2f} s, mic after {in_failed:.2f} s")
        assert out_failed < alsa.IDLE_CHECK_S + 1.0
        assert in_failed < 1.5
        pulse.load_sink()
        await out_listener.wait_for("recovered", 15)
        await in_listener.wait_for("recovered", 15)
        count = len(frames)
        await until(lambda: len(frames) > count + 5, 3, "capture resumed")
        drained = asyncio.Event()
        speaker.on_drained(drained.set)
        speaker.play("a", tone(200))
        await asyncio.wait_for(drained.wait(), 10)
        assert speaker.played_ms("a") == 200
        assert [e for e, _ in out_listener.events] == ["failed", "recovered"]
        assert [e for e, _ in in_listener.events] == ["failed", "recovered"]
    finally:
        await mic.stop()
        await speaker.stop()
        await asyncio.wait_for(capturing, 2)


async def test_a_mic_that_stops_delivering_is_reported_and_reopened(
    pulse: PulseServer, sink_back: None
) -> None:
    listener = Listener()
    mic = AlsaInput("pulse", rate=16000)
    await mic.start(listener)
    frames: list[float] = []

    async def capture() -> None:
        async for frame in mic.frames():
            frames.append(frame.captured_at)

    capturing = asyncio.create_task(capture())
    try:
        await until(lambda: len(frames) > 5, 3, "capture delivers frames")
        hung = time.monotonic()
        pulse.suspend_sink(True)
        failed = await listener.wait_for("failed", 5) - hung
        print(f"a silent mic is reported after {failed:.2f} s")
        assert alsa.STALL_S * 0.9 < failed < alsa.STALL_S + 1.0
        pulse.suspend_sink(False)
        await listener.wait_for("recovered", 15)
        count = len(frames)
        await until(lambda: len(frames) > count + 5, 3, "capture resumed")
        assert [e for e, _ in listener.events] == ["failed", "recovered"]
    finally:
        await mic.stop()
        await asyncio.wait_for(capturing, 2)


async def replug_before_a_retry(pulse: PulseServer, caplog: pytest.LogCaptureFixture) -> Recording:
    """Plug the room's sink back in just after the speaker's failed retry; record it.

    The recorder then listens before the next retry (0.5 s later) can succeed.
    """
    seen = len(caplog.records)
    await until(
        lambda: any("still failing" in r.message for r in caplog.records[seen:]), 3, "a retry"
    )
    return pulse.load_sink_and_record(24000)


async def test_an_answer_for_a_lost_speaker_plays_once_it_is_back(
    pulse: PulseServer, sink_back: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=alsa.__name__)
    listener, abandoned = Listener(), Abandoned()
    speaker = AlsaOutput("pulse", rate=24000)
    drained = asyncio.Event()
    speaker.on_drained(drained.set)
    speaker.on_abandoned(abandoned)
    await speaker.start(listener)
    try:
        pulse.unload_sink()
        await listener.wait_for("failed", 5)
        speaker.play("a", tone(1000, 660.0))  # the answer arrives while the card is away
        await asyncio.sleep(1.0)
        assert speaker.is_playing and not drained.is_set()
        recording = await replug_before_a_retry(pulse, caplog)
        await listener.wait_for("recovered", 5)
        await asyncio.wait_for(drained.wait(), 5)
        await asyncio.sleep(0.1)
        recording.stop()
        assert not speaker.is_playing and abandoned.reports == []
        assert speaker.played_ms("a") == 1000
        assert heard_ms(recording, 660.0) == pytest.approx(1000, abs=30)
    finally:
        await speaker.stop()


async def test_an_answer_cut_by_an_unplugged_card_resumes_where_it_stopped(
    pulse: PulseServer, sink_back: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=alsa.__name__)
    listener, abandoned = Listener(), Abandoned()
    speaker = AlsaOutput("pulse", rate=24000)
    drained = asyncio.Event()
    speaker.on_drained(drained.set)
    speaker.on_abandoned(abandoned)
    await speaker.start(listener)
    try:
        before = pulse.record(24000)
        await asyncio.sleep(0.1)
        speaker.play("a", tone(1500, 660.0))
        await asyncio.sleep(0.5)
        pulse.unload_sink()  # ends the first recording too
        await listener.wait_for("failed", 5)
        before.stop()
        after = await replug_before_a_retry(pulse, caplog)
        await asyncio.wait_for(drained.wait(), 5)
        await asyncio.sleep(0.1)
        after.stop()
        first, rest = heard_ms(before, 660.0), heard_ms(after, 660.0)
        print(f"heard {first:.0f} ms before the card went and {rest:.0f} ms after")
        assert abandoned.reports == []
        assert speaker.played_ms("a") == 1500
        # Nothing the room did not hear is skipped (give or take the recorders' edges);
        # the reopened speaker may repeat what it could not know was heard, at most the
        # device buffer.
        assert 1500 - 30 <= first + rest <= 1500 + 80
    finally:
        await speaker.stop()


async def test_the_cancellers_reference_holds_what_the_room_heard_across_an_unplugged_card(
    pulse: PulseServer, sink_back: None, caplog: pytest.LogCaptureFixture
) -> None:
    """With echo cancellation the speaker tells the canceller what it played: across an
    unplugged card, the reference holds what the room heard before, nothing while the
    card is away, and the rest of the answer when it really played, once the card is
    back (a canceller given audio the room never heard looks for an echo that never
    comes; one not given what it did hear lets the echo through). Through PulseAudio
    the card holds almost nothing when it goes; that what it held is erased from the
    reference is shown by `test_reference_timeline`.

    (While the room's sink is gone, PulseAudio may open its fallback sink for a retry,
    and it moves what that still holds to the room's sink when it is back: the room
    hears that later than the reference says. A real unplugged card cannot be opened.)
    """
    caplog.set_level(logging.DEBUG, logger=alsa.__name__)
    listener = Listener()
    speaker = AlsaOutput("pulse", rate=24000)
    reference = PlayedReference(16000, history_s=30.0)
    speaker.report_played(reference)
    drained = asyncio.Event()
    speaker.on_drained(drained.set)
    await speaker.start(listener)
    try:
        start = time.monotonic()
        before = pulse.record(24000)
        await asyncio.sleep(0.1)
        speaker.play("a", tone(1500, 660.0))
        await asyncio.sleep(0.5)
        pulse.unload_sink()
        await listener.wait_for("failed", 5)
        failed_at = time.monotonic()
        before.stop()
        after = await replug_before_a_retry(pulse, caplog)
        back_at = time.monotonic()
        await asyncio.wait_for(drained.wait(), 5)
        await asyncio.sleep(0.1)
        after.stop()
        end = time.monotonic()
    finally:
        await speaker.stop()

    def tone_ms(since: float, until_: float) -> float:
        first = round(since * 16000)
        samples = reference.read(first, round(until_ * 16000) - first).astype(float)
        blocks = samples[: len(samples) // 160 * 160].reshape(-1, 160)
        return float((np.sqrt((blocks**2).mean(axis=1)) > 1000).sum() * 10)

    first, rest = heard_ms(before, 660.0), heard_ms(after, 660.0)
    print(
        f"heard {first:.0f} + {rest:.0f} ms; reference {tone_ms(start, failed_at):.0f} + ", end=""
    )
    print(f"{tone_ms(back_at, end):.0f} ms")
    assert abs(tone_ms(start, failed_at) - first) <= 60
    assert tone_ms(failed_at + 0.03, failed_at + 0.4) == 0  # the card is away
    # Every part of the answer is in it once (the reopened speaker may repeat what it
    # could not know was heard, at most the device buffer), the rest after the return.
    assert 1500 - 30 <= tone_ms(start, end) <= 1500 + 80
    assert tone_ms(back_at, end) >= rest - 200


async def test_an_answer_is_abandoned_when_the_speaker_stays_away(
    pulse: PulseServer, sink_back: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(alsa, "HOLD_S", 2.0)  # the real 5 s would only slow the test
    listener, abandoned = Listener(), Abandoned()
    speaker = AlsaOutput("pulse", rate=24000)
    drained = asyncio.Event()
    speaker.on_drained(drained.set)
    speaker.on_abandoned(abandoned)
    await speaker.start(listener)
    try:
        recording = pulse.record(24000)
        await asyncio.sleep(0.1)
        speaker.play("a", tone(3000, 660.0))
        await asyncio.sleep(0.6)
        pulse.unload_sink()
        lost = await listener.wait_for("failed", 5)
        recording.stop()
        speaker.play("b", tone(500))  # a second item, queued while the card is away
        reported = await until(lambda: abandoned.reports, 10, "on_abandoned")
        held_s = reported - lost
        played = abandoned.reports[0][1]
        heard = heard_ms(recording, 660.0)
        print(f"abandoned after {held_s:.2f} s; played {played}, the room heard {heard:.0f} ms")
        # `lost` is stamped when the loop ran device_failed, which a loaded machine
        # delays past the thread's own hold clock by a few ms.
        assert 2.0 - 0.1 <= held_s < 2.0 + 1.5
        assert set(played) == {"a", "b"} and played["b"] == 0
        # The client truncates where the room surely heard up to: never past what the
        # recorder caught (give or take its own few ms), at most a device buffer short.
        assert -15 <= heard - played["a"] <= 80
        assert not speaker.is_playing and not drained.is_set()
        assert len(abandoned.reports) == 1
        # The card comes back: the next answer plays in full.
        pulse.load_sink()
        await listener.wait_for("recovered", 15)
        speaker.play("c", tone(200))
        await asyncio.wait_for(drained.wait(), 10)
        assert speaker.played_ms("c") == 200 and len(abandoned.reports) == 1
    finally:
        await speaker.stop()


async def test_an_answer_on_a_speaker_that_hangs_is_reported_and_plays_once_it_resumes(
    pulse: PulseServer, sink_back: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=alsa.__name__)
    listener, abandoned = Listener(), Abandoned()
    speaker = AlsaOutput("pulse", rate=24000)
    drained = asyncio.Event()
    speaker.on_drained(drained.set)
    speaker.on_abandoned(abandoned)
    await speaker.start(listener)
    try:
        recording = pulse.record(24000)
        await asyncio.sleep(0.1)
        speaker.play("a", tone(3000, 660.0))
        await until(lambda: speaker.played_ms("a") >= 500, 5, "the answer plays")
        hung = time.monotonic()
        pulse.suspend_sink(True)  # no error anywhere: the sink just stops taking audio
        failed = await listener.wait_for("failed", 10) - hung
        print(f"a hung speaker is reported after {failed:.2f} s")
        assert alsa.PLAYBACK_STALL_S * 0.9 < failed < alsa.PLAYBACK_STALL_S + 1.5
        assert speaker.is_playing and not drained.is_set()
        # It reopens fine and hangs again: that is no recovery (and no new failure).
        seen = len(caplog.records)
        await until(
            lambda: any("still failing" in r.message for r in caplog.records[seen:]),
            alsa.PLAYBACK_STALL_S + 5,
            "a reopened speaker that hangs again",
        )
        assert [e for e, _ in listener.events] == ["failed"]
        pulse.suspend_sink(False)
        await listener.wait_for("recovered", 10)
        await asyncio.wait_for(drained.wait(), 10)
        await asyncio.sleep(0.1)
        recording.stop()
        heard = heard_ms(recording, 660.0)
        print(f"the room heard {heard:.0f} ms of 3000")
        assert not speaker.is_playing and abandoned.reports == []
        assert speaker.played_ms("a") == 3000
        # Nothing is skipped; what the stalled speaker might have held is played again.
        assert 3000 - 30 <= heard <= 3000 + 80
        assert [e for e, _ in listener.events] == ["failed", "recovered"]
    finally:
        await speaker.stop()


async def test_an_answer_on_a_speaker_that_stays_hung_is_abandoned_with_what_was_heard(
    pulse: PulseServer, sink_back: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(alsa, "HOLD_S", 2.0)  # the real 5 s would only slow the test
    listener, abandoned = Listener(), Abandoned()
    speaker = AlsaOutput("pulse", rate=24000)
    drained = asyncio.Event()
    speaker.on_drained(drained.set)
    speaker.on_abandoned(abandoned)
    await speaker.start(listener)
    try:
        recording = pulse.record(24000)
        await asyncio.sleep(0.1)
        speaker.play("a", tone(3000, 660.0))
        await until(lambda: speaker.played_ms("a") >= 500, 5, "the answer plays")
        pulse.suspend_sink(True)
        lost = await listener.wait_for("failed", 10)
        reported = await until(lambda: abandoned.reports, 10, "on_abandoned")
        held_s = reported - lost
        recording.stop()
        played = abandoned.reports[0][1]
        heard = heard_ms(recording, 660.0)
        print(f"abandoned {held_s:.2f} s after the failure; played {played}, heard {heard:.0f}")
        # Held for HOLD_S, checked between reopenings of the hung speaker.
        assert 2.0 - 0.1 <= held_s < 2.0 + alsa.PLAYBACK_STALL_S + 1.5
        # The client truncates where the room surely heard up to (see above).
        assert -15 <= heard - played["a"] <= 80
        assert not speaker.is_playing and not drained.is_set()
        assert len(abandoned.reports) == 1
        # The sink resumes: the next answer plays in full.
        pulse.suspend_sink(False)
        await listener.wait_for("recovered", 15)
        speaker.play("c", tone(200))
        await asyncio.wait_for(drained.wait(), 5)
        assert speaker.played_ms("c") == 200 and len(abandoned.reports) == 1
    finally:
        await speaker.stop()


async def test_play_volume_and_barge_in_from_the_loop_race_the_playback_thread_safely(
    pulse: PulseServer,
) -> None:
    errors: list[BaseException] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: errors.append(args.exc_value or Exception())
    listener = Listener()
    speaker = AlsaOutput("pulse", rate=48000, period_ms=10)  # resampling, short periods
    await speaker.start(listener)
    try:
        rng = np.random.default_rng(7)
        delta = tone(20)
        received: dict[str, int] = {}
        stops = 0
        ended = time.monotonic() + 3.0
        item = 0
        while time.monotonic() < ended:
            name = f"i{item}"
            for _ in range(int(rng.integers(1, 30))):
                speaker.play(name, delta)
                received[name] = received.get(name, 0) + 20
                speaker.set_volume(int(rng.integers(0, 101)))
                heard = speaker.played_ms(name)
                assert 0 <= heard <= received[name]
                if rng.random() < 0.3:
                    await asyncio.sleep(float(rng.random()) * 0.02)  # let the thread write
                assert speaker.played_ms(name) >= heard  # positions never go back
            if rng.random() < 0.5:
                played = speaker.stop_playback()
                stops += 1
                assert set(played) <= set(received)
                assert all(0 <= played[k] <= received[k] for k in played)
                assert speaker.played_ms(name) == played.get(name, 0)  # final once dropped
            item += 1
        speaker.stop_playback()
        drained = asyncio.Event()
        speaker.on_drained(drained.set)
        speaker.set_volume(100)
        speaker.play("last", tone(200))
        await asyncio.wait_for(drained.wait(), 10)
        assert speaker.played_ms("last") == 200
        assert errors == [] and listener.events == []
        assert stops > 10 and item > 20
    finally:
        threading.excepthook = previous
        await speaker.stop()
