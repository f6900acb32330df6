"""Unit tests for the shared balance grid in ``service.grid``."""

from __future__ import annotations

import bisect
import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from service.grid import P1M, PT1H, PT15M, SUPPORTED_RESOLUTIONS, Resolution, parse_resolution
from tests.unit.time_helpers import (
    BERLIN,
    KATHMANDU,
    KOLKATA,
    LORD_HOWE,
    NEW_YORK,
    local,
    local_day,
    utc,
)

# ---------------------------------------------------------------------------------------------
# parse_resolution
# ---------------------------------------------------------------------------------------------


def test_parse_supported_resolutions() -> None:
    assert SUPPORTED_RESOLUTIONS == ("PT15M", "PT1H", "P1M")
    assert parse_resolution("PT15M") == PT15M
    assert parse_resolution("PT1H") == PT1H
    assert parse_resolution("P1M") == P1M
    assert PT15M.step == timedelta(minutes=15)
    assert PT1H.step == timedelta(hours=1)
    assert P1M.step is None
    assert P1M.months == 1
    assert P1M.is_calendar
    assert not PT15M.is_calendar
    assert [str(parse_resolution(text)) for text in SUPPORTED_RESOLUTIONS] == list(
        SUPPORTED_RESOLUTIONS
    )


@pytest.mark.parametrize(
    "text", ["", "pt15m", "PT30M", "PT60M", "PT0.25H", "P1D", "PT15M ", " P1M", "P1Y", "15"]
)
def test_parse_resolution_rejects_others(text: str) -> None:
    with pytest.raises(ValueError, match="unsupported balance resolution") as info:
        parse_resolution(text)
    assert "PT15M, PT1H, P1M" in str(info.value)


def test_resolution_rejects_naive_datetimes() -> None:
    naive = datetime(2025, 1, 1)
    for resolution in (PT15M, PT1H, P1M):
        with pytest.raises(ValueError, match="timezone-aware"):
            resolution.is_on_grid(naive, BERLIN)
        with pytest.raises(ValueError, match="timezone-aware"):
            resolution.next_start(naive, BERLIN)
        with pytest.raises(ValueError, match="timezone-aware"):
            resolution.floor(naive, BERLIN)
        with pytest.raises(ValueError, match="timezone-aware"):
            list(resolution.iter_starts(naive, naive, BERLIN))


# ---------------------------------------------------------------------------------------------
# Grid alignment
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolution", "ts", "expected"),
    [
        (PT15M, local(BERLIN, 2025, 6, 1, 10, 0), True),
        (PT15M, local(BERLIN, 2025, 6, 1, 10, 45), True),
        (PT15M, local(BERLIN, 2025, 6, 1, 10, 5), False),
        (PT15M, local(BERLIN, 2025, 6, 1, 10, 15, 1), False),
        (PT15M, datetime(2025, 6, 1, 10, 15, 0, 1, tzinfo=BERLIN), False),
        (PT1H, local(BERLIN, 2025, 6, 1, 10, 0), True),
        (PT1H, local(BERLIN, 2025, 6, 1, 10, 15), False),
        (P1M, local(BERLIN, 2025, 6, 1), True),
        (P1M, local(BERLIN, 2025, 6, 2), False),
        (P1M, local(BERLIN, 2025, 6, 1, 1), False),
        (P1M, utc(2025, 6, 1), False),  # 02:00 local
    ],
)
def test_is_on_grid_berlin(resolution: Resolution, ts: datetime, expected: bool) -> None:
    assert resolution.is_on_grid(ts, BERLIN) is expected
    assert resolution.is_on_grid(ts.astimezone(UTC), BERLIN) is expected


def test_is_on_grid_spring_forward_day_berlin() -> None:
    # 2025-03-30: 02:00 CET jumps to 03:00 CEST (01:00 UTC).
    assert PT15M.is_on_grid(utc(2025, 3, 30, 0, 45), BERLIN)  # 01:45 CET
    assert PT15M.is_on_grid(utc(2025, 3, 30, 1, 0), BERLIN)  # 03:00 CEST
    assert PT1H.is_on_grid(utc(2025, 3, 30, 1, 0), BERLIN)
    assert not PT1H.is_on_grid(utc(2025, 3, 30, 0, 45), BERLIN)


