"""Echo cancellation, noise suppression and automatic gain: WebRTC's audio processing
module (AEC3, NS, AGC2 through `pywebrtc-audio`) as a conditioning stage.

The canceller's far end is what the speaker really played (`PlayedReference`, fed by
the playback thread after the device accepted each write), read for the span of time
each microphone frame covers. The frame's span comes from its capture stamp; frames
are then counted end to end so that scheduling jitter does not shake the reference,
and the count is re-anchored when the stamps say it went wrong (frames lost, a device
reopened, clocks drifted). AEC3 estimates the remaining delay itself (the sound
server's latency, the air); `delay_ms` is its starting guess.

A frame whose span reaches past what the speaker has written so far waits for the
next frame (at most `REFERENCE_WAIT_S`): the playback thread writes only a period or
two ahead of the ear, and a span read too early would lack its last milliseconds for
good (the canceller then lets the echo of that part through).

While the speaker plays, a residual gate silences what is only echo that got through
(AEC3 leaks some now and then, and a VAD must not take the assistant's voice for the
user's). It passes a block when the microphone hears what the speaker does not
explain: the echo is predicted per band from the reference, at a delay and through a
gain the gate measures and learns itself (`ResidualGate`). While it passes the user's
voice over the speaker, it sends the microphone through its own spectral suppressor
instead of AEC3's output (`DoubleTalkFilter`): AEC3 pushes the user's onset over an
answer as far down as the echo itself, and a VAD or the provider would miss it.

The stage logs once when the canceller has converged: when, over a second of speaker
audio, it removes `CONVERGED_DB` of what the microphone picked up, with the echo's
delay behind the reference (measured by cross-correlation, since the library exposes
no statistics).

WebRTC works on 10 ms blocks: frames of other lengths are regrouped, which delays the
audio by less than one block. The library releases the GIL, and the stage is `heavy`,
so the pipeline runs it in a worker thread.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque

import numpy as np
import numpy.typing as npt
from pywebrtc_audio import AudioProcessor

from harkd.audio.base import AudioFrame
from harkd.audio.reference import JOIN_TOLERANCE_S, PlayedReference, ReportsPlayed
from harkd.config import ProcessingConfig

log = logging.getLogger(__name__)

NS_LEVELS = {"low": 0, "moderate": 1, "high": 2, "very_high": 3}
"""`audio.processing.noise_suppression` -> WebRTC's level (6, 12, 18, 21 dB)."""
CONVERGED_DB = 30.0
"""Echo removed (ERLE) over `CONVERGED_WINDOW_S` of speaker audio that counts as converged.

Strict on purpose: AEC3 starts by suppressing hard (60 dB in the first half second),
then lets echo through (10-20 dB) while it finds the delay, for a second or two."""
CONVERGED_WINDOW_S = 2.0
CONVERGED_STEADY = 0.98
"""... and this share of its chunks must each lose `STEADY_DB` (no leaks)."""
STEADY_DB = 15.0
FAR_ACTIVE_RMS = 0.003
"""A block of the reference louder than this (RMS, 0..1, about -50 dBFS) is speaker audio."""
ECHO_AUDIBLE_RMS = 0.001
"""... and the microphone must hear at least this much for it to count as echo."""
UNHEARD_S = 3.0
"""Speaker audio the microphone never hears for this long: nothing to cancel."""
READ_AHEAD_S = 0.05
"""The reference is read this far ahead of a frame's stamps. A canceller can only
remove echo that comes after its reference, and the stamps are not exact (the sound
server's buffering, a period's granularity: through PulseAudio the echo arrived about
20 ms before its stamps say); AEC3 finds the delay that remains."""
EARLY_TOLERANCE_S = 0.02
"""A frame stamped this much earlier than counted re-anchors the count (within the
read-ahead's margin: every jump makes AEC3 look for the delay again, and lets echo
through meanwhile)."""
LATE_TOLERANCE_S = 0.01
"""Frames stamped later than counted, all of the last `LATE_WINDOW` by at least this
much, move the count on by the least of them: frames were lost on the way (the
capture queue drops the oldest when the machine is busy) or the device reopened. A
late stamp alone is scheduling jitter, gone by the next frames."""
LATE_WINDOW = 10
REFERENCE_WAIT_S = 0.04
"""How long a frame may wait for the reference of its span to be written. Through
PulseAudio the playback thread's writes reach only 30-60 ms past the moment they are
made, and the span of a frame just captured ends `READ_AHEAD_S` after its stamp: read
at once, a quarter of the frames lacked up to their last 10 ms (measured in the
PulseAudio room), and AEC3, given silence for audio that did play, let it through."""
RESIDUAL_GATE_DB = 15.0
"""Until the gate has learned the echo (below), a 10 ms block the canceller made this
much quieter than the mic heard it, while the speaker plays, is taken for echo that
got through."""
FALLBACK_CONFIRM_BLOCKS = 8
"""... and near-end sound passes only after this many 10 ms blocks in a row passed that
test: AEC3 leaks echo now and then, for 10-40 ms at a time, and it suppresses the
user's onset as hard as echo, so the test is weak both ways."""
CONFIRM_BLOCKS = 4
"""Once the echo is learned, near-end sound passes after this many blocks in a row
that the speaker does not explain. Replayed rooms: 3 let a 300 ms stretch of the
assistant's own voice through, 4 never did, 5 lost a fifth of the user's words."""
RELEASE_BLOCKS = 30
"""Once near-end sound passed, the gate stays open until this many blocks in a row are
echo alone again (the user's voice has quiet moments between syllables)."""
BAND_RANGE_HZ = (150.0, 4000.0)
"""The gate compares what the microphone hears with what the speaker played in this
range (where voices are), in `BANDS` bands evenly spaced in pitch."""
BANDS = 17
UNEXPLAINED_DB = 6.0
"""A block is near-end sound when what the microphone hears in excess of the predicted
echo (per band, with this margin) is at least `UNEXPLAINED_SHARE` of all it hears.
The echo is the speaker's audio at the echo's delay (give or take `DELAY_SPREAD`
blocks), through the echo path's gain per band, with a reverberant tail that fades
by `ECHO_DECAY_DB` per block."""
UNEXPLAINED_SHARE = 0.3
DELAY_SPREAD = 2
ECHO_DECAY_DB = 2.0
OVERSUBTRACT_DB = 9.0
"""While the user talks over the speaker, each band of the microphone keeps what it
hears beyond the predicted echo raised by this much (a Wiener-like gain), and at least
`FLOOR_DB` of it. Six replayed rooms: the VAD heard 0.91 of the user's voiced frames
over an answer (in AEC3's output: 0.71), with the echo left 19 dB below the user's
voice; 6 dB left it 16 dB below, 12 dB 20 dB below for the same frames, and a floor
of -30 dB instead lost 0.06 of the frames."""
FLOOR_DB = -20.0
FILTER_DELAY_S = 0.0025
"""The suppressor's gains become a linear-phase filter this much behind the
microphone (its impulse response has to fit in the block it filters)."""
GAIN_QUANTILE = 0.8
"""The echo path's gain per band is this quantile of what the microphone heard over
what the speaker played, on blocks that are surely echo alone: the echo is usually
weaker than the loudest speaker audio near its delay, so a mean would be too low."""
GAIN_STEP = 0.1
"""How far (in nepers) one block moves the gain's quantile estimate."""
GAIN_WARMUP_BLOCKS = 100
"""Blocks of echo alone the gain is first taken from (their `GAIN_QUANTILE`), before
the gate relies on it."""
RELEARN_WINDOW = 200
RELEARN_SHARE = 0.8
"""When, of the last `RELEARN_WINDOW` blocks of speaker audio the mic heard, this share
were echo by the canceller's account but the user's by the gate's, the echo changed
(the volume was turned up on the device, or its delay moved): the gate measures and
learns it afresh. A user talking over the answer does not do that: the canceller
lets half of their words through, and the barge-in soon stops the speaker."""
DELAY_WINDOW_S = 2.0
"""The echo's delay is measured over this much speaker audio (GCC-PHAT), first when
that much has played, then again every `DELAY_EVERY_S` of it (a reopened device or a
new sound server latency moves it)."""
DELAY_EVERY_S = 10.0
MAX_DELAY_S = 0.5
"""The longest echo delay looked for (AEC3 looks about as far)."""
ECHO_TAIL_S = 0.2
"""The speaker counts as playing this long after its reference went quiet (the delay
and the room's reverberation)."""
ONSET_GUARD_S = 0.6
"""After the speaker starts a new stream (an answer after a pause) its latency is not
the last one's, and AEC3 lets some echo through while it finds the new delay: the
microphone stays gated this long into each answer (measured: bursts up to 0.2 s)."""
_FULL_SCALE = 32768.0


