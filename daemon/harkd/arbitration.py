"""Several devices in one home: of those that hear one wake word, the nearest answers.

Devices that share a broker and a `base_topic` agree among themselves, with no server
of harkd's own. Each device that detects a wake word publishes a claim on
`<base_topic>/_wake/claim` (QoS 1, not retained), `{"device", "word", "score",
"level", "ts"}`, and waits out the window (300 ms). Its claim wins when it is the best
of those for the same word received within the window either side of its own
detection: highest `level` (the wake word's loudness: nearness), then the higher
score, then the lower device id. Every device ranks the same claims the same way, so
they reach the same verdict. Order is decided by receipt, never by `ts`: a device
whose clock is off by seconds still takes part.

It fails open: with the broker unreachable (or MQTT off) a device answers on its own,
at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

WINDOW_S = 0.3
"""How long a device waits for other claims, and how old a claim it still counts."""

CLAIM_TOPIC = "_wake/claim"
"""Under `<base_topic>/`: where every device of the home claims its wake words."""

KEPT_CLAIMS = 64
"""Claims kept for the look back (a few seconds' worth in the busiest home)."""


@dataclass(frozen=True)
class Claim:
    """One device's bid to answer one wake word."""

    device: str
    word: str
    score: float
    level: float
    ts: float

    def to_json(self) -> str:
        """The claim's payload."""
        return json.dumps(
            {
                "device": self.device,
                "word": self.word,
                "score": self.score,
                "level": self.level,
                "ts": self.ts,
            }
        )

    @classmethod
    def from_json(cls, payload: bytes) -> Claim:
        """A claim from its payload; ValueError when it is not one."""
        data: Any = json.loads(payload)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        device, word = data.get("device"), data.get("word")
        if not isinstance(device, str) or not device or not isinstance(word, str):
            raise ValueError("device and word must be strings")
        numbers: list[float] = []
        for key in ("score", "level", "ts"):
            value = data.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{key} must be a number")
            if not math.isfinite(value):
                raise ValueError(f"{key} must be finite")
            numbers.append(float(value))
        score, level, ts = numbers
        return cls(device, word, score, level, ts)

    @property
    def rank(self) -> tuple[float, float, str]:
        """Sorts the best claim first: loudest, then most certain, then lowest id."""
        return (-self.level, -self.score, self.device)


def wins(mine: Claim, others: Iterable[Claim]) -> bool:
    """Whether `mine` is the best of `mine` and `others` (claims for its word)."""
    return all(mine.rank < other.rank for other in others if other.device != mine.device)


class Arbiter(Protocol):
    """Decides whether this device answers a wake word it heard."""

    async def claim(self, word: str, score: float, level: float, ts: float) -> bool:
        """True when this device answers (it may wait the window to find out)."""


class MqttArbiter:
    """Claims over the daemon's MQTT connection (see the module docstring)."""

    def __init__(
        self,
        device: str,
        base_topic: str,
        publish: Callable[[str, str], None],
        connected: Callable[[], bool],
        *,
        window_s: float = WINDOW_S,
        on_verdict: Callable[[Claim, list[Claim], bool], None] = lambda *_: None,
    ) -> None:
        """`publish(topic, payload)` sends QoS 1; `connected()` says whether the
        broker can be reached now; `on_verdict(mine, others, won)` is told each
        outcome. Feed every message of `topic` to `received`."""
        self.device = device
        self.topic = f"{base_topic}/{CLAIM_TOPIC}"
        self._publish = publish
        self._connected = connected
        self._window_s = window_s
        self._on_verdict = on_verdict
        self._heard: deque[tuple[float, Claim]] = deque(maxlen=KEPT_CLAIMS)

    def received(self, topic: str, payload: bytes, retained: bool) -> None:
        """An MQTT message on the claim topic (ours come back too, and are skipped)."""
        if retained:
            return  # a claim is an event; an old retained one means nothing now
        try:
            claim = Claim.from_json(payload)
        except ValueError as exc:
            log.warning("ignoring a malformed wake claim on %s: %s", topic, exc)
            return
        if claim.device != self.device:
            self._heard.append((time.monotonic(), claim))

    async def claim(self, word: str, score: float, level: float, ts: float) -> bool:
        """Claim the wake word and wait the window; True when this device answers."""
        mine = Claim(self.device, word, score, level, ts)
        if not self._connected():
            log.info("wake word %s: broker unreachable, answering without arbitration", word)
            return True
        started = time.monotonic()
        self._publish(self.topic, mine.to_json())
        await asyncio.sleep(self._window_s)
        others = [
            claim
            for at, claim in self._heard
            if claim.word == word and abs(at - started) <= self._window_s
        ]
        won = wins(mine, others)
        self._on_verdict(mine, others, won)
        if others:
            log.info(
                "wake word %s: %s (level %.3f) against %s",
                word,
                "answering" if won else "another device answers",
                level,
                ", ".join(f"{c.device} {c.level:.3f}" for c in others),
            )
        return won