def test_is_on_grid_fall_back_day_berlin_both_occurrences() -> None:
    # 2025-10-26: 03:00 CEST falls back to 02:00 CET (01:00 UTC); 02:xx happens twice.
    first = local(BERLIN, 2025, 10, 26, 2, 15, fold=0)
    second = local(BERLIN, 2025, 10, 26, 2, 15, fold=1)
    assert first.astimezone(UTC) == utc(2025, 10, 26, 0, 15)
    assert second.astimezone(UTC) == utc(2025, 10, 26, 1, 15)
    assert PT15M.is_on_grid(first, BERLIN)
    assert PT15M.is_on_grid(second, BERLIN)
    assert PT1H.is_on_grid(utc(2025, 10, 26, 0, 0), BERLIN)  # 02:00 CEST
    assert PT1H.is_on_grid(utc(2025, 10, 26, 1, 0), BERLIN)  # 02:00 CET
    assert not PT1H.is_on_grid(utc(2025, 10, 26, 0, 30), BERLIN)


def test_is_on_grid_half_hour_offset_kolkata() -> None:
    # +05:30: local 10:00 is 04:30 UTC.
    assert PT1H.is_on_grid(utc(2025, 6, 1, 4, 30), KOLKATA)
    assert not PT1H.is_on_grid(utc(2025, 6, 1, 4, 0), KOLKATA)
    assert not PT1H.is_on_grid(utc(2025, 6, 1, 5, 0), KOLKATA)
    assert PT15M.is_on_grid(utc(2025, 6, 1, 4, 45), KOLKATA)
    assert not PT15M.is_on_grid(utc(2025, 6, 1, 4, 40), KOLKATA)
    assert P1M.is_on_grid(utc(2025, 5, 31, 18, 30), KOLKATA)  # 2025-06-01 00:00 IST
    assert not P1M.is_on_grid(utc(2025, 6, 1), KOLKATA)


def test_is_on_grid_quarter_hour_offset_kathmandu() -> None:
    # +05:45: local 10:00 is 04:15 UTC.
    assert PT1H.is_on_grid(utc(2025, 6, 1, 4, 15), KATHMANDU)
    assert not PT1H.is_on_grid(utc(2025, 6, 1, 4, 0), KATHMANDU)
    assert PT15M.is_on_grid(utc(2025, 6, 1, 4, 0), KATHMANDU)


@pytest.mark.parametrize(
    ("start", "expected_next"),
    [
        # winter -> summer: March has 31 days minus one hour in UTC
        (utc(2025, 2, 28, 23), utc(2025, 3, 31, 22)),
        (utc(2025, 3, 31, 22), utc(2025, 4, 30, 22)),
        # summer -> winter: October has 31 days plus one hour in UTC
        (utc(2025, 9, 30, 22), utc(2025, 10, 31, 23)),
        (utc(2025, 12, 31, 23), utc(2026, 1, 31, 23)),
        (utc(2024, 12, 31, 23), utc(2025, 1, 31, 23)),
        (utc(2024, 1, 31, 23), utc(2024, 2, 29, 23)),  # leap year
    ],
)
def test_month_grid_across_dst_berlin(start: datetime, expected_next: datetime) -> None:
    assert P1M.is_on_grid(start, BERLIN)
    assert P1M.is_on_grid(expected_next, BERLIN)
    nxt = P1M.next_start(start, BERLIN)
    assert nxt == expected_next
    assert nxt.tzinfo is UTC
    local_next = nxt.astimezone(BERLIN)
    assert (local_next.day, local_next.hour, local_next.minute) == (1, 0, 0)
    mid = start + (expected_next - start) / 2
    assert P1M.floor(mid, BERLIN) == start
    assert P1M.floor(expected_next - timedelta(microseconds=1), BERLIN) == start
    assert P1M.floor(start, BERLIN) == start
    assert not P1M.is_on_grid(mid, BERLIN)