class AudioProcessing:
    """The conditioning stage: AEC3 (with a reference), NS and AGC2 on the raw mic."""

    heavy = True

    def __init__(
        self,
        config: ProcessingConfig,
        sample_rate: int,
        reference: PlayedReference | None = None,
    ) -> None:
        """`reference` is required with `config.echo_cancellation` (at `sample_rate`)."""
        if config.echo_cancellation and (reference is None or reference.rate != sample_rate):
            raise ValueError("echo cancellation needs a played reference at the capture rate")
        self.sample_rate = sample_rate
        self._reference = reference if config.echo_cancellation else None
        level = config.noise_suppression
        self._apm = AudioProcessor(
            sample_rate,
            echo_cancellation=config.echo_cancellation,
            noise_suppression=level is not False,
            auto_gain_control=config.auto_gain,
            ns_level=NS_LEVELS[level] if isinstance(level, str) else 1,
            stream_delay_ms=config.delay_ms or 0,
        )
        self._block = max(1, sample_rate // 100)
        self._pending = np.zeros(0, dtype=np.int16)
        self._pending_far = np.zeros(0, dtype=np.int16)
        self._cursor: int | None = None  # reference sample index of the next mic sample
        self._lateness: deque[int] = deque(maxlen=LATE_WINDOW)  # stamped - counted
        # Frames waiting for their reference: (samples, reference index of the first).
        self._waiting: list[tuple[npt.NDArray[np.int16], int]] = []
        self._settling = False  # the last frame is within ONSET_GUARD_S of a new stream
        self._gate = ResidualGate(sample_rate)
        self._auto_gain = config.auto_gain
        self.convergence = Convergence(sample_rate) if self._reference is not None else None
        """ERLE bookkeeping and the one-time converged log (echo cancellation only)."""
        self._cancelled: tuple[npt.NDArray[np.int16], float] | None = None

    @property
    def echo_free(self) -> bool:
        """False while the canceller has not converged: the assistant's voice would
        still come through, so capture stays half duplex until then."""
        if self.convergence is None:
            return True
        return self.convergence.converged and not self._settling

    @property
    def ungated(self) -> AudioFrame | None:
        """The last frame as AEC3 left it, before the residual gate; None without
        echo cancellation, where no gate runs (see
        `harkd.audio.pipeline.EchoCanceller.ungated`)."""
        if self._cancelled is None:
            return None
        out, captured_at = self._cancelled
        return AudioFrame(out.astype("<i2", copy=False).tobytes(), self.sample_rate, captured_at)

    def process(self, frame: AudioFrame) -> AudioFrame | None:
        """The frame with echo removed (and noise, gain as configured); None while a
        frame shorter than a 10 ms block is being regrouped, or waits for its reference
        (it then comes out with the next one, stamped as that one)."""
        near = np.frombuffer(frame.pcm, dtype="<i2")
        far = None
        if self._reference is not None:
            self._waiting.append((near, self._span(frame, len(near))))
            if self._must_wait():
                return None
            near, far = self._take_waiting()
        near, far = self._regroup(near, far)
        if len(near) == 0:
            return None
        out: npt.NDArray[np.int16] = self._apm.process(near, far)
        if self.convergence is not None and far is not None:
            self._cancelled = out, frame.captured_at
            self.convergence.update(near, far, out)
            level = 10 ** (self._apm.gain_db / 20) if self._auto_gain else 1.0
            out = self._gate.apply(near, far, out, level)
        pcm = out.astype("<i2", copy=False).tobytes()
        return AudioFrame(pcm, self.sample_rate, frame.captured_at)

    def _must_wait(self) -> bool:
        """Whether the newest frame's reference is still being written (and the frames
        before it have not waited `REFERENCE_WAIT_S` already)."""
        assert self._reference is not None
        near, start = self._waiting[-1]
        held = sum(len(n) for n, _ in self._waiting[:-1])
        if held >= REFERENCE_WAIT_S * self.sample_rate:
            return False
        written = self._reference.written_until()
        # A stream that ended before this span (more than a write's jitter) is silence.
        ended = JOIN_TOLERANCE_S * self.sample_rate
        return written is not None and start - ended < written < start + len(near)

    def _take_waiting(self) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.int16]]:
        """The waiting frames' samples, end to end, and their reference."""
        assert self._reference is not None
        waiting, self._waiting = self._waiting, []
        fars = [self._reference.read(start, len(near)) for near, start in waiting]
        if len(waiting) == 1:
            return waiting[0][0], fars[0]
        return np.concatenate([near for near, _ in waiting]), np.concatenate(fars)

    def _span(self, frame: AudioFrame, count: int) -> int:
        """The reference index of the first sample of the span this frame covers."""
        assert self._reference is not None
        stamped = round((frame.captured_at + READ_AHEAD_S) * self.sample_rate) - count
        cursor = self._cursor
        if cursor is None or stamped < cursor - EARLY_TOLERANCE_S * self.sample_rate:
            cursor = stamped
            self._lateness.clear()
        else:
            self._lateness.append(stamped - cursor)
            late = min(self._lateness)
            if len(self._lateness) == LATE_WINDOW and late > LATE_TOLERANCE_S * self.sample_rate:
                cursor += late
                self._lateness.clear()
        self._cursor = cursor + count
        since_start = frame.captured_at - self._reference.stream_start
        self._settling = since_start < ONSET_GUARD_S
        return cursor

    def _regroup(
        self, near: npt.NDArray[np.int16], far: npt.NDArray[np.int16] | None
    ) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.int16] | None]:
        """Whole 10 ms blocks of what came so far (the rest waits for the next frame)."""
        if len(self._pending) == 0 and len(near) % self._block == 0:
            return near, far  # the usual case: 10 or 20 ms periods
        near = np.concatenate((self._pending, near))
        usable = len(near) - len(near) % self._block
        self._pending = near[usable:]
        if far is not None:
            far = np.concatenate((self._pending_far, far))
            self._pending_far = far[usable:]
            far = far[:usable]
        return near[:usable], far


