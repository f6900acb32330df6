"""Unit tests for the pure telemetry rules in ``service.telemetry.domain``."""

from __future__ import annotations

import bisect
import itertools
import math
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from service.telemetry.domain import (
    P1M,
    PT1H,
    PT15M,
    SUPPORTED_RESOLUTIONS,
    Flow,
    IncomingReading,
    IntervalEnergy,
    Measuring,
    MeterContext,
    MeterDirection,
    RegisterPoint,
    RejectReason,
    Resolution,
    SiteType,
    check_reading,
    check_register_sequence,
    effective_flow,
    find_register_decreases,
    measuring_allowed,
    measuring_rule,
    parse_resolution,
    reason_text,
    registers_to_intervals,
)

BERLIN = ZoneInfo("Europe/Berlin")
KOLKATA = ZoneInfo("Asia/Kolkata")
KATHMANDU = ZoneInfo("Asia/Kathmandu")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")  # DST shifts by 30 minutes
NEW_YORK = ZoneInfo("America/New_York")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def local(
    tz: ZoneInfo,
    year: int,
    month: int,
    day: int,
    hour: int = 0,
    minute: int = 0,
    second: int = 0,
    *,
    fold: int = 0,
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=tz, fold=fold)


def local_day(tz: ZoneInfo, year: int, month: int, day: int) -> tuple[datetime, datetime]:
    start = datetime(year, month, day, tzinfo=tz)
    end = (start.replace(tzinfo=None) + timedelta(days=1)).replace(tzinfo=tz)
    return start, end


# ---------------------------------------------------------------------------------------------
# Enums and measuring rules
# ---------------------------------------------------------------------------------------------


def test_enum_values_are_lowercase_names() -> None:
    for enum in (SiteType, Measuring, MeterDirection, Flow, RejectReason):
        for member in enum:
            assert member.value == member.name.lower()
    assert SiteType("balanced_accurate") is SiteType.BALANCED_ACCURATE
    assert Measuring("readings_inaccurate") is Measuring.READINGS_INACCURATE
    assert Flow("import") is Flow.IMPORT
    assert Flow("export") is Flow.EXPORT


@pytest.mark.parametrize("site_type", [SiteType.BALANCED_ACCURATE, SiteType.UNBALANCED_ACCURATE])
def test_accurate_sites_refuse_inaccurate_readings(site_type: SiteType) -> None:
    assert measuring_allowed(site_type, Measuring.READINGS_ACCURATE)
    assert measuring_allowed(site_type, Measuring.LOAD_PROFILE_ACCURATE)
    assert not measuring_allowed(site_type, Measuring.READINGS_INACCURATE)
    rule = measuring_rule(site_type)
    assert site_type.value in rule
    assert "readings_accurate" in rule
    assert "load_profile_accurate" in rule
    assert "readings_inaccurate" not in rule


@pytest.mark.parametrize(
    "site_type", [SiteType.BALANCED_INACCURATE, SiteType.UNBALANCED_INACCURATE]
)
def test_inaccurate_sites_allow_every_measuring(site_type: SiteType) -> None:
    for measuring in Measuring:
        assert measuring_allowed(site_type, measuring)
    rule = measuring_rule(site_type)
    assert site_type.value in rule
    assert all(m.value in rule for m in Measuring)


def test_effective_flow() -> None:
    assert effective_flow(MeterDirection.CONSUMER, None) is Flow.IMPORT
    assert effective_flow(MeterDirection.PRODUCER, None) is Flow.EXPORT
    assert effective_flow(MeterDirection.BIDIRECTIONAL, None) is None
    for direction in MeterDirection:
        for flow in Flow:
            assert effective_flow(direction, flow) is flow


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


# ---------------------------------------------------------------------------------------------
# registers_to_intervals
# ---------------------------------------------------------------------------------------------


def test_registers_to_intervals_simple_and_unsorted() -> None:
    points = [
        RegisterPoint(utc(2025, 6, 1, 10, 30), 130.0),
        RegisterPoint(utc(2025, 6, 1, 10, 0), 100.0),
        RegisterPoint(utc(2025, 6, 1, 10, 15), 112.5),
    ]
    assert registers_to_intervals(points, PT15M, BERLIN) == [
        IntervalEnergy(utc(2025, 6, 1, 10, 0), 12.5),
        IntervalEnergy(utc(2025, 6, 1, 10, 15), 17.5),
    ]