def test_month_starts_over_a_year() -> None:
    starts = list(
        P1M.iter_starts(local(NEW_YORK, 2025, 1, 1), local(NEW_YORK, 2026, 1, 1), NEW_YORK)
    )
    assert len(starts) == 12
    for month, start in enumerate(starts, start=1):
        assert start.tzinfo is UTC
        assert start.astimezone(NEW_YORK) == local(NEW_YORK, 2025, month, 1)
    # mid-month start rounds up to the next 1st
    assert next(P1M.iter_starts(utc(2025, 5, 15), utc(2026, 1, 1), BERLIN)) == utc(2025, 5, 31, 22)


def test_month_start_in_zone_skipping_midnight() -> None:
    # Sao Paulo began DST 2018-11-04 at 00:00 (clocks jumped to 01:00): the 1st instant of
    # that day is the grid point of a hypothetical month starting there, and months whose
    # midnight exists behave normally.
    sao_paulo = ZoneInfo("America/Sao_Paulo")
    start = P1M.floor(utc(2018, 11, 20), sao_paulo)
    assert start == utc(2018, 11, 1, 3)
    assert P1M.next_start(start, sao_paulo) == utc(2018, 12, 1, 2)


# ---------------------------------------------------------------------------------------------
# next_start / floor / iter_starts for fixed steps
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolution", "start", "expected"),
    [
        (PT15M, utc(2025, 6, 1, 10, 0), utc(2025, 6, 1, 10, 15)),
        (PT15M, utc(2025, 6, 1, 23, 45), utc(2025, 6, 2, 0, 0)),
        (PT15M, utc(2025, 3, 30, 0, 45), utc(2025, 3, 30, 1, 0)),  # 01:45 CET -> 03:00 CEST
        (PT15M, utc(2025, 10, 26, 0, 45), utc(2025, 10, 26, 1, 0)),  # 02:45 CEST -> 02:00 CET
        (PT1H, utc(2025, 3, 30, 0, 0), utc(2025, 3, 30, 1, 0)),  # 01:00 CET -> 03:00 CEST
        (PT1H, utc(2025, 10, 26, 0, 0), utc(2025, 10, 26, 1, 0)),  # 02:00 CEST -> 02:00 CET
        (PT1H, utc(2025, 10, 26, 1, 0), utc(2025, 10, 26, 2, 0)),  # 02:00 CET -> 03:00 CET
    ],
)
def test_next_start_fixed_berlin(
    resolution: Resolution, start: datetime, expected: datetime
) -> None:
    assert resolution.next_start(start, BERLIN) == expected
    assert resolution.next_start(start.astimezone(BERLIN), BERLIN) == expected
    assert resolution.next_start(start, BERLIN).tzinfo is UTC


def test_next_start_kolkata_hour() -> None:
    assert PT1H.next_start(utc(2025, 6, 1, 4, 30), KOLKATA) == utc(2025, 6, 1, 5, 30)
    # off the grid: the first grid point after it
    assert PT1H.next_start(utc(2025, 6, 1, 4, 0), KOLKATA) == utc(2025, 6, 1, 4, 30)


def test_floor_fixed() -> None:
    assert PT15M.floor(utc(2025, 6, 1, 10, 15) - timedelta(microseconds=1), BERLIN) == utc(
        2025, 6, 1, 10, 0
    )
    assert PT15M.floor(utc(2025, 6, 1, 10, 15), BERLIN) == utc(2025, 6, 1, 10, 15)
    assert PT1H.floor(utc(2025, 6, 1, 4, 29), KOLKATA) == utc(2025, 6, 1, 3, 30)
    assert PT1H.floor(utc(2025, 6, 1, 4, 30), KOLKATA) == utc(2025, 6, 1, 4, 30)
    # repeated hour: 02:20 CEST and 02:20 CET floor to their own occurrence
    assert PT15M.floor(utc(2025, 10, 26, 0, 20), BERLIN) == utc(2025, 10, 26, 0, 15)
    assert PT15M.floor(utc(2025, 10, 26, 1, 20), BERLIN) == utc(2025, 10, 26, 1, 15)
    assert PT1H.floor(utc(2025, 10, 26, 1, 20), BERLIN) == utc(2025, 10, 26, 1, 0)
    assert PT15M.floor(utc(2025, 6, 1, 10, 7), BERLIN).tzinfo is UTC


