"""The one backoff rule (harkd.backoff) and the retry loops that use it."""

from __future__ import annotations

import threading
import time

import pytest

from harkd.backoff import Backoff
from harkd.config import MqttConfig
from harkd.mqtt import make_client
from mosquitto import free_port


def test_delays_double_from_initial_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 10.0, jitter=0)
    assert [backoff.next() for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff.attempt == 7


def test_reset_starts_again_at_initial() -> None:
    backoff = Backoff(1.0, 60.0, jitter=0)
    for _ in range(5):
        backoff.next()
    backoff.reset()
    assert backoff.next() == 1.0


def test_jitter_draws_from_the_top_fraction_of_each_ceiling() -> None:
    draws: list[tuple[float, float]] = []

    def lowest(low: float, high: float) -> float:
        draws.append((low, high))
        return low

    backoff = Backoff(1.0, 30.0, jitter=0.5, uniform=lowest)
    assert [backoff.delay(n) for n in (0, 1, 5)] == [0.5, 1.0, 15.0]
    assert draws == [(0.5, 1.0)] * 3


def test_default_jitter_stays_within_half_to_full_ceiling() -> None:
    # The realtime client's reconnects: 50-100 % of the exponential ceiling.
    backoff = Backoff(1.0, 30.0)
    for attempt in range(12):
        ceiling = min(30.0, 2.0**attempt)
        assert all(0.5 * ceiling <= backoff.delay(attempt) <= ceiling for _ in range(50))


def test_a_cap_below_initial_wins() -> None:
    assert Backoff(1.0, 0.05, jitter=0).next() == 0.05


def test_delay_is_pure_and_survives_huge_attempts() -> None:
    backoff = Backoff(1.0, 30.0, jitter=0)
    assert backoff.delay(3) == backoff.delay(3) == 8.0
    assert backoff.attempt == 0
    assert backoff.delay(10_000) == 30.0


@pytest.mark.parametrize(
    ("initial_s", "max_s", "jitter"), [(0.0, 1.0, 0.5), (1.0, -1.0, 0.5), (1.0, 2.0, 1.5)]
)
def test_nonsense_parameters_are_refused(initial_s: float, max_s: float, jitter: float) -> None:
    with pytest.raises(ValueError):
        Backoff(initial_s, max_s, jitter=jitter)


def test_mqtt_client_waits_by_the_helper_between_reconnect_attempts() -> None:
    """paho's own wait (1 s, 2 s, ...) would allow two attempts in this second."""
    client = make_client(MqttConfig(host="127.0.0.1", port=free_port()), None, "backoff-test")
    client._backoff = Backoff(0.02, 0.05)  # type: ignore[attr-defined]
    failures = threading.Semaphore(0)
    client.on_connect_fail = lambda _client, _userdata: failures.release()
    client.connect_async("127.0.0.1", free_port())
    client.loop_start()
    try:
        deadline = time.monotonic() + 5.0
        for _ in range(6):
            assert failures.acquire(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        client.disconnect()
        started = time.monotonic()
        client.loop_stop()
    assert time.monotonic() - started < 1.5  # the wait ends when the client stops