def test_registers_to_intervals_trivial_inputs() -> None:
    assert registers_to_intervals([], PT15M, BERLIN) == []
    assert registers_to_intervals([RegisterPoint(utc(2025, 6, 1), 1.0)], PT15M, BERLIN) == []


def test_registers_to_intervals_gap_is_not_interpolated() -> None:
    points = [
        RegisterPoint(utc(2025, 6, 1, 10, 0), 100.0),
        RegisterPoint(utc(2025, 6, 1, 10, 15), 110.0),
        # 10:30 missing: neither 10:15-10:30 nor 10:30-10:45 can be computed
        RegisterPoint(utc(2025, 6, 1, 10, 45), 150.0),
        RegisterPoint(utc(2025, 6, 1, 11, 0), 155.0),
    ]
    assert registers_to_intervals(points, PT15M, BERLIN) == [
        IntervalEnergy(utc(2025, 6, 1, 10, 0), 10.0),
        IntervalEnergy(utc(2025, 6, 1, 10, 45), 5.0),
    ]


def test_registers_to_intervals_transformer_factor() -> None:
    points = [
        RegisterPoint(local(BERLIN, 2025, 6, 1, 10), 1.0),
        RegisterPoint(local(BERLIN, 2025, 6, 1, 11), 3.5),
    ]
    result = registers_to_intervals(points, PT1H, BERLIN, transformer_factor=40.0)
    assert result == [IntervalEnergy(utc(2025, 6, 1, 8), 100.0)]
    assert result[0].interval_start.tzinfo is UTC


def test_registers_to_intervals_skips_off_grid_points() -> None:
    points = [
        RegisterPoint(utc(2025, 6, 1, 9, 52), 90.0),  # off grid, next grid point is 10:00
        RegisterPoint(utc(2025, 6, 1, 10, 0), 100.0),
        RegisterPoint(utc(2025, 6, 1, 10, 15), 110.0),
    ]
    assert registers_to_intervals(points, PT15M, BERLIN) == [
        IntervalEnergy(utc(2025, 6, 1, 10, 0), 10.0)
    ]


def test_registers_to_intervals_duplicate_timestamp_yields_no_zero_interval() -> None:
    points = [
        RegisterPoint(utc(2025, 6, 1, 10, 0), 100.0),
        RegisterPoint(utc(2025, 6, 1, 10, 0), 100.0),
        RegisterPoint(utc(2025, 6, 1, 10, 15), 104.0),
    ]
    assert registers_to_intervals(points, PT15M, BERLIN) == [
        IntervalEnergy(utc(2025, 6, 1, 10, 0), 4.0)
    ]


@pytest.mark.parametrize(("day", "expected"), [((2025, 3, 30), 92), ((2025, 10, 26), 100)])
def test_registers_to_intervals_full_dst_day(day: tuple[int, int, int], expected: int) -> None:
    start, end = local_day(BERLIN, *day)
    grid = [*PT15M.iter_starts(start, end, BERLIN), end.astimezone(UTC)]
    assert len(grid) == expected + 1
    points = [RegisterPoint(ts, 1000.0 + 2.5 * i + (i % 3)) for i, ts in enumerate(grid)]
    factor = 2.0
    intervals = registers_to_intervals(points[::-1], PT15M, BERLIN, transformer_factor=factor)
    assert len(intervals) == expected
    assert [iv.interval_start for iv in intervals] == grid[:-1]
    total = sum(iv.energy_wh for iv in intervals)
    assert math.isclose(total, (points[-1].register_wh - points[0].register_wh) * factor)
    # the repeated local hour contributes 8 distinct quarter-hours on the fall-back day
    repeated = [
        iv
        for iv in intervals
        if iv.interval_start.astimezone(BERLIN).hour == 2 and iv.interval_start.day == 26
    ]
    assert len(repeated) == (8 if expected == 100 else 0)