class Convergence:
    """Watches how much echo the canceller removes; logs once when it has converged."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        self.converged = False
        self.speaker_s = 0.0
        """Seconds of speaker audio (reference above `FAR_ACTIVE_RMS`) seen so far."""
        self.converged_after_s: float | None = None
        """`speaker_s` when it converged."""
        self.delay_ms: float | None = None
        """How far the echo lags the reference, when it converged."""
        self.erle_db: float | None = None
        """Echo removed over the last window of speaker audio."""
        window = int(CONVERGED_WINDOW_S * sample_rate)
        self._window = window
        # Per block of speaker audio: (samples, energy in, energy out).
        self._blocks: deque[tuple[int, float, float]] = deque()
        self._unheard_s = 0.0  # speaker audio the microphone did not pick up at all
        self._samples = 0
        self._recent = RecentAudio(2 * window)  # for the delay estimate

    def update(
        self, near: npt.NDArray[np.int16], far: npt.NDArray[np.int16], out: npt.NDArray[np.int16]
    ) -> None:
        """Account for one processed chunk: mic in, reference, mic out."""
        if self.converged:
            return
        self._recent.add(near, far)
        if _rms(far) < FAR_ACTIVE_RMS:
            return
        if _rms(near) < ECHO_AUDIBLE_RMS:
            # A microphone that does not hear the speaker has no echo to remove.
            self._unheard_s += len(near) / self.sample_rate
            if self._unheard_s >= UNHEARD_S:
                self.converged = True
                log.info("echo canceller: the microphone does not hear the speaker")
            return
        self.speaker_s += len(near) / self.sample_rate
        energy_in = float(np.sum(near.astype(np.float64) ** 2))
        energy_out = float(np.sum(out.astype(np.float64) ** 2))
        self._blocks.append((len(near), energy_in, energy_out))
        self._samples += len(near)
        while self._samples - self._blocks[0][0] >= self._window:
            self._samples -= self._blocks.popleft()[0]
        if self._samples < self._window:
            return
        total_in = sum(b[1] for b in self._blocks)
        total_out = sum(b[2] for b in self._blocks)
        self.erle_db = 10 * np.log10(total_in / max(total_out, 1.0))
        limit = 10 ** (STEADY_DB / 10)
        steady = sum(b[2] * limit <= b[1] for b in self._blocks) / len(self._blocks)
        if self.erle_db >= CONVERGED_DB and steady >= CONVERGED_STEADY:
            self.converged = True
            self.converged_after_s = self.speaker_s
            lag = self._recent.lag(self.sample_rate // 2)  # AEC3 looks this far, too
            self.delay_ms = lag * 1000 / self.sample_rate
            log.info(
                "echo canceller converged after %.1f s of speaker audio: %.0f dB of echo "
                "removed, echo %.0f ms behind the played audio",
                self.speaker_s,
                self.erle_db,
                self.delay_ms,
            )
            self._recent.clear()


class RecentAudio:
    """The last `size` samples of mic and reference, and how far the one lags the other."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.kept = 0
        """Samples kept (up to `size`, give or take a chunk)."""
        self._near: deque[npt.NDArray[np.int16]] = deque()
        self._far: deque[npt.NDArray[np.int16]] = deque()

    def add(self, near: npt.NDArray[np.int16], far: npt.NDArray[np.int16]) -> None:
        """One chunk of each, of the same length."""
        self._near.append(near)
        self._far.append(far)
        self.kept += len(near)
        while self.kept - len(self._near[0]) >= self.size:
            self.kept -= len(self._near.popleft())
            self._far.popleft()

    def clear(self) -> None:
        """Forget it all."""
        self._near.clear()
        self._far.clear()
        self.kept = 0

    def lag(self, max_lag: int) -> int:
        """The lag (samples, 0..`max_lag`) of the mic behind the reference that
        correlates best (GCC-PHAT: whitened, so speech's strong low notes do not blur
        the peak)."""
        near = np.concatenate(self._near).astype(np.float64)
        far = np.concatenate(self._far).astype(np.float64)
        size = 1 << (2 * len(near) - 1).bit_length()
        cross = np.fft.rfft(near, size) * np.conj(np.fft.rfft(far, size))
        correlation = np.fft.irfft(cross / np.maximum(np.abs(cross), 1e-12), size)
        return int(np.argmax(correlation[: min(max_lag, len(near) - 1) + 1]))


