"""The in-process circuit breaker (`shared.cache.breaker`), driven by a fake clock."""

from __future__ import annotations

import logging

import pytest

from shared.cache.breaker import CircuitBreaker, Permit, State
from tests.cache_helpers import FakeClock, run_threads

BOOM = ConnectionError("connection refused")


def state(breaker: CircuitBreaker) -> State:
    """Read through a call, so the type checker does not narrow the state between reads."""
    return breaker.state


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_new_breaker_is_closed(clock: FakeClock) -> None:
    breaker = CircuitBreaker(clock=clock)
    assert state(breaker) is State.CLOSED and breaker.available
    assert breaker.acquire() is Permit.NORMAL


def test_it_opens_at_the_threshold_of_consecutive_failures(clock: FakeClock) -> None:
    breaker = CircuitBreaker(threshold=3, reset_seconds=1, clock=clock)
    breaker.failure(BOOM)
    breaker.failure(BOOM)
    assert state(breaker) is State.CLOSED and breaker.acquire() is Permit.NORMAL
    breaker.success()  # the count is of consecutive failures
    breaker.failure(BOOM)
    breaker.failure(BOOM)
    assert state(breaker) is State.CLOSED
    breaker.failure(BOOM)
    assert state(breaker) is State.OPEN and not breaker.available


def test_while_open_nobody_gets_a_permit_until_the_reset_period(clock: FakeClock) -> None:
    breaker = CircuitBreaker(threshold=1, reset_seconds=2, clock=clock)
    breaker.failure(BOOM)
    for _ in range(5):
        assert breaker.acquire() is None
        clock.advance(0.3)
    clock.advance(1)
    assert breaker.acquire() is Permit.PROBE
    assert breaker.acquire() is None, "only one probe at a time"
    breaker.success()
    assert state(breaker) is State.CLOSED and breaker.acquire() is Permit.NORMAL


def test_a_failed_probe_reopens_with_a_fresh_timer(clock: FakeClock) -> None:
    breaker = CircuitBreaker(threshold=5, reset_seconds=2, clock=clock)
    for _ in range(5):
        breaker.failure(BOOM)
    clock.advance(2)
    assert breaker.acquire() is Permit.PROBE
    clock.advance(1)
    breaker.failure(BOOM)  # one failed probe is enough, whatever the threshold
    assert state(breaker) is State.OPEN
    clock.advance(1.5)
    assert breaker.acquire() is None
    clock.advance(0.5)
    assert breaker.acquire() is Permit.PROBE


def test_exactly_one_probe_among_many_threads(clock: FakeClock) -> None:
    breaker = CircuitBreaker(threshold=1, reset_seconds=1, clock=clock)
    breaker.failure(BOOM)
    clock.advance(1)
    permits = run_threads(20, lambda _: breaker.acquire())
    assert permits.count(Permit.PROBE) == 1
    assert permits.count(None) == 19


def test_one_warning_per_outage_and_a_note_on_recovery(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    breaker = CircuitBreaker(threshold=1, reset_seconds=1, clock=clock)
    with caplog.at_level(logging.INFO, logger="shared.cache.breaker"):
        for _ in range(3):
            breaker.failure(BOOM)
            clock.advance(1)
            assert breaker.acquire() is Permit.PROBE
        breaker.failure(BOOM)
        clock.advance(1)
        breaker.acquire()
        breaker.success()
        breaker.failure(BOOM)  # a second outage
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(warnings) == 2 and breaker.outages == 2
    assert len(infos) == 1 and "back" in infos[0].getMessage()
    assert all(r.name == "shared.cache.breaker" for r in caplog.records)


def test_success_when_closed_is_free(clock: FakeClock) -> None:
    breaker = CircuitBreaker(clock=clock)
    for _ in range(100):
        breaker.success()
    assert state(breaker) is State.CLOSED and breaker.outages == 0