def test_registers_to_intervals_monthly() -> None:
    points = [
        RegisterPoint(utc(2025, 2, 28, 23), 0.0),
        RegisterPoint(utc(2025, 3, 31, 22), 300.0),
        RegisterPoint(utc(2025, 4, 30, 22), 500.0),
        RegisterPoint(utc(2025, 6, 30, 22), 900.0),  # May 31 22:00 missing
    ]
    assert registers_to_intervals(points, P1M, BERLIN) == [
        IntervalEnergy(utc(2025, 2, 28, 23), 300.0),
        IntervalEnergy(utc(2025, 3, 31, 22), 200.0),
    ]


# ---------------------------------------------------------------------------------------------
# check_reading
# ---------------------------------------------------------------------------------------------

NOW = utc(2025, 6, 1, 12, 0)
TEN = utc(2025, 6, 1, 10, 0)
MAX_FUTURE = timedelta(hours=1)
METER_START = utc(2025, 1, 1, 0, 0)
METER_END = utc(2025, 12, 31, 23, 0)


def meter(
    measuring: Measuring = Measuring.READINGS_ACCURATE,
    direction: MeterDirection = MeterDirection.CONSUMER,
    *,
    start: datetime = METER_START,
    end: datetime | None = METER_END,
    resolution: Resolution = PT15M,
) -> MeterContext:
    return MeterContext(
        meter_id="m-1",
        site_id="s-1",
        direction=direction,
        measuring=measuring,
        start_date=start,
        end_date=end,
        transformer_factor=1.0,
        timezone=BERLIN,
        resolution=resolution,
    )


def reading(
    timestamp: datetime = TEN,
    *,
    register_wh: float | None = 100.0,
    interval_wh: float | None = None,
    flow: Flow | None = None,
) -> IncomingReading:
    return IncomingReading(
        meter_id="m-1",
        timestamp=timestamp,
        register_wh=register_wh,
        interval_wh=interval_wh,
        flow=flow,
    )


def interval(timestamp: datetime = TEN, value: float = 5.0) -> IncomingReading:
    return reading(timestamp, register_wh=None, interval_wh=value)


LP = Measuring.LOAD_PROFILE_ACCURATE


def check(r: IncomingReading, m: MeterContext | None) -> RejectReason | None:
    return check_reading(r, m, NOW, MAX_FUTURE)


def test_valid_readings_pass() -> None:
    assert check(reading(), meter()) is None
    assert check(reading(), meter(Measuring.READINGS_INACCURATE)) is None
    assert check(interval(), meter(LP)) is None
    assert check(reading(register_wh=0.0), meter()) is None
    assert check(interval(value=0.0), meter(LP)) is None


def test_unknown_meter() -> None:
    assert check(reading(), None) is RejectReason.UNKNOWN_METER
    # unknown meter wins over every other problem
    assert check(reading(register_wh=None), None) is RejectReason.UNKNOWN_METER
    assert check(reading(), meter()) is None


def test_missing_value() -> None:
    assert check(reading(register_wh=None), meter()) is RejectReason.MISSING_VALUE
    assert check(reading(register_wh=None), meter(LP)) is RejectReason.MISSING_VALUE
    # missing value wins over an off-grid timestamp
    off_grid = reading(utc(2025, 6, 1, 10, 1), register_wh=None)
    assert check(off_grid, meter()) is RejectReason.MISSING_VALUE
    assert check(reading(register_wh=1.0), meter()) is None


@pytest.mark.parametrize("measuring", [Measuring.READINGS_ACCURATE, Measuring.READINGS_INACCURATE])
def test_wrong_value_kind_for_readings_meter(measuring: Measuring) -> None:
    assert check(interval(), meter(measuring)) is RejectReason.WRONG_VALUE_KIND
    both = reading(register_wh=1.0, interval_wh=1.0)
    assert check(both, meter(measuring)) is RejectReason.WRONG_VALUE_KIND
    assert check(reading(), meter(measuring)) is None


