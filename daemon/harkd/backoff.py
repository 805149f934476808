"""The one backoff rule for every retry loop: the realtime connection, supervised
parts, audio devices and the MQTT broker.

Attempt n (0-based) waits up to `initial_s * 2**n`, capped at `max_s`. With jitter
the wait is drawn from the top `jitter` fraction of that ceiling, so devices that
lost the same server do not all come back in the same instant.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    """Jittered exponential backoff, as a pure rule (`delay`) and a counter (`next`).

    Not thread-safe by itself: each retry loop owns its own instance.
    """

    initial_s: float = 1.0
    max_s: float = 30.0
    jitter: float = 0.5
    """Fraction of each delay that is random: 0.5 waits 50..100 % of the ceiling."""
    uniform: Callable[[float, float], float] = field(default=random.uniform, repr=False)
    """Where the jitter comes from (a test passes a fixed one)."""
    attempt: int = field(default=0, init=False)
    """Failures since the last `reset`: the exponent of the next delay."""

    def __post_init__(self) -> None:
        # A max_s below initial_s is allowed: the cap wins, every delay is max_s.
        if self.initial_s <= 0 or self.max_s <= 0:
            raise ValueError(f"delays must be positive, got {self.initial_s}, {self.max_s}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must be within 0..1, got {self.jitter}")

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt` (0-based); no state changes."""
        # Past 2**64 the ceiling is max_s anyway; the cap keeps the float finite.
        ceiling = min(self.max_s, self.initial_s * 2.0 ** min(attempt, 64))
        if self.jitter == 0:
            return ceiling
        return float(ceiling * self.uniform(1 - self.jitter, 1.0))

    def next(self) -> float:
        """The delay before the next retry; counts one more failure."""
        wait = self.delay(self.attempt)
        self.attempt += 1
        return wait

    def reset(self) -> None:
        """It worked: the next failure starts again at `initial_s`."""
        self.attempt = 0
