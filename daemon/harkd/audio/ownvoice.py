"""The wake word in the assistant's own voice, found in what the speaker played.

The wake word detector listens before the half-duplex gate, so that the user's wake
word can stop an answer. Without echo cancellation it hears the speaker as well: an
answer that says "okay nabu" (to "how do I wake you?") would interrupt itself.
Satellites avoid that by listening to their own playback too, and so does harkd.

The speaker keeps what it played on the capture clock (a `PlayedReference` at 16 kHz:
the playback thread reports every write with when the room hears it, and what was
dropped unheard). Nothing more happens while it plays. Only when the microphone's
detector hears a wake word while something played around it, a second detector (the
same models) listens to the speaker's last `LOOK_BACK_S` of audio; a wake word the
speaker played from `MATCH_LATE_S` before to `MATCH_EARLY_S` after the microphone's
is the assistant's own, and the microphone's detection is dropped.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from harkd.audio.base import VAD_RATE, AudioFrame
from harkd.audio.reference import PlayedReference

if TYPE_CHECKING:
    from harkd.audio.pipeline import WakeStage
    from harkd.audio.wakeword import WakeDetection
    from harkd.config import WakeConfig

log = logging.getLogger(__name__)

MATCH_EARLY_S = 0.3
"""The microphone may fire this much before the speaker's detector (two detectors
cross their thresholds at slightly different points of one word)."""
MATCH_LATE_S = 0.5
"""... and this much after: the way through the room and the capture, the echo's
score rising later, and the played position's error through a sound server (0.08 to
0.1 s in the PulseAudio room). The user's own wake word this soon after the
assistant's is taken for its echo."""
LOOK_BACK_S = 2.5
"""The speaker's audio heard before a check: the match window and, before it, enough
for the models to settle into what was playing."""
THRESHOLD = 0.5
"""The speaker's detector takes less than the microphone's to count a word: heard
twice, a word at the threshold's edge may cross it on one side only, and a word the
speaker half said only excuses the microphone's detection of it for a moment."""
_FRAME = VAD_RATE * 20 // 1000
_WINDOW = round((LOOK_BACK_S + MATCH_EARLY_S) * VAD_RATE) // _FRAME * _FRAME


class OwnVoiceCheck:
    """A wake word stage: the microphone's detector, minus what the speaker said."""

    @classmethod
    def around(cls, detector: WakeStage, wake: WakeConfig) -> OwnVoiceCheck:
        """`detector` checked against a second one for the words of `wake`, each counted
        from `THRESHOLD` (or a lower one of the user's), every time it is said."""
        from harkd.audio.wakeword import WakeDetector

        def lowered(threshold: float | None) -> float:
            return min(THRESHOLD, threshold or wake.threshold or THRESHOLD)

        words = [
            word.model_copy(update={"threshold": lowered(word.threshold), "refractory_s": 0.0})
            for word in wake.words
        ]
        speaker = WakeDetector(wake.model_copy(update={"words": words}))
        return cls(detector, speaker, PlayedReference(VAD_RATE))

    def __init__(self, detector: WakeStage, speaker: WakeStage, played: PlayedReference) -> None:
        """`played` must be fed by the speaker (`report_played`)."""
        self._detector = detector
        self._speaker = speaker
        self.played = played
        self.heavy = detector.heavy  # a check (rare) listens to its whole window at once

    def process(self, frame: AudioFrame) -> AudioFrame | None:
        """Listen to one 16 kHz microphone frame; pass it on unchanged."""
        return self._detector.process(frame)

    def take(self) -> list[WakeDetection]:
        """The microphone's wake words since the last call, but for the speaker's."""
        kept = []
        for detection in self._detector.take():
            if self._said(detection):
                log.info("wake word %s in the assistant's own voice: ignored", detection.word)
            else:
                kept.append(detection)
        return kept

    def _said(self, heard: WakeDetection) -> bool:
        """Whether the speaker played `heard`'s word around when the microphone heard it."""
        end = round((heard.captured_at + MATCH_EARLY_S) * VAD_RATE)
        start = end - _WINDOW
        audio = self.played.read(start, end - start)
        if not audio.any():
            return False  # nothing played: no check, no cost
        for offset in range(0, len(audio), _FRAME):
            pcm = audio[offset : offset + _FRAME].astype("<i2", copy=False).tobytes()
            self._speaker.process(AudioFrame(pcm, VAD_RATE, (start + offset + _FRAME) / VAD_RATE))
        at = heard.captured_at
        return any(
            said.word == heard.word
            and said.captured_at - MATCH_EARLY_S <= at <= said.captured_at + MATCH_LATE_S
            for said in self._speaker.take()
        )