def test_wrong_value_kind_for_load_profile_meter() -> None:
    assert check(reading(), meter(LP)) is RejectReason.WRONG_VALUE_KIND
    assert check(reading(register_wh=1.0, interval_wh=1.0), meter(LP)) is (
        RejectReason.WRONG_VALUE_KIND
    )
    # wrong kind is reported before the (ignored) value is looked at
    assert check(reading(register_wh=math.nan), meter(LP)) is RejectReason.WRONG_VALUE_KIND
    assert check(interval(), meter(LP)) is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_value(bad: float) -> None:
    assert check(reading(register_wh=bad), meter()) is RejectReason.NON_FINITE_VALUE
    assert check(interval(value=bad), meter(LP)) is RejectReason.NON_FINITE_VALUE
    assert check(reading(register_wh=1e300), meter()) is None


def test_negative_value() -> None:
    assert check(reading(register_wh=-0.001), meter()) is RejectReason.NEGATIVE_VALUE
    assert check(interval(value=-1.0), meter(LP)) is RejectReason.NEGATIVE_VALUE
    # negative before flow and grid problems
    bad = reading(utc(2025, 6, 1, 10, 1), register_wh=-1.0, flow=Flow.EXPORT)
    assert check(bad, meter()) is RejectReason.NEGATIVE_VALUE
    assert check(reading(register_wh=-0.0), meter()) is None


def test_flow_required_for_bidirectional_meter() -> None:
    bidi = meter(direction=MeterDirection.BIDIRECTIONAL)
    assert check(reading(), bidi) is RejectReason.FLOW_REQUIRED
    assert check(reading(utc(2025, 6, 1, 10, 1)), bidi) is RejectReason.FLOW_REQUIRED
    assert check(reading(flow=Flow.IMPORT), bidi) is None
    assert check(reading(flow=Flow.EXPORT), bidi) is None


def test_flow_not_allowed() -> None:
    consumer = meter(direction=MeterDirection.CONSUMER)
    producer = meter(direction=MeterDirection.PRODUCER)
    assert check(reading(flow=Flow.EXPORT), consumer) is RejectReason.FLOW_NOT_ALLOWED
    assert check(reading(flow=Flow.IMPORT), producer) is RejectReason.FLOW_NOT_ALLOWED
    # flow is checked before the grid
    off_grid = reading(utc(2025, 6, 1, 10, 1), flow=Flow.IMPORT)
    assert check(off_grid, producer) is RejectReason.FLOW_NOT_ALLOWED
    assert check(reading(flow=Flow.IMPORT), consumer) is None
    assert check(reading(flow=None), consumer) is None
    assert check(reading(flow=Flow.EXPORT), producer) is None
    assert check(reading(flow=None), producer) is None


def test_not_on_grid() -> None:
    assert check(reading(utc(2025, 6, 1, 10, 1)), meter()) is RejectReason.NOT_ON_GRID
    assert check(reading(utc(2025, 6, 1, 10, 15)), meter(resolution=PT1H)) is (
        RejectReason.NOT_ON_GRID
    )
    # grid is checked before the meter dates and the future limit
    assert check(reading(utc(2024, 6, 1, 10, 1)), meter()) is RejectReason.NOT_ON_GRID
    assert check(reading(utc(2025, 6, 2, 10, 1)), meter()) is RejectReason.NOT_ON_GRID
    assert check(reading(utc(2025, 6, 1, 10, 15)), meter()) is None
    # the second 02:15 of the fall-back day is a grid point of its own
    assert check(reading(local(BERLIN, 2025, 10, 26, 2, 15, fold=1)), meter()) is not (
        RejectReason.NOT_ON_GRID
    )


def test_outside_meter_dates_for_registers() -> None:
    m = meter()
    assert check(reading(METER_START - timedelta(minutes=15)), m) is (
        RejectReason.OUTSIDE_METER_DATES
    )
    assert check(reading(METER_START), m) is None
    late = meter(end=utc(2025, 6, 1, 11, 0))
    assert check(reading(utc(2025, 6, 1, 11, 0)), late) is RejectReason.OUTSIDE_METER_DATES
    assert check(reading(utc(2025, 6, 1, 10, 45)), late) is None
    # outside dates is reported before too far in future
    ended = meter(end=utc(2025, 6, 1, 11, 0))
    assert check(reading(utc(2025, 6, 5)), ended) is RejectReason.OUTSIDE_METER_DATES
    assert check(reading(utc(2030, 1, 1)), meter(end=None)) is RejectReason.TOO_FAR_IN_FUTURE