@pytest.mark.parametrize(
    ("resolution", "day", "expected_count"),
    [
        (PT15M, (2025, 3, 30), 92),
        (PT15M, (2025, 6, 1), 96),
        (PT15M, (2025, 10, 26), 100),
        (PT1H, (2025, 3, 30), 23),
        (PT1H, (2025, 6, 1), 24),
        (PT1H, (2025, 10, 26), 25),
    ],
)
def test_iter_starts_berlin_days(
    resolution: Resolution, day: tuple[int, int, int], expected_count: int
) -> None:
    start, end = local_day(BERLIN, *day)
    starts = list(resolution.iter_starts(start, end, BERLIN))
    assert len(starts) == expected_count
    assert len(set(starts)) == expected_count
    assert starts[0] == start.astimezone(UTC)
    assert all(s.tzinfo is UTC for s in starts)
    assert all(resolution.is_on_grid(s, BERLIN) for s in starts)
    assert resolution.step is not None
    assert all(b - a == resolution.step for a, b in itertools.pairwise(starts))
    assert resolution.next_start(starts[-1], BERLIN) == end.astimezone(UTC)


def test_iter_starts_kolkata_hour() -> None:
    start, end = local_day(KOLKATA, 2025, 6, 1)
    starts = list(PT1H.iter_starts(start, end, KOLKATA))
    assert len(starts) == 24
    assert starts[10] == utc(2025, 6, 1, 4, 30)
    assert list(PT1H.iter_starts(utc(2025, 6, 1, 4, 0), utc(2025, 6, 1, 6, 30), KOLKATA)) == [
        utc(2025, 6, 1, 4, 30),
        utc(2025, 6, 1, 5, 30),
    ]
    assert list(PT1H.iter_starts(end, start, KOLKATA)) == []


def _brute_force_grid(
    resolution: Resolution, tz: ZoneInfo, start: datetime, end: datetime
) -> list[datetime]:
    points = []
    t = start
    while t < end:
        wall = t.astimezone(tz)
        assert resolution.step is not None
        if wall.minute % (int(resolution.step.total_seconds()) // 60) == 0:
            points.append(t)
        t += timedelta(minutes=1)
    return points


@pytest.mark.parametrize(
    ("tz", "day"),
    [
        (BERLIN, (2025, 3, 30)),
        (BERLIN, (2025, 10, 26)),
        (NEW_YORK, (2025, 3, 9)),
        (NEW_YORK, (2025, 11, 2)),
        (KOLKATA, (2025, 6, 1)),
        (KATHMANDU, (2025, 6, 1)),
        (LORD_HOWE, (2025, 4, 6)),
        (LORD_HOWE, (2025, 10, 5)),
    ],
)
@pytest.mark.parametrize("resolution", [PT15M, PT1H])
def test_fixed_grid_matches_brute_force(
    resolution: Resolution, tz: ZoneInfo, day: tuple[int, int, int]
) -> None:
    """Grid points, floor and next_start agree with a minute-by-minute scan of local time."""
    start, end = local_day(tz, *day)
    lo = start.astimezone(UTC) - timedelta(hours=2)
    hi = end.astimezone(UTC) + timedelta(hours=2)
    expected = _brute_force_grid(resolution, tz, lo, hi)
    assert list(resolution.iter_starts(lo, hi, tz)) == expected
    t = lo + timedelta(hours=1, seconds=7)
    while t < hi - timedelta(hours=1):
        i = bisect.bisect_right(expected, t)
        assert resolution.floor(t, tz) == expected[i - 1]
        assert resolution.next_start(t, tz) == expected[i]
        t += timedelta(minutes=5)
    for a, b in itertools.pairwise(expected):
        assert resolution.next_start(a, tz) == b
