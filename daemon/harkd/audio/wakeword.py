"""On-device wake word detection: microWakeWord models through pymicro-wakeword.

Every 16 kHz frame the microphone captures goes through one shared feature frontend
(10 ms windows) and every configured model; a model whose smoothed probability
crosses its threshold is a detection, unless the same word was detected less than its
refractory time ago (or its score has stayed above the threshold since). The detector
also keeps the last second of audio so that a detection carries the wake word's own
loudness (`level`, RMS in 0..1 of full scale), which is how devices compare nearness
(arbitration).

pymicro-wakeword (and with it numpy and the tflite runtime) is imported only when a
detector is built: a daemon without `wake.enabled` never loads it.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harkd.audio.base import VAD_RATE, AudioFrame

if TYPE_CHECKING:
    from harkd.config import WakeConfig

LEVEL_WINDOW_S = 1.0
"""The wake word's loudness is the RMS of this much audio up to its detection."""

HEAVY_FRAME_MS = 0.3
"""A detector slower than this per 20 ms frame runs off the event loop."""

_FULL_SCALE = 32768.0


@dataclass(frozen=True, slots=True)
class WakeDetection:
    """A wake word was heard."""

    word: str
    """The model's name (`okay_nabu`, or a custom model's file stem)."""
    score: float
    """The model's smoothed probability, 0..1."""
    level: float
    """RMS of the last `LEVEL_WINDOW_S` of audio, 0..1 of full scale."""
    captured_at: float
    """`time.monotonic()` of the frame that completed the word."""


@dataclass
class _Word:
    name: str
    model: Any  # pymicro_wakeword.MicroWakeWord (typed loosely: imported lazily)
    threshold: float
    refractory_s: float
    last_at: float = -math.inf
    windows: int = 0
    """Feature windows fed: the model only runs on every `stride`-th one."""
    armed: bool = True
    """False from a detection until the score falls below the threshold again: one
    utterance is one detection, however long its score stays high."""


def models_dir() -> Path:
    """Where pymicro-wakeword keeps its built-in models (found without importing it)."""
    spec = importlib.util.find_spec("pymicro_wakeword")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("pymicro-wakeword is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def model_path(model: str) -> Path:
    """The `.json` description of a configured wake word model."""
    return models_dir() / f"{model}.json" if not model.endswith(".json") else Path(model)


class WakeDetector:
    """A capture-pipeline analysis stage: looks at every 16 kHz frame, changes none.

    Detections collect in `detections` until the pipeline takes them.
    """

    def __init__(self, config: WakeConfig) -> None:
        from pymicro_wakeword import MicroWakeWord, MicroWakeWordFeatures

        self._features = MicroWakeWordFeatures()
        self._words: list[_Word] = []
        for word in config.words:
            model = MicroWakeWord.from_config(model_path(word.model))
            threshold = word.threshold or config.threshold or model.probability_cutoff
            refractory = word.refractory_s if word.refractory_s is not None else config.refractory_s
            name = Path(word.model).stem
            self._words.append(_Word(name, model, threshold, refractory))
        self._recent: deque[bytes] = deque()
        self._recent_bytes = 0
        self._level_bytes = int(LEVEL_WINDOW_S * VAD_RATE) * 2
        self._gain = 10 ** (config.level_offset_db / 20)
        self.detections: list[WakeDetection] = []
        self.heavy = self._measure_cost() > HEAVY_FRAME_MS

    @property
    def words(self) -> Sequence[str]:
        """The names of the words it listens for, in config order."""
        return [word.name for word in self._words]

    def process(self, frame: AudioFrame) -> AudioFrame:
        """Listen to one 16 kHz frame; pass it on unchanged."""
        self._remember(frame.pcm)
        for features in self._features.process_streaming(frame.pcm):
            for word in self._words:
                score = word.model.process_streaming_prob(features)
                word.windows += 1
                if word.windows % word.model.stride:
                    continue  # the model only collected this window: no new score
                if score is None or score <= word.threshold:
                    word.armed = True
                    continue
                if not word.armed or frame.captured_at - word.last_at < word.refractory_s:
                    continue
                word.armed = False
                word.last_at = frame.captured_at
                self.detections.append(
                    WakeDetection(word.name, round(score, 3), self._level(), frame.captured_at)
                )
        return frame

    def take(self) -> list[WakeDetection]:
        """The detections since the last call."""
        found, self.detections = self.detections, []
        return found

    def _remember(self, pcm: bytes) -> None:
        self._recent.append(pcm)
        self._recent_bytes += len(pcm)
        while self._recent_bytes - len(self._recent[0]) >= self._level_bytes:
            self._recent_bytes -= len(self._recent.popleft())

    def _level(self) -> float:
        import numpy as np  # loaded by pymicro-wakeword anyway; kept off the import

        samples = np.frombuffer(b"".join(self._recent), dtype="<i2").astype(np.float32)
        if not samples.size:
            return 0.0
        rms = math.sqrt(float(samples @ samples) / samples.size) / _FULL_SCALE
        return round(min(1.0, rms * self._gain), 4)

    def _measure_cost(self) -> float:
        """Milliseconds one 20 ms frame costs here, measured on half a second of
        silence; the models start afresh afterwards."""
        frame = bytes(VAD_RATE // 50 * 2)
        started = time.perf_counter()
        for _ in range(25):
            for features in self._features.process_streaming(frame):
                for word in self._words:
                    word.model.process_streaming_prob(features)
        cost_ms = (time.perf_counter() - started) * 1000 / 25
        self._features.reset()
        for word in self._words:
            word.model.reset()
            word.windows = 0
        return cost_ms
