"""The capped doubling every retry waits by (dispatch attempts, balancing hold-back, the
token recheck)."""

from __future__ import annotations

from service.common.backoff import doubling_delay


def test_the_wait_doubles_from_the_first_and_stops_at_the_cap() -> None:
    waits = [doubling_delay(failures, 1.0, 30.0) for failures in range(1, 9)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


def test_a_count_below_one_waits_as_the_first_failure() -> None:
    assert doubling_delay(0, 0.5, 10.0) == doubling_delay(1, 0.5, 10.0) == 0.5


def test_a_long_outage_stays_at_the_cap() -> None:
    # 2.0 ** 10_000 would overflow the float.
    assert doubling_delay(10_000, 1.0, 300.0) == 300.0
    assert doubling_delay(10_000, 0.0, 300.0) == 0.0
