"""The per-endpoint circuit breaker on a ManualClock: the transitions WebhookSender relies on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from service.common.clock import ManualClock
from service.dispatch.breaker import BreakerState, CircuitBreakers

KEY = "https://partner.example:443"


def opened(clock: ManualClock) -> CircuitBreakers:
    breakers = CircuitBreakers(failure_threshold=2, reset_seconds=30, clock=clock)
    for _ in range(2):
        permit = breakers.try_acquire(KEY)
        assert permit is not None
        permit.failed()
    assert breakers.state(KEY) is BreakerState.OPEN
    return breakers


def test_a_released_probe_leaves_the_next_caller_to_probe() -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    breakers = opened(clock)
    clock.advance(timedelta(seconds=30))
    probe = breakers.try_acquire(KEY)
    assert probe is not None
    assert probe.probe
    assert breakers.try_acquire(KEY) is None  # one probe at a time
    probe.release()  # no request was made (refused address, cancelled)
    assert breakers.state(KEY) is BreakerState.HALF_OPEN
    second = breakers.try_acquire(KEY)
    assert second is not None
    second.succeeded()
    assert breakers.state(KEY) is BreakerState.CLOSED


def test_late_failures_of_requests_admitted_while_closed_do_not_push_the_timer() -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    breakers = CircuitBreakers(failure_threshold=2, reset_seconds=30, clock=clock)
    in_flight = [breakers.try_acquire(KEY) for _ in range(3)]
    assert all(p is not None and not p.probe for p in in_flight)
    in_flight[0].failed()  # type: ignore[union-attr]
    in_flight[1].failed()  # type: ignore[union-attr]
    assert breakers.state(KEY) is BreakerState.OPEN
    clock.advance(timedelta(seconds=20))
    in_flight[2].failed()  # type: ignore[union-attr]
    clock.advance(timedelta(seconds=10))
    assert breakers.state(KEY) is BreakerState.HALF_OPEN


def test_a_permit_reports_once() -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    breakers = CircuitBreakers(failure_threshold=1, reset_seconds=30, clock=clock)
    permit = breakers.try_acquire(KEY)
    assert permit is not None
    permit.succeeded()
    permit.failed()  # ignored: already reported
    assert breakers.state(KEY) is BreakerState.CLOSED


def test_endpoints_are_independent_and_forgotten_when_healthy() -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    breakers = opened(clock)
    other = breakers.try_acquire("https://other.example:443")
    assert other is not None
    other.failed()
    assert breakers.state("https://other.example:443") is BreakerState.CLOSED
    other_again = breakers.try_acquire("https://other.example:443")
    assert other_again is not None
    other_again.succeeded()
    assert breakers.state(KEY) is BreakerState.OPEN
    assert len(breakers._endpoints) == 1  # only the failing endpoint is kept


def test_a_probe_failing_after_another_request_closed_the_circuit_is_a_first_failure() -> None:
    clock = ManualClock(datetime(2026, 1, 1, tzinfo=UTC))
    breakers = CircuitBreakers(failure_threshold=2, reset_seconds=30, clock=clock)
    admitted_while_closed = breakers.try_acquire(KEY)
    assert admitted_while_closed is not None
    for _ in range(2):
        permit = breakers.try_acquire(KEY)
        assert permit is not None
        permit.failed()
    clock.advance(timedelta(seconds=30))
    probe = breakers.try_acquire(KEY)
    assert probe is not None
    assert probe.probe
    admitted_while_closed.succeeded()  # the endpoint answers: closed
    assert breakers.state(KEY) is BreakerState.CLOSED
    probe.failed()
    assert breakers.state(KEY) is BreakerState.CLOSED  # one failure, threshold 2
    again = breakers.try_acquire(KEY)
    assert again is not None
    again.failed()
    assert breakers.state(KEY) is BreakerState.OPEN