def test_outside_meter_dates_for_intervals() -> None:
    m = meter(LP, end=utc(2025, 6, 1, 11, 0))
    assert check(interval(utc(2025, 6, 1, 10, 45)), m) is None  # ends exactly at end_date
    assert check(interval(utc(2025, 6, 1, 11, 0)), m) is RejectReason.OUTSIDE_METER_DATES
    # end date not on the grid: the interval would stick out of the meter's life
    odd_end = meter(LP, end=utc(2025, 6, 1, 10, 50))
    assert check(interval(utc(2025, 6, 1, 10, 45)), odd_end) is RejectReason.OUTSIDE_METER_DATES
    assert check(interval(utc(2025, 6, 1, 10, 30)), odd_end) is None
    assert check(interval(METER_START - timedelta(minutes=15)), meter(LP)) is (
        RejectReason.OUTSIDE_METER_DATES
    )
    # a monthly interval must end by the end date too
    monthly = meter(LP, end=utc(2025, 6, 15), resolution=P1M)
    june = utc(2025, 5, 31, 22)
    assert check(interval(june), monthly) is RejectReason.OUTSIDE_METER_DATES
    assert check(interval(utc(2025, 4, 30, 22)), monthly) is None


def test_too_far_in_future() -> None:
    m = meter(end=None)
    assert check(reading(NOW + MAX_FUTURE), m) is None
    assert check(reading(NOW + MAX_FUTURE + timedelta(minutes=15)), m) is (
        RejectReason.TOO_FAR_IN_FUTURE
    )
    assert check_reading(reading(utc(2025, 6, 1, 12, 15)), m, NOW, timedelta(0)) is (
        RejectReason.TOO_FAR_IN_FUTURE
    )
    assert check_reading(reading(utc(2025, 6, 1, 12, 0)), m, NOW, timedelta(0)) is None


def test_check_reading_rejects_naive_timestamp() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        check(reading(datetime(2025, 6, 1, 10, 0)), meter())


def test_every_reason_has_a_text() -> None:
    texts = {reason: reason_text(reason) for reason in RejectReason}
    assert all(texts.values())
    assert len(set(texts.values())) == len(RejectReason)
    assert "bidirectional" in reason_text(RejectReason.FLOW_REQUIRED)


# ---------------------------------------------------------------------------------------------
# Register monotonicity
# ---------------------------------------------------------------------------------------------


def point(minute: int, value: float) -> RegisterPoint:
    return RegisterPoint(utc(2025, 6, 1, 10) + timedelta(minutes=minute), value)


def test_find_register_decreases() -> None:
    prev, nxt = point(0, 100.0), point(30, 120.0)
    assert find_register_decreases(prev, nxt, point(15, 99.9))
    assert find_register_decreases(prev, nxt, point(15, 120.1))
    assert not find_register_decreases(prev, nxt, point(15, 110.0))
    assert not find_register_decreases(prev, nxt, point(15, 100.0))
    assert not find_register_decreases(prev, nxt, point(15, 120.0))
    assert find_register_decreases(prev, None, point(15, 50.0))
    assert not find_register_decreases(prev, None, point(15, 1e9))
    assert find_register_decreases(None, nxt, point(15, 200.0))
    assert not find_register_decreases(None, nxt, point(15, 0.0))
    assert not find_register_decreases(None, None, point(15, 0.0))


def test_check_register_sequence() -> None:
    assert check_register_sequence([]) == []
    assert check_register_sequence([point(0, 1.0), point(15, 1.0), point(30, 2.0)]) == []
    # the later, lower point is rejected; the sequence continues from the last accepted value
    assert check_register_sequence([point(0, 10.0), point(15, 5.0), point(30, 12.0)]) == [1]
    assert check_register_sequence([point(0, 10.0), point(15, 5.0), point(30, 7.0)]) == [1, 2]


def test_check_register_sequence_indexes_refer_to_given_order() -> None:
    points = [point(30, 5.0), point(0, 10.0), point(45, 20.0), point(15, 11.0)]
    # time order: 0 (10), 15 (11), 30 (5: decrease), 45 (20)
    assert check_register_sequence(points) == [0]