def processing_stages(
    config: ProcessingConfig, sample_rate: int, output: object
) -> list[AudioProcessing]:
    """The conditioning stages `audio.processing` asks for (none when all is off).

    With echo cancellation, `output` (which must report what it played: config checks
    that) is told to feed the canceller's reference.
    """
    if not (config.echo_cancellation or config.noise_suppression or config.auto_gain):
        return []
    reference = None
    if config.echo_cancellation:
        if not isinstance(output, ReportsPlayed):
            raise ValueError(
                "audio.processing.echo_cancellation: the output cannot report what it played"
            )
        reference = PlayedReference(sample_rate)
        output.report_played(reference)
    return [AudioProcessing(config, sample_rate, reference)]


class ResidualGate:
    """Silences echo the canceller let through while the speaker plays; passes
    everything when it is quiet.

    It asks whether the microphone hears something the speaker does not explain,
    rather than how much the canceller removed: AEC3 suppresses the user's first
    syllables over an answer as hard as the echo itself, so the canceller's own
    reduction cannot tell them apart. The echo the speaker explains is predicted per
    band from the played reference at the echo's delay (measured here) through the
    echo path's gain (learned here, on blocks that are surely echo alone). Until both
    are known, the canceller's reduction decides (`RESIDUAL_GATE_DB`).

    What it passes while the speaker plays comes from the `DoubleTalkFilter` once the
    echo is learned, not from the canceller, for the same reason.
    """

    def __init__(self, sample_rate: int) -> None:
        self._block = max(1, sample_rate // 100)
        self._tail_blocks = round(ECHO_TAIL_S * 100)
        self._limit = 10 ** (RESIDUAL_GATE_DB / 10)
        self._margin = 10 ** (UNEXPLAINED_DB / 10)
        self._decay = 10 ** (-ECHO_DECAY_DB / 10)
        self._window = np.hanning(2 * self._block)
        hz_per_bin = sample_rate / (2 * self._block)
        low, high = (min(f, sample_rate / 2) / hz_per_bin for f in BAND_RANGE_HZ)
        self._edges = np.unique(np.round(np.geomspace(max(low, 1), high, BANDS + 1)).astype(int))
        self._silent_bands = np.zeros(len(self._edges) - 1)  # shared, never written
        self._previous = (np.zeros(self._block, np.int16), np.zeros(self._block, np.int16))
        max_delay = round(MAX_DELAY_S * 100)
        self._far_bands: deque[npt.NDArray[np.float64]] = deque(maxlen=max_delay + DELAY_SPREAD + 1)
        self._echo = self._silent_bands  # predicted echo with its tail (replaced, not written)
        self._log_gain: npt.NDArray[np.float64] | None = None
        self._warmup: list[npt.NDArray[np.float64]] = []  # log ratios before it is known
        # Per block of speaker audio heard: the canceller called it echo, the gate not.
        self._disagreed: deque[bool] = deque(maxlen=RELEARN_WINDOW)
        self._delay = DelayTracker(sample_rate)
        self._since_far = self._tail_blocks  # blocks since the reference was last loud
        self._run = 0  # blocks in a row that passed (closed) or failed (open) the test
        self._open = False  # near-end sound (the user) is coming through
        # The last block's mic and predicted echo bands, while the speaker plays and
        # the echo is learned (what the double-talk filter needs), else None.
        self._explained: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None
        self._filter = DoubleTalkFilter(sample_rate, self._edges)
        self._filtered = False  # the last block came from the filter, not the canceller
        self._passed = True  # the last block was not silenced
        self._fade = np.linspace(0.0, 1.0, self._block, endpoint=False)

    @property
    def learned(self) -> bool:
        """Whether the echo's delay and gain are known (the gate then predicts it)."""
        return self._delay.blocks is not None and self._log_gain is not None

    def apply(
        self,
        near: npt.NDArray[np.int16],
        far: npt.NDArray[np.int16],
        out: npt.NDArray[np.int16],
        level: float = 1.0,
    ) -> npt.NDArray[np.int16]:
        """`out` with what is only leaked echo silenced, and the user's voice over the
        speaker taken from the microphone through the double-talk filter (scaled by
        `level`, the gain the canceller's AGC applies to `out`)."""
        gated = out.copy()
        for start in range(0, len(out) - self._block + 1, self._block):
            part = slice(start, start + self._block)
            mic, before = near[part], self._previous[0]  # `_passes` moves `_previous` on
            passes = self._passes(mic, far[part], out[part])
            explained = self._explained if passes else None
            if not passes:
                gated[part] = 0
            elif explained is not None or self._filtered:
                # The user over the speaker (or the block after, the speaker gone quiet
                # under their voice: back to the canceller, through a crossfade).
                gains = None if explained is None else self._filter.gains(*explained)
                own = self._filter.run(before, mic, gains) * level
                if self._passed and (explained is not None) != self._filtered:
                    # The filter's output is `FILTER_DELAY_S` behind the canceller's.
                    fade_in = self._fade if explained is not None else 1.0 - self._fade
                    own = out[part] + fade_in * (own - out[part])
                gated[part] = np.clip(own, -_FULL_SCALE, _FULL_SCALE - 1)
            self._filtered = explained is not None
            self._passed = passes
        return gated

    def _passes(
        self, near: npt.NDArray[np.int16], far: npt.NDArray[np.int16], out: npt.NDArray[np.int16]
    ) -> bool:
        """One 10 ms block: whether the gate lets it through."""
        far_active = _rms(far) >= FAR_ACTIVE_RMS
        self._since_far = 0 if far_active else self._since_far + 1
        if self._since_far >= self._tail_blocks:
            # The speaker is quiet: nothing to hold back (and no spectra to take, which
            # is most of the time).
            self._open, self._run = False, 0
            self._echo = self._silent_bands
            self._far_bands.append(self._silent_bands)
            self._previous = (near, far)
            self._explained = None
            return True
        near_bands, far_bands = self._bands(near, far)
        self._far_bands.append(far_bands)
        self._delay.add(near, far)
        energy_in = float(np.sum(near.astype(np.float64) ** 2))
        energy_out = float(np.sum(out.astype(np.float64) ** 2))
        reduced = energy_out * self._limit < energy_in  # the canceller's verdict: echo
        played = self._played_near_delay()
        if played is not None:
            self._echo = np.maximum(played, self._echo * self._decay)
        near_end = not reduced
        self._explained = None
        if self._log_gain is not None and played is not None:
            echo = np.exp(self._log_gain) * self._echo
            excess = float(np.sum(np.maximum(0.0, near_bands - self._margin * echo)))
            near_end = excess > UNEXPLAINED_SHARE * float(np.sum(near_bands))
            self._explained = (near_bands, echo)
        learned = self.learned
        heard = far_active and _rms(near) >= ECHO_AUDIBLE_RMS
        if heard and learned:
            self._disagreed.append(reduced and near_end)
        if len(self._disagreed) == RELEARN_WINDOW and (
            sum(self._disagreed) >= RELEARN_SHARE * RELEARN_WINDOW
        ):
            log.info("echo gate: the echo changed; learning it again")
            self._log_gain = None
            self._disagreed.clear()
            self._warmup.clear()
            self._delay.remeasure()
            learned = near_end = False
            self._explained = None
        if played is not None and heard and reduced and not self._open and not near_end:
            self._learn_gain(near_bands)
        confirm = CONFIRM_BLOCKS if learned else FALLBACK_CONFIRM_BLOCKS
        if self._open:
            self._run = 0 if near_end else self._run + 1
            if self._run >= RELEASE_BLOCKS:
                self._open, self._run = False, 0
        else:
            self._run = self._run + 1 if near_end else 0
            if self._run >= confirm:
                self._open, self._run = True, 0
        return self._open

    def _bands(
        self, near: npt.NDArray[np.int16], far: npt.NDArray[np.int16]
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Band energies of the last 20 ms of mic and reference (windowed)."""
        (near_before, far_before), self._previous = self._previous, (near, far)
        both = np.stack(
            (np.concatenate((near_before, near)), np.concatenate((far_before, far)))
        ).astype(np.float64)
        spectra = np.abs(np.fft.rfft(both * self._window, axis=1)) ** 2
        bands = np.add.reduceat(spectra, self._edges[:-1], axis=1)[:, : len(self._edges) - 1]
        return bands[0], bands[1]

    def _played_near_delay(self) -> npt.NDArray[np.float64] | None:
        """The loudest reference per band within `DELAY_SPREAD` blocks of the echo's
        delay, or None while the delay is unknown."""
        delay = self._delay.blocks
        if delay is None:
            return None
        history = len(self._far_bands)
        first = max(0, history - 1 - delay - DELAY_SPREAD)
        last = min(history, history - delay + DELAY_SPREAD)
        if last <= first:
            return np.zeros(len(self._edges) - 1)
        loudest: npt.NDArray[np.float64] = np.max(
            np.array(list(itertools.islice(self._far_bands, first, last))), axis=0
        )
        return loudest

    def _learn_gain(self, near_bands: npt.NDArray[np.float64]) -> None:
        """Learn the echo path's gain from a block of echo alone: the first
        `GAIN_WARMUP_BLOCKS` give its starting value, later ones nudge it."""
        if not np.any(self._echo > 0):
            return
        ratio = np.log((near_bands + 1e-3) / (self._echo + 1e-3))
        if self._log_gain is None:
            self._warmup.append(ratio)
            if len(self._warmup) >= GAIN_WARMUP_BLOCKS:
                self._log_gain = np.quantile(np.array(self._warmup), GAIN_QUANTILE, axis=0)
                self._warmup.clear()
            return
        step = np.where(ratio > self._log_gain, GAIN_QUANTILE, GAIN_QUANTILE - 1.0)
        self._log_gain = self._log_gain + GAIN_STEP * step


class DoubleTalkFilter:
    """The user's voice over the speaker, from the raw microphone: each band keeps
    what it hears beyond the predicted echo (`OVERSUBTRACT_DB` over it), and at least
    `FLOOR_DB`. The echo's bands the user does not cover are suppressed; where the user
    is louder, what is left of the echo is masked by their voice.

    Each 10 ms block is filtered together with the one before it (overlap-save), so
    its gains act as a linear-phase filter `FILTER_DELAY_S` behind the microphone.
    """

    def __init__(self, sample_rate: int, edges: npt.NDArray[np.int_]) -> None:
        """`edges`: the bands' edges as bins of a 20 ms spectrum (the gate's)."""
        self._block = max(1, sample_rate // 100)
        size = 2 * self._block
        bins = np.arange(size // 2 + 1)
        self._bins = bins.astype(np.float64)
        self._centres = (edges[:-1] + edges[1:]) / 2.0
        delay = round(FILTER_DELAY_S * sample_rate)
        self._shift = np.exp(-2j * np.pi * bins * delay / size)
        self._oversubtract = 10 ** (OVERSUBTRACT_DB / 10)
        self._floor = 10 ** (FLOOR_DB / 10)  # of the power
        self._gains = self._shift  # of the last block filtered

    def gains(
        self, near_bands: npt.NDArray[np.float64], echo_bands: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.complex128]:
        """Per bin of the 20 ms spectrum, for a block whose mic has `near_bands` over a
        predicted echo of `echo_bands` (band energies)."""
        kept = 1.0 - self._oversubtract * echo_bands / np.maximum(near_bands, 1e-9)
        amplitude = np.sqrt(np.clip(kept, self._floor, 1.0))
        # Between band centres the gain is interpolated; outside the bands (below
        # 150 Hz, above 4 kHz: no echo prediction there) the nearest band's holds.
        gains: npt.NDArray[np.complex128] = (
            np.interp(self._bins, self._centres, amplitude) * self._shift
        )
        return gains

    def run(
        self,
        before: npt.NDArray[np.int16],
        near: npt.NDArray[np.int16],
        gains: npt.NDArray[np.complex128] | None = None,
    ) -> npt.NDArray[np.float64]:
        """One block of the mic (`near`, the block `before` it) through `gains` (the
        last ones when None)."""
        if gains is not None:
            self._gains = gains
        both = np.concatenate((before, near)).astype(np.float64)
        filtered: npt.NDArray[np.float64] = np.fft.irfft(np.fft.rfft(both) * self._gains)
        return filtered[self._block :]


class DelayTracker:
    """Measures the echo's delay (whole 10 ms blocks) over the speaker's audio."""

    def __init__(self, sample_rate: int) -> None:
        self._rate = sample_rate
        self._recent = RecentAudio(int(DELAY_WINDOW_S * sample_rate))
        self._until_next = self._recent.size  # samples of speaker audio before the next estimate
        self.blocks: int | None = None
        """The delay in 10 ms blocks; None until first measured."""

    def remeasure(self) -> None:
        """Measure again as soon as a window of speaker audio is at hand."""
        self._until_next = 0

    def add(self, near: npt.NDArray[np.int16], far: npt.NDArray[np.int16]) -> None:
        """A block heard while the speaker plays."""
        self._recent.add(near, far)
        self._until_next -= len(near)
        if self._until_next > 0 or self._recent.kept < self._recent.size:
            return
        self._until_next = int(DELAY_EVERY_S * self._rate)
        lag = self._recent.lag(int(MAX_DELAY_S * self._rate))
        blocks = round(lag * 100 / self._rate)
        if blocks != self.blocks:
            log.debug("echo gate: the echo is %d ms behind the reference", blocks * 10)
        self.blocks = blocks


def _rms(samples: npt.NDArray[np.int16]) -> float:
    if len(samples) == 0:
        return 0.0
    return float(np.sqrt(np.mean(samples.astype(np.float64) ** 2))) / _FULL_SCALE
