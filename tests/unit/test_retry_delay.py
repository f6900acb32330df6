"""Back-off between delivery attempts: capped, exponential, jittered, Retry-After honoured."""

from __future__ import annotations

import random

from service.dispatch.delivery import DeliverySettings, retry_delay_seconds

SETTINGS = DeliverySettings(backoff_initial_seconds=2.0, backoff_max_seconds=60.0)


def test_delay_grows_exponentially_up_to_the_cap_with_full_jitter() -> None:
    rng = random.Random(7)
    for attempt, ceiling in [(1, 2), (2, 4), (3, 8), (4, 16), (5, 32), (6, 60), (50, 60)]:
        delays = [retry_delay_seconds(attempt, SETTINGS, None, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in delays)
        # Full jitter: spread over the whole range, not a fixed value.
        assert min(delays) < 0.2 * ceiling
        assert max(delays) > 0.8 * ceiling


def test_huge_attempt_numbers_stay_at_the_cap() -> None:
    assert 0 <= retry_delay_seconds(10**6, SETTINGS, None, random.Random(1)) <= 60
    assert 0 <= retry_delay_seconds(0, SETTINGS, None, random.Random(1)) <= 2


def test_retry_after_is_a_floor() -> None:
    rng = random.Random(3)
    assert all(retry_delay_seconds(1, SETTINGS, 30.0, rng) == 30.0 for _ in range(50))
    # Beyond the back-off cap too: the receiver asked for it.
    assert retry_delay_seconds(9, SETTINGS, 600.0, rng) == 600.0
    delays = {retry_delay_seconds(6, SETTINGS, 1.0, rng) for _ in range(50)}
    assert min(delays) >= 1.0
    assert len(delays) > 40
